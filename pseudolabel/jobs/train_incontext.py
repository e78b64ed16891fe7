"""``train-incontext``: train a SeFM checkpoint on in-context pairs synthesised from demo data.

SeFM has no public weights; this job makes a checkpoint the ``incontext`` labeler (backend ``sefm``)
loads. Each training example is one component type (watermark or shadow) on two different scenes:

- demo pair from scene A: (A with the component, A without it);
- query/target from scene B: (B with the same kind of component, B without it).

They are stitched into the in-context canvas (``models/incontext/canvas.py``); the loss is L1 between
the network's answer cell and the target, weighted 1 + ``component_weight`` on the component's
pixels (plain L1 when 0). Usage::

    pseudolabel train-incontext JOB.yaml --set steps=500
    # JOB.yaml: {output: /tmp/sefm-small, model: {width: 16, enc_blocks: [1, 1, 2], ...}, steps: 300}

or ``train_incontext({...})`` from Python; the checkpoint directory (local or s3://) holds
``config.json`` + ``model.safetensors``.

Fine-tuning: ``init_from`` a checkpoint trains that network, with the checkpoint's configuration. A
``model`` given as well must agree with it on every field it sets (it may be left out); a field that
disagrees is an error naming both (``SpecError``), never silently dropped. At least one step always
runs, whatever ``time_budget_s`` says.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pseudolabel import storage as st
from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.sefm import SeFM, SeFMConfig
from pseudolabel.schemas.spec import SpecError, StorageSpec, validate_spec

Component = Literal["watermark", "shadow"]


def small_config(cell: int = 64, layout: str = "grid") -> SeFMConfig:
    """A small SeFM (about 35k parameters) that trains on CPU in minutes: width 12, two levels."""
    return SeFMConfig(in_channels=3 if layout == "grid" else 6, width=12, enc_blocks=[1, 2], dec_blocks=[1],
                      refine_blocks=1, heads=[1, 2], ffn_expansion=2.0, cell=cell, layout=layout)


class TrainSpec(BaseModel):
    """What ``train_incontext`` trains and where it writes the checkpoint."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(description="checkpoint directory: local path or s3:// prefix")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    model: SeFMConfig = Field(default_factory=small_config, description="network size; cell and layout included "
                                                                      "(with init_from: the checkpoint's)")
    init_from: str | None = Field(None, description="start from this checkpoint directory (local); a model given "
                                                    "too must agree with the checkpoint on every field it sets")
    components: list[Component] = Field(default_factory=lambda: ["watermark"],
                                         description="component types to learn to separate")
    image_size: int = Field(64, ge=32, description="side of the rendered demo scenes (px)")
    pool_size: int = Field(256, ge=2, description="scenes rendered up front; components are drawn fresh each step")
    examples: int | None = Field(None, ge=1, description="synthesise this many examples once and cycle through "
                                                         "them (a fixed training set); None: fresh examples each step")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    component_weight: float = Field(4.0, ge=0, description="extra L1 weight on the query's component pixels "
                                                           "(0: plain L1 over the answer cell; plain L1 tends to "
                                                           "stay at the identity in short runs)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    time_budget_s: float | None = Field(None, gt=0, description="stop early after this many seconds "
                                                               "(at least one step runs)")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    device: str = "cpu"
    log_every: int = Field(25, ge=1)


# ----------------------------------------------------------------------------------------------
# Example synthesis (pure numpy)
# ----------------------------------------------------------------------------------------------

class ScenePool:
    """Pre-rendered demo scenes per component type.

    ``watermark``: clean scenes (no shadow, no watermark) — watermarks are added fresh per example.
    ``shadow``: (shadowed, clean) scenes rendered with shadows. Images are (S, S, 3) uint8 RGB.
    """

    def __init__(self, rng: np.random.Generator, size: int, count: int, components: list[str]):
        from pseudolabel.jobs.demo_data import render_scene

        self.size = size
        self.clean: list[np.ndarray] = []
        self.shadowed: list[tuple[np.ndarray, np.ndarray]] = []
        if "watermark" in components:
            self.clean = [render_scene(rng, size, shadow_prob=0.0, watermark_prob=0.0).clean for _ in range(count)]
        if "shadow" in components:
            for _ in range(count):
                s = render_scene(rng, size, shadow_prob=1.0, watermark_prob=0.0)
                self.shadowed.append((s.image, s.clean))


def synthesize_example(rng: np.random.Generator, pool: ScenePool, component: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One in-context example: the same component type on two different scenes.

    Returns:
        (demo_in, demo_out, query, target, query_mask): four (S, S, 3) uint8 RGB images and the
        (S, S) bool mask of the component in the query.
    """
    from pseudolabel.jobs.demo_data import add_watermark

    if component == "watermark":
        i, j = rng.choice(len(pool.clean), 2, replace=False)
        demo_out, target = pool.clean[i], pool.clean[j]
        demo_in, _ = add_watermark(demo_out, rng)
        query, mask = add_watermark(target, rng)
    elif component == "shadow":
        i, j = rng.choice(len(pool.shadowed), 2, replace=False)
        (demo_in, demo_out), (query, target) = pool.shadowed[i], pool.shadowed[j]
        mask = np.abs(query.astype(np.int16) - target.astype(np.int16)).max(axis=2) > 0
    else:
        raise ValueError(f"unknown component {component!r}")
    return demo_in, demo_out, query, target, mask


def make_batch(rng: np.random.Generator, pool: ScenePool, components: list[str], n: int, cell: int,
               layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(canvases (n, C, H, W) float32 in [0, 1], targets (n, 3, cell, cell) float32 in [0, 1],
    component masks (n, 1, cell, cell) float32 in [0, 1])."""
    xs, ys, ms = [], [], []
    for _ in range(n):
        comp = components[int(rng.integers(len(components)))]
        a, b, q, t, m = synthesize_example(rng, pool, comp)
        xs.append(cv.stitch(a, b, q, cell, layout).astype(np.float32) / 255.0)
        ys.append(cv.to_cell(t, cell).astype(np.float32) / 255.0)
        ms.append(cv.to_cell(m.astype(np.float32)[..., None], cell))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(ys)).permute(0, 3, 1, 2).contiguous()
    m = torch.from_numpy(np.stack(ms)).permute(0, 3, 1, 2).contiguous()
    return x, y, m


