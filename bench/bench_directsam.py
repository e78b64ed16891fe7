"""DirectSAM throughput: end to end through the engine vs the labeler in-process vs the model alone
(ceiling) vs the reference's one-view-at-a-time loop.

A randomly initialised Segformer of the given size (B0 by default; the public checkpoint is B5) saved
with save_pretrained, on demo-data images. Rows (images/s and tokens/s):

- ``engine``: ``pseudolabel.run`` over PNG files (fetch, decode, labeler actor, encode, Parquet write);
  Ray is started before the clock runs.
- ``labeler``: ``DirectSAM(...)(images)`` on decoded arrays, batched views (pyramid + tokens).
- ``model ceiling``: the network alone in a tight loop on pre-made normalised tensors, one forward per
  batch of views (no preprocessing, upsampling or tokens).
- ``reference loop``: one view per forward pass, preprocessing by the PIL image processor, numpy
  accumulation (``reference_pyramid_probs``), then the same tokens.

    python bench/bench_directsam.py --size b0 --resolution 512 --images 6 --layers 0 1
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="b0")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-size", type=int, default=4, help="views per forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-engine", action="store_true")
    args = ap.parse_args()

    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    import pseudolabel
    from pseudolabel.jobs.demo.data import generate, render_index
    from pseudolabel.jobs.outputs.labels_io import read_labels
    from pseudolabel.models.device import resolve_dtype
    from pseudolabel.models.directsam import DirectSAM, segformer_config
    from pseudolabel.models.directsam_pyramid import reference_pyramid_probs
    from pseudolabel.models.directsam_views import image_views
    from pseudolabel.models.tokens import boundary_to_tokens
    from pseudolabel.schemas.spec import LabelerSpec

    tmp = tempfile.mkdtemp(prefix="bench-directsam-")
    os.environ.setdefault("PSEUDOLABEL_CACHE", os.path.join(tmp, "cache"))
    # 1. model and data
    torch.manual_seed(0)
    model_dir = os.path.join(tmp, "model")
    SegformerForSemanticSegmentation(segformer_config(args.size)).save_pretrained(model_dir)
    SegformerImageProcessorPil(size={"height": args.resolution, "width": args.resolution}).save_pretrained(model_dir)
    data = os.path.join(tmp, "demo")
    generate(data, images=args.images, shards=1, size=args.image_size, progress=False)
    images = [render_index(0, i, args.image_size).image for i in range(args.images)]
    dtype = resolve_dtype(args.dtype, args.device, DirectSAM.cuda_dtype)
    rows = []
    for layers in args.layers:
        # random weights are uncalibrated: threshold at the median of the maps so images get many tokens
        probe = DirectSAM(LabelerSpec(name="directsam", weights=model_dir, dtype=args.dtype,
                                      params={"pyramid_layers": layers}), device=args.device)
        threshold = float(probe.boundary_maps(images[:1])[0].float().median())
        params = {"threshold": threshold, "pyramid_layers": layers, "batch_size": args.batch_size,
                  "mode": "partition", "max_tokens": None}
        spec = LabelerSpec(name="directsam", weights=model_dir, dtype=args.dtype, params=params)
        lab = DirectSAM(spec, device=args.device)
        views = sum(len(image_views(im.shape[1], im.shape[0], layers)) for im in images)

        # 2. labeler in-process (warm-up on one image first)
        lab(images[:1])
        t = time.perf_counter()
        outs = []
        for i in range(0, len(images), args.batch_size):
            outs += lab(images[i:i + args.batch_size])
        dt = time.perf_counter() - t
        n_tok = sum(int(o.tokens.label_map.max()) for o in outs)
        rows.append((layers, "labeler", len(images) / dt, n_tok / dt))

        # 3. model ceiling: the same number of views, pre-made tensors
        x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=args.device, dtype=dtype)
        with torch.inference_mode():
            lab.model(pixel_values=x)
            t = time.perf_counter()
            done = 0
            while done < views:
                n = min(args.batch_size, views - done)
                lab.model(pixel_values=x[:n])
                done += n
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append((layers, "model ceiling", len(images) / dt, float("nan")))

        # 4. reference-style loop: one view per forward, PIL preprocessing, numpy accumulation
        proc = SegformerImageProcessorPil()
        t = time.perf_counter()
        n_tok = 0
        for im in images:
            prob = reference_pyramid_probs(im, proc, lab.model, args.resolution, layers)
            n_tok += int(boundary_to_tokens(prob, threshold, "partition").label_map.max())
        dt = time.perf_counter() - t
        rows.append((layers, "reference loop", len(images) / dt, n_tok / dt))

        # 5. engine end to end (Ray started before timing)
        if not args.no_engine:
            import ray

            if not ray.is_initialized():
                ray.init(include_dashboard=False, log_to_driver=False)
            out = os.path.join(tmp, f"out-{layers}")
            job = {"name": "bench-directsam", "input": {"uri": os.path.join(data, "images"), "format": "folder"},
                   "output": {"uri": out},
                   "labelers": [{"name": "directsam", "weights": model_dir, "dtype": args.dtype, "params": params}],
                   "resources": {"actors": 1, "batch_size": args.batch_size,
                                 "gpus_per_actor": 1 if args.device.startswith("cuda") else 0,
                                 "cpus_per_actor": 1}}
            t = time.perf_counter()
            pseudolabel.run(job, progress=False)
            dt = time.perf_counter() - t
            table = read_labels(out, columns=["subobjects"]).to_pylist()
            n_tok = sum(len(r["subobjects"] or []) for r in table)
            rows.append((layers, "engine (Ray, incl. actor start)", len(images) / dt, n_tok / dt))

    # 6. the table
    print(f"# DirectSAM bench: Segformer-{args.size} (random weights), {args.resolution} px, {args.images} images "
          f"{args.image_size}x{args.image_size}, views/forward {args.batch_size}, device {args.device} {dtype}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| pyramid layers | path | images/s | tokens/s |")
    print("|---|---|---|---|")
    for layers, name, ips, tps in rows:
        print(f"| {layers} | {name} | {ips:.3f} | {'-' if np.isnan(tps) else f'{tps:.1f}'} |")


if __name__ == "__main__":
    main()
