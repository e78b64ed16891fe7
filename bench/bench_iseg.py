"""Throughput of the iseg labeler against the bare UNet pass it needs (the ceiling).

iSeg needs exactly one UNet pass per image (more only when the classes overflow one prompt). Rows:

- ``unet pass (ceiling)``: ``noisy_unet_pass`` on pre-encoded latents and text, no capture;
- ``unet pass + capture``: the same with iseg's attention capture installed (the reference's cross
  layers at factors 2/4 per head, self-attention heads [1, 2] at up_blocks.3.attentions.1);
- ``iseg text`` / ``iseg seeds``: the labeler on pre-decoded uint8 images (resize, VAE encode, text
  encode, the pass, k-means, entropy reduction, refinement, masks at image size).

By default a tiny random SD with SD 2.1's layer names and head counts (tests/iseg_tiny.py) is built in
a temp dir; ``--weights`` takes a real diffusers-layout checkpoint instead.

    python bench/bench_iseg.py [--resolutions 64 128 256] [--batch 4] [--rounds 5] [--weights DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch


def _median_rates(fns: dict, rounds: int, batch: int) -> dict[str, tuple[float, float]]:
    """Per function: (images/s by wall clock, CPU seconds per image of this process), medians over
    ``rounds`` rounds that each call every function once (interleaved, so a change in the machine's
    load hits every row alike; CPU time is the steadier figure on a shared machine)."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - t0, time.process_time() - c0))
    out = {}
    for name, vals in samples.items():
        wall = float(np.median([v[0] for v in vals]))
        cpu = float(np.median([v[1] for v in vals]))
        out[name] = (batch / wall, cpu / batch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one batch per row each); medians reported")
    ap.add_argument("--weights", default=None, help="diffusers SD checkpoint (default: a tiny random one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from pseudolabel.models.attention import (
        AttentionStore,
        capture_attention,
        encode_image,
        encode_text,
        noisy_unet_pass,
    )
    from pseudolabel.models.iseg import REFERENCE_CROSS_LAYERS, HeadSetStore, ISeg
    from pseudolabel.schemas.spec import LabelerSpec

    weights = args.weights
    if weights is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from iseg_tiny import build_sd21_tiny

        weights = build_sd21_tiny(tempfile.mkdtemp(prefix="bench_iseg_"))
    ontology = [{"category": c} for c in ("cat", "dog", "sky")]
    rng = np.random.default_rng(0)
    rows = []
    for res in args.resolutions:
        spec = LabelerSpec(name="iseg", weights=weights, ontology=ontology, params={"resolution": res})
        lab = ISeg(spec, device=args.device)
        sd = lab.sd
        images = [rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(args.batch)]
        with torch.inference_mode():
            latents = encode_image(sd.vae, np.stack(images))
            emb, _ = encode_text(sd.tokenizer, sd.text_encoder, ["a photograph of cat and dog and sky"] * args.batch)

        def bare(sd=sd, latents=latents, emb=emb):
            with torch.inference_mode():
                noisy_unet_pass(sd.unet, sd.scheduler, latents, 100, emb, generator=torch.Generator().manual_seed(0))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def captured(sd=sd, latents=latents, emb=emb):
            cross = AttentionStore(layers=REFERENCE_CROSS_LAYERS, kind="cross", factors=[2, 4], per_head=True)
            selfs = HeadSetStore({"text": [1, 2]}, layers=["up_blocks.3.attentions.1"], kind="self")
            with torch.inference_mode(), capture_attention(sd.unet, cross), capture_attention(sd.unet, selfs):
                noisy_unet_pass(sd.unet, sd.scheduler, latents, 100, emb, generator=torch.Generator().manual_seed(0))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        seed = {"points_xy": [[res // 4, res // 4]], "boxes_xyxy": [[res // 2, res // 2, res - 1, res - 1]]}
        seeds = [seed] * args.batch
        rates = _median_rates({
            "unet pass (ceiling)": bare,
            "unet pass + capture": captured,
            "iseg text (3 classes)": lambda lab=lab, images=images: lab(images, [None] * args.batch),
            "iseg seeds (point+box)": lambda lab=lab, images=images, seeds=seeds: lab(images, seeds),
        }, args.rounds, args.batch)
        r_bare = rates["unet pass (ceiling)"]
        for name, (r, c) in rates.items():
            rows.append((res, name, r, r / r_bare[0], c, r_bare[1] / c))

    print(f"# iseg on {args.device} ({platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}), batch {args.batch}, median of {args.rounds} rounds, weights "
          f"{'tiny random SD' if args.weights is None else args.weights}")
    print(f"| {'resolution':>10} | {'what':<24} | {'images/s':>9} | {'of ceiling':>10} | {'cpu s/image':>11} | "
          f"{'of ceiling (cpu)':>16} |")
    print(f"|{'-' * 12}|{'-' * 26}|{'-' * 11}|{'-' * 12}|{'-' * 13}|{'-' * 18}|")
    for res, name, r, frac, c, cfrac in rows:
        print(f"| {res:>10} | {name:<24} | {r:>9.2f} | {frac:>10.2f} | {c:>11.3f} | {cfrac:>16.2f} |")


if __name__ == "__main__":
    main()