def answer_l1(net: SeFM, x: torch.Tensor, y: torch.Tensor, layout: str, mask: torch.Tensor | None = None,
              component_weight: float = 0.0) -> torch.Tensor:
    """L1 between the answer cell of ``net(x)`` and the target cells ``y``, per pixel weighted by
    1 + component_weight · mask (mask: (B, 1, cell, cell) in [0, 1])."""
    cell = y.shape[-1]
    y0, y1, x0, x1 = cv.answer_box(cell, layout)
    err = (net(x)[:, :, y0:y1, x0:x1] - y).abs()
    if mask is not None and component_weight > 0:
        err = err * (1.0 + component_weight * mask)
    return err.mean()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def save_checkpoint(net: SeFM, uri: str, storage: StorageSpec | None = None) -> str:
    """Write the checkpoint to a local directory or upload it to an s3:// prefix; returns ``uri``."""
    with st.staged_dir(uri, storage) as local:
        net.save_pretrained(local)
    return uri


def _model_fields_given(original: Any, spec: TrainSpec, overrides: dict[str, Any]) -> set[str]:
    """The ``model`` fields the user set (as opposed to defaults), from the spec and the overrides."""
    if isinstance(original, TrainSpec):  # validate_spec re-validates its full dump: ask the instance
        given = set(original.model.model_fields_set) if "model" in original.model_fields_set else set()
    else:
        given = set(spec.model.model_fields_set) if "model" in spec.model_fields_set else set()
    for key, value in overrides.items():
        if key == "model":
            given |= set(value) if isinstance(value, dict) else set(SeFMConfig.model_fields)
        elif key.startswith("model."):
            given.add(key.split(".")[1])
    return given


def load_init(spec: TrainSpec, given: set[str]) -> SeFM:
    """The ``init_from`` checkpoint, after checking that the fields set in ``model`` agree with it."""
    net = SeFM.from_pretrained(spec.init_from)
    have, want = net.config.model_dump(), spec.model.model_dump()
    bad = [k for k in sorted(given) if k in have and want[k] != have[k]]
    if bad:
        raise SpecError("init_from and model disagree: " + "; ".join(
            f"model.{k} is {want[k]!r} but the checkpoint at init_from ({spec.init_from}) has {have[k]!r}"
            for k in bad) + ". Leave model out to train the checkpoint's network, or drop init_from to train "
                            "a new one of that size")
    return net


def train_incontext(spec: "TrainSpec | dict | str | Path", **overrides: Any) -> dict:
    """Train SeFM on synthesised in-context pairs and save the checkpoint.

    Args:
        spec: a TrainSpec, its dict, or a YAML path; overrides: dotted keys (``**{"steps": 10}``).

    Returns:
        summary: output, steps, seconds, first_loss / last_loss (mean over the first/last
        ``log_every`` steps), losses (per step), parameters.
    """
    # 1. spec, seeds, network
    original = spec
    spec = validate_spec(TrainSpec, spec, overrides)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    net = load_init(spec, _model_fields_given(original, spec, overrides)) if spec.init_from else SeFM(spec.model)
    net.to(spec.device).train()
    layout, cell = net.config.layout, net.config.cell
    # 2. data
    pool = ScenePool(rng, spec.image_size, spec.pool_size, list(spec.components))
    fixed = make_batch(rng, pool, list(spec.components), spec.examples, cell, layout) if spec.examples else None
    # 3. optimiser: AdamW, linear warm-up then cosine decay
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.lr * (step + 1) / spec.warmup_steps
        frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    # 4. loop
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(spec.steps):
        if step > 0 and spec.time_budget_s and time.perf_counter() - t0 > spec.time_budget_s:
            break  # never before the first step: a run always has a loss to report
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if fixed is None:
            x, y, m = make_batch(rng, pool, list(spec.components), spec.batch_size, cell, layout)
        else:
            idx = [(step * spec.batch_size + i) % spec.examples for i in range(spec.batch_size)]
            x, y, m = (t[idx] for t in fixed)
        loss = answer_l1(net, x.to(spec.device), y.to(spec.device), layout, m.to(spec.device), spec.component_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % spec.log_every == 0:
            print(f"step {step + 1}/{spec.steps} l1 {np.mean(losses[-spec.log_every:]):.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    # 5. save
    net.eval()
    save_checkpoint(net.cpu(), spec.output, spec.storage)
    k = max(1, min(spec.log_every, len(losses) // 2))
    return {"output": spec.output, "steps": len(losses), "seconds": round(time.perf_counter() - t0, 2),
            "first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])),
            "losses": losses, "parameters": int(sum(p.numel() for p in net.parameters()))}
