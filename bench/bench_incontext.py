"""Benchmark of the ``incontext`` labeler: a small SeFM trained on CPU vs the identity and vs OpenCV
inpainting given the true mask, on held-out demo-data watermark and shadow images; images/s per backend.

    python bench/bench_incontext.py --train-seconds 300          # trains, then evaluates
    python bench/bench_incontext.py --checkpoint /tmp/sefm-small # evaluates an existing checkpoint

Prints one table (PSNR/SSIM in dB / [0, 1] against the clean ground truth; images/s on this machine).
The SegGPT row uses a tiny random-weight SegGPT (no hub access here): its images/s measures the
pipeline's overhead, its quality is meaningless.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def held_out(component: str, n: int, size: int, seed: int):
    """n (query, clean target, true mask) triples of one component type, plus one demo pair (from an n+1-th)."""
    from pseudolabel.jobs.demo.data import add_watermark, render_scene

    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n + 1):
        if component == "watermark":
            clean = render_scene(rng, size, shadow_prob=0.0, watermark_prob=0.0).clean
            query, mask = add_watermark(clean, rng)
        else:
            s = render_scene(rng, size, shadow_prob=1.0, watermark_prob=0.0)
            query, clean, mask = s.image, s.clean, s.shadow_mask
        items.append((query, clean, mask))
    demo = items.pop(int(np.argmax([m.sum() for _, _, m in items])))  # the clearest example demonstrates
    return items, (demo[0], demo[1])


def psnr_ssim(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return (float(peak_signal_noise_ratio(target, pred, data_range=255)),
            float(structural_similarity(target, pred, channel_axis=2, data_range=255)))


def _png(path: str, rgb: np.ndarray) -> str:
    cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def main() -> int:
    from pseudolabel.jobs.training.incontext import small_config, train_incontext
    from pseudolabel.models.incontext.component import dilate
    from pseudolabel.models.inpainting import inpaint_opencv
    from pseudolabel.models.registry import labeler_class
    from pseudolabel.schemas.spec import LabelerSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--train-seconds", type=float, default=300)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--cell", type=int, default=32)
    ap.add_argument("--components", default="watermark")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-incontext-")
    comps = args.components.split(",")

    # 1. train (or load) the small SeFM
    train_info = "given checkpoint"
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(tmp, "sefm")
        s = train_incontext({"output": ckpt, "model": small_config(args.cell).model_dump(), "components": comps,
                             "image_size": args.cell, "steps": args.steps, "batch_size": 8, "lr": 2e-3,
                             "warmup_steps": 10, "component_weight": 4.0, "time_budget_s": args.train_seconds,
                             "threads": args.threads,
                             # the small network's recipe as measured below: one component per scene, plain L1
                             "scene_components": 1, "adversarial_weight": 0.0, "grad_clip": 1.0,
                             "log_every": 50})
        train_info = (f"{s['steps']} steps in {s['seconds']:.0f}s, {s['parameters']} params, "
                      f"L1 {s['first_loss']:.4f} -> {s['last_loss']:.4f}")

    # 2. evaluate per component on held-out images (seed 1000+, unseen in training)
    rows = []
    from test_incontext_seggpt import save_tiny_seggpt

    seggpt_dir = save_tiny_seggpt(os.path.join(tmp, "seggpt"))
    for k, comp in enumerate(["watermark", "shadow"]):
        items, (d_in, d_out) = held_out(comp, args.images, args.cell, seed=1000 + k)
        demo_in = _png(os.path.join(tmp, f"{comp}_in.png"), d_in)
        demo_out = _png(os.path.join(tmp, f"{comp}_out.png"), d_out)
        queries = [q for q, _, _ in items]
        targets = [t for _, t, _ in items]
        sefm = labeler_class("incontext")(LabelerSpec(name="incontext", weights=ckpt, params={
            "backend": "sefm", "demo_in": demo_in, "demo_out": demo_out}))
        seggpt = labeler_class("incontext")(LabelerSpec(name="incontext", weights=seggpt_dir, params={
            "backend": "seggpt+inpaint", "demo_in": demo_in, "demo_out": demo_out}))
        methods = {
            "identity (query as is)": (lambda qs: qs, None),
            f"sefm small ({'+'.join(comps)})": (lambda qs, lab=sefm: [o.layers["clean"] for o in lab(qs)], sefm),
            "opencv inpaint, true mask": (None, None),
            "seggpt+inpaint (tiny random)": (lambda qs, lab=seggpt: [o.layers["clean"] for o in lab(qs)], seggpt),
        }
        for name, (fn, _) in methods.items():
            t0 = time.perf_counter()
            if fn is None:
                preds = [inpaint_opencv(q, dilate(m, 1), 3) for q, _, m in items]
            else:
                preds = []
                for i in range(0, len(queries), 8):
                    preds += fn(queries[i:i + 8])
            dt = time.perf_counter() - t0
            scores = np.array([psnr_ssim(p, t) for p, t in zip(preds, targets)])
            rows.append((comp, name, scores[:, 0].mean(), scores[:, 1].mean(), len(preds) / dt))

    # 3. one table
    print(f"\nincontext bench: {args.images} held-out {args.cell}px images per component; SeFM: {train_info}")
    print(f"{'component':<10} {'method':<34} {'PSNR dB':>8} {'SSIM':>6} {'img/s':>8}")
    for comp, name, p, s_, ips in rows:
        print(f"{comp:<10} {name:<34} {p:8.2f} {s_:6.3f} {ips:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
