"""Where DirectSAM's views are resized: in the decode tasks (``prepare``, the default) or in the actor.

The actor holding the network has one host thread; every millisecond it spends resizing views (PIL, the
checkpoint's resample filter) is a millisecond the GPU waits. Since ``prepare`` the engine resizes in its
CPU fetch+decode tasks and ships the network-sized uint8 views to the actor. Two engine plans over the
same demo images, each from a cold start in its own process, alternating:

- **decode tasks** (default): ``directsam``; views resized by ``prepare`` in the decode tasks;
- **actor**: ``proxy_labelers:DirectSAMResizeInActor``, the same labeler with no ``prepare`` for the
  engine, so its forward resizes the views itself in the actor.

``--labeler proxy`` (the default here, no GPU): ``proxy_labelers:ResizedViews`` /
``ResizedViewsInActor``, DirectSAM's view preparation with a device half that costs nothing (as a GPU's
forward nearly does next to a CPU resize) and DirectSAM's host half; ``--labeler directsam``: the real
labeler with a random Segformer of ``--size`` (for a GPU machine). Prints seconds, images/s, steady state
(after the first labels file) and the actor's seconds per image (the summary's ``device`` phase): the
figure that bounds a GPU actor's rate.

    python bench/bench_prepare.py --images 200 --image-size 512 --resolution 1024 --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

LABELERS = {
    "directsam": {"decode tasks": "directsam", "actor": "proxy_labelers:DirectSAMResizeInActor"},
    "proxy": {"decode tasks": "proxy_labelers:ResizedViews", "actor": "proxy_labelers:ResizedViewsInActor"},
}


def save_model(path: str, size: str, resolution: int) -> str:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    from pseudolabel.models.directsam import segformer_config

    SegformerForSemanticSegmentation(segformer_config(size)).save_pretrained(path)
    SegformerImageProcessorPil(size={"height": resolution, "width": resolution}).save_pretrained(path)
    return path


def one_run(images_uri: str, out_uri: str, labeler: str, weights: str, layers: str, resolution: str) -> dict:
    from bench_engine import run_with_first_file

    if labeler.startswith("proxy_labelers:Resized"):
        spec = {"name": labeler, "params": {"pyramid_layers": int(layers), "resolution": int(resolution)}}
    else:
        spec = {"name": labeler, "weights": weights, "dtype": "float32",
                "params": {"pyramid_layers": int(layers), "threshold": 0.5}}
    job = {"input": {"uri": images_uri}, "output": {"uri": out_uri}, "labelers": [spec],
           "resources": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 8, "decode_batch_size": 8}}
    summary, figures = run_with_first_file(job)
    phases, n = summary["labeler_seconds"][0], max(summary["labelled"], 1)
    return {**figures, "actor_s_per_image": phases.get("device", 0) / n,
            "prepare_s_per_image": phases.get("prepare", 0) / n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--size", default="tiny", help="Segformer size (tiny, b0..b5)")
    parser.add_argument("--layers", type=int, default=0, help="pyramid layers")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--labeler", choices=tuple(LABELERS), default="proxy")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one)))
        return

    from bench_engine import alternating_cold_runs

    from pseudolabel.jobs.demo.data import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(f"{tmp}/demo", images=args.images, shards=4, seed=0, size=args.image_size, progress=False)
        weights = save_model(f"{tmp}/segformer", args.size, args.resolution) if args.labeler == "directsam" else ""
        plans = LABELERS[args.labeler]
        results = alternating_cold_runs(__file__, tuple(plans), lambda which, k: [
            f"{tmp}/demo/images", f"{tmp}/out-{which.replace(' ', '-')}-{k}", plans[which], weights,
            str(args.layers), str(args.resolution)], args.pairs)

    what = (f"directsam Segformer-{args.size}, float32" if args.labeler == "directsam"
            else "proxy (DirectSAM's view resize, no network)")
    print(f"\nmachine: {os.cpu_count()} CPUs; {args.images} demo images of {args.image_size}px; {what} at "
          f"{args.resolution}px, pyramid {args.layers}; medians of {args.pairs}")
    print("| views resized in | seconds | images/s | steady images/s | actor s/image | prepare s/image |")
    print("|---|---:|---:|---:|---:|---:|")
    keys = ("seconds", "images_per_s", "steady_images_per_s", "actor_s_per_image", "prepare_s_per_image")
    med = {}
    for which, runs in results.items():
        med[which] = {k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None
                      for k in keys}
        print(f"| {which} | " + " | ".join("–" if med[which][k] is None else f"{med[which][k]:.{d}f}"
                                           for k, d in zip(keys, (1, 2, 2, 4, 4))) + " |")
    a, b = med["decode tasks"], med["actor"]
    print(f"\nactor seconds per image: {b['actor_s_per_image'] / a['actor_s_per_image']:.2f}x less with prepare; "
          f"steady state {a['steady_images_per_s'] / b['steady_images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
