"""``train-incontext``: train a SeFM checkpoint on multi-semantic in-context examples from demo data.

SeFM has no public weights; this job makes a checkpoint the ``incontext`` labeler (backend ``sefm``)
loads. Examples come from ``incontext_data``: two scenes with the same two (``scene_components``) or
more component kinds — shadows, watermarks, logos, objects of a shape category — where the
demonstration pair removes one kind and keeps the others, and the target removes the same kind from
the query scene and keeps the others. The demonstration decides what goes.

Network and loss follow SeFM's training:

- network: ``model`` (default: the published ``sefm`` architecture at cell 256, i.e. a 512×512
  canvas; ``small_config`` gives a ``sefm-small`` for CPU);
- loss on the answer cell: L1(answer, target) + ``adversarial_weight`` (0.3) · BCE(D(answer), 0),
  where D, a component-type discriminator with 20 outputs (``models/incontext/sefm_loss.py``), is
  trained in the same step, before the network, on BCE(D(target), 0) + BCE(D(answer), removed types);
  ``component_weight`` > 0 adds weight to the L1 on the component's pixels (0: SeFM's plain L1);
- optimisers: Adam (betas 0.9 / 0.999, eps 1e-8), lr 2e-4 for both, batch 8; the network's lr follows
  a cosine from ``lr`` to ``min_lr`` (1e-6) over ``steps`` after ``warmup_steps`` (0) of linear warm-up;
  no gradient clipping unless ``grad_clip`` is set.

CPU tests and quick runs override the sizes (``model``, ``image_size``, ``batch_size``, ...). Usage::

    pseudolabel train-incontext JOB.yaml --set steps=500
    # JOB.yaml: {output: /tmp/sefm, device: cuda, steps: 20000}   (the published scale, for a GPU)
    # or       {output: /tmp/sefm-small, model: {arch: sefm-small, width: 12, enc_blocks: [1, 2],
    #           dec_blocks: [1], refine_blocks: 1, heads: [1, 2], cell: 32}, image_size: 32, lr: 2e-3}

or ``train_incontext({...})`` from Python; the checkpoint directory (local or s3://) holds
``config.json`` (with the architecture) + ``model.safetensors``. The discriminator is not saved.

Fine-tuning: ``init_from`` a checkpoint trains that network, with the checkpoint's configuration. A
``model`` given as well must agree with it on every field it sets (it may be left out); a field that
disagrees is an error naming both (``SpecError``), never silently dropped. At least one step always
runs, whatever ``time_budget_s`` says.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pseudolabel import storage as st
from pseudolabel.jobs.training.common import start
from pseudolabel.jobs.training.incontext_data import KINDS, MAX_SCENE_KINDS, Kind, make_batch
from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.sefm import SeFM, SeFMConfig
from pseudolabel.models.incontext.sefm_loss import (
    ADVERSARIAL_WEIGHT,
    ComponentDiscriminator,
    discriminator_loss,
    sefm_loss,
)
from pseudolabel.schemas.spec import SpecError, StorageSpec

Component = Kind


def small_config(cell: int = 64, layout: cv.Layout = "grid") -> SeFMConfig:
    """A small ``sefm-small`` (about 35k parameters) that trains on CPU in minutes: width 12, two levels."""
    return SeFMConfig(arch="sefm-small", in_channels=3 if layout == "grid" else 6, width=12, enc_blocks=[1, 2],
                      dec_blocks=[1], refine_blocks=1, heads=[1, 2], ffn_expansion=2.0, cell=cell, layout=layout)


class TrainSpec(BaseModel):
    """What ``train_incontext`` trains and where it writes the checkpoint. Defaults: SeFM's training."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(description="checkpoint directory: local path or s3:// prefix")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    model: SeFMConfig = Field(default_factory=SeFMConfig, description="architecture and size; cell and layout "
                                                                      "included (default: the published sefm at "
                                                                      "cell 256; with init_from: the checkpoint's)")
    init_from: str | None = Field(None, description="start from this checkpoint directory (local); a model given "
                                                    "too must agree with the checkpoint on every field it sets")
    components: list[Component] = Field(default_factory=lambda: list(KINDS), min_length=1,
                                         description="component kinds the demonstrations remove")
    kept_components: list[Component] | None = Field(None, description="kinds that may stay in a scene next to the "
                                                                      "removed one (default: every kind)")
    scene_components: int = Field(2, ge=1, le=MAX_SCENE_KINDS,
                                  description="component kinds per scene: the removed one and the rest kept "
                                              "(1: one component and nothing to keep)")
    image_size: int = Field(256, ge=32, description="side of the rendered scenes (px), resized to the cell")
    pool_size: int = Field(256, ge=1, description="backgrounds rendered up front; objects and components are "
                                                  "drawn fresh per example")
    examples: int | None = Field(None, ge=1, description="synthesise this many examples once and cycle through "
                                                         "them (a fixed training set); None: fresh examples each step")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    adversarial_weight: float = Field(ADVERSARIAL_WEIGHT, ge=0, description="weight of BCE(D(answer), 0) in the "
                                                                            "loss (0: no discriminator)")
    component_weight: float = Field(0.0, ge=0, description="extra L1 weight on the query's component pixels "
                                                           "(0: SeFM's plain L1; plain L1 tends to stay at the "
                                                           "identity in short sefm-small runs)")
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine schedule")
    disc_lr: float | None = Field(None, gt=0, description="discriminator lr (default: lr; constant)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="clip the network's gradient norm (default: none)")
    time_budget_s: float | None = Field(None, gt=0, description="stop early after this many seconds "
                                                               "(at least one step runs)")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    device: str = "cpu"
    log_every: int = Field(25, ge=1)


def answer_cell(net: SeFM, x: torch.Tensor, cell: int, layout: cv.Layout) -> torch.Tensor:
    """The answer cells of ``net(x)``: (B, 3, cell, cell)."""
    y0, y1, x0, x1 = cv.answer_box(cell, layout)
    return net(x)[:, :, y0:y1, x0:x1]


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
    if spec.init_from is None:
        raise SpecError("load_init needs init_from")
    net = SeFM.from_pretrained(spec.init_from)
    have, want = net.config.model_dump(), spec.model.model_dump()
    bad = [k for k in sorted(given) if k in have and want[k] != have[k]]
    if bad:
        raise SpecError("init_from and model disagree: " + "; ".join(
            f"model.{k} is {want[k]!r} but the checkpoint at init_from ({spec.init_from}) has {have[k]!r}"
            for k in bad) + ". Leave model out to train the checkpoint's network, or drop init_from to train "
                            "a new one of that size")
    return net


def lr_schedule(spec: TrainSpec):
    """step -> the network's lr: linear warm-up, then a cosine from ``lr`` down to ``min_lr``."""
    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.lr * (step + 1) / spec.warmup_steps
        frac = min(1.0, (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps))
        return spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))

    return lr_at


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def train_incontext(spec: "TrainSpec | dict | str | Path", **overrides: Any) -> dict:
    """Train SeFM on synthesised in-context examples and save the checkpoint.

    Args:
        spec: a TrainSpec, its dict, or a YAML path; overrides: dotted keys (``**{"steps": 10}``).

    Returns:
        summary: output, arch, steps, seconds, first_loss / last_loss (mean over the first/last
        ``log_every`` steps, at most half the run each), losses (the network's loss per step),
        l1_losses, adv_losses and disc_losses (per step; the last two empty without a
        discriminator), parameters.
    """
    # 1. spec, seeds, network, discriminator
    original = spec
    run = start(TrainSpec, spec, overrides)
    spec, rng = run.spec, run.rng
    net = load_init(spec, _model_fields_given(original, spec, overrides)) if spec.init_from else SeFM(spec.model)
    net.to(spec.device).train()
    layout, cell = net.config.layout, net.config.cell
    disc = ComponentDiscriminator().to(spec.device).train() if spec.adversarial_weight > 0 else None
    # 2. data
    from pseudolabel.jobs.demo.data import render_background

    backgrounds = [render_background(rng, spec.image_size) for _ in range(spec.pool_size)]

    def batch(n: int):
        return make_batch(rng, list(spec.components), n, cell, layout, spec.image_size, spec.scene_components,
                          spec.kept_components, backgrounds)

    fixed = batch(spec.examples) if spec.examples else None
    # 3. optimisers: Adam; the network's lr on the schedule, the discriminator's constant
    opt = adam(net.parameters(), spec.lr, spec.weight_decay)
    d_opt = adam(disc.parameters(), spec.disc_lr or spec.lr) if disc is not None else None
    lr_at = lr_schedule(spec)

    # 4. loop
    t0 = time.perf_counter()
    losses: list[float] = []
    logs: dict[str, list[float]] = {"l1": [], "adv": [], "disc": []}
    for step in range(spec.steps):
        if step > 0 and spec.time_budget_s and time.perf_counter() - t0 > spec.time_budget_s:
            break  # never before the first step: a run always has a loss to report
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if fixed is None:
            x, y, m, types = batch(spec.batch_size)
        else:
            idx = [(step * spec.batch_size + i) % len(fixed[0]) for i in range(spec.batch_size)]  # spec.examples
            x, y, m, types = (t[idx] for t in fixed)
        x, y, m, types = (t.to(spec.device) for t in (x, y, m, types))
        out = answer_cell(net, x, cell, layout)
        # 4a. the discriminator first: the clean target holds no component, the answer the removed type
        probs = None
        if disc is not None and d_opt is not None:
            d_loss = discriminator_loss(disc, out, y, types)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            logs["disc"].append(float(d_loss.detach()))
            probs = disc(out)
        # 4b. the network: L1 + adversarial_weight * BCE(D(answer), 0)
        loss, parts = sefm_loss(out, y, probs, spec.adversarial_weight, m, spec.component_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), spec.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        logs["l1"].append(float(parts["l1"].detach()))
        if disc is not None:
            logs["adv"].append(float(parts["adv"].detach()))
        if (step + 1) % spec.log_every == 0:
            extra = (f" adv {np.mean(logs['adv'][-spec.log_every:]):.4f}"
                     f" d {np.mean(logs['disc'][-spec.log_every:]):.4f}"
                     if disc is not None else "")
            print(f"step {step + 1}/{spec.steps} loss {np.mean(losses[-spec.log_every:]):.4f} "
                  f"l1 {np.mean(logs['l1'][-spec.log_every:]):.4f}{extra} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    # 5. save
    net.eval()
    save_checkpoint(net.cpu(), spec.output, spec.storage)
    k = max(1, min(spec.log_every, len(losses) // 2))
    return {"output": spec.output, "arch": net.config.arch, "steps": len(losses),
            "seconds": round(time.perf_counter() - t0, 2),
            "first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])),
            "losses": losses, "l1_losses": logs["l1"], "adv_losses": logs["adv"], "disc_losses": logs["disc"],
            "parameters": int(sum(p.numel() for p in net.parameters()))}
