"""foba throughput: the labeler's images/s next to the bare UNet passes it needs (the ceiling), and the
labeling speed with the trained segmentation network.

The ceiling is ``attention_steps`` + ``inpaint_steps`` plain UNet forwards on the same batch (default
processors, no attention capture, no VAE, no mask post-processing). The models are the tiny random Stable
Diffusion checkpoints of tests/foba_tiny.py (base + inpainting; the same architecture as SD at a fraction
of the width), so the figures measure the method's overhead around the UNet, not SD's own speed. The
segmentation network is the published size (width 64, 128 px input) with random weights.

    python bench/bench_foba.py [--resolution 128] [--batch 2] [--batches 2] [--threads 2]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2, help="timed batches (after one warm-up)")
    ap.add_argument("--attention-steps", type=int, default=40)
    ap.add_argument("--inpaint-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from foba_tiny import build_tiny_foba, build_tiny_segnet

    from pseudolabel.models.attention import encode_text
    from pseudolabel.models.foba import FoBa
    from pseudolabel.schemas.spec import LabelerSpec

    tmp = tempfile.mkdtemp(prefix="bench-foba-")
    pair = build_tiny_foba(os.path.join(tmp, "sd"))
    params = {"resolution": args.resolution, "attention_steps": args.attention_steps, "attention_stride": 20,
              "inpaint_steps": args.inpaint_steps, "inpaint_weights": pair["inpaint"]}
    lab = FoBa(LabelerSpec(name="foba", weights=pair["base"], params=params, ontology=[{"category": "cat"}]),
               device=args.device)
    seg = FoBa(LabelerSpec(name="foba", weights=pair["base"], ontology=[{"category": "cat"}],
                           params={"segmentation_weights": build_tiny_segnet(os.path.join(tmp, "seg"), 64, 128)}),
               device=args.device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (args.resolution, args.resolution, 3), dtype=np.uint8) for _ in range(args.batch)]

    # 1. the labeler, end to end on decoded images
    lab(images)                                            # warm-up
    t0 = time.perf_counter()
    for _ in range(args.batches):
        lab(images)
    labeler_s = (time.perf_counter() - t0) / args.batches

    # 2. the segmentation network
    seg(images)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        seg(images)
    seg_s = (time.perf_counter() - t0) / args.batches

    # 3. the bare UNet passes it needs
    unet = lab.sd.unet
    dtype = next(unet.parameters()).dtype
    side = args.resolution // 8
    lat = torch.randn(args.batch, 4, side, side, device=args.device, dtype=dtype)
    with torch.inference_mode():
        emb = encode_text(lab.sd.tokenizer, lab.sd.text_encoder, "a photo of a cat")[0].expand(args.batch, -1, -1)
        passes = args.attention_steps + args.inpaint_steps
        t = torch.tensor(500, device=args.device)
        unet(lat, t, encoder_hidden_states=emb)            # warm-up
        t0 = time.perf_counter()
        for _ in range(args.batches):
            for _ in range(passes):
                unet(lat, t, encoder_hidden_states=emb)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        bare_s = (time.perf_counter() - t0) / args.batches

    n = args.batch
    print(f"# foba, tiny random SD, {args.resolution}px, batch {n}, {args.attention_steps}+{args.inpaint_steps} "
          f"UNet passes, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"| {'what':<34} | {'s/batch':>8} | {'images/s':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|")
    print(f"| {'foba labeler (end to end)':<34} | {labeler_s:8.2f} | {n / labeler_s:8.3f} |")
    print(f"| {f'bare UNet passes ({passes})':<34} | {bare_s:8.2f} | {n / bare_s:8.3f} |")
    print(f"| {'labeler / ceiling':<34} | {'':>8} | {bare_s / labeler_s:8.2f} |")
    print(f"| {'segmentation network (end to end)':<34} | {seg_s:8.2f} | {n / seg_s:8.3f} |")


if __name__ == "__main__":
    main()
