"""The engine vs the Ray Data job a user would write by hand, with the same labelers and encoder.

Both label the quickstart's demo images (256 px PNG, local folder) with the quickstart's labelers
(``classical_grabcut`` + ``classical_tokens``), each from a cold start in its own process (Ray start
included), alternating engine / hand-written:

- **engine**: ``pseudolabel.run`` on examples/quickstart.yaml (listing, manifest, checkpointed write);
- **hand-written**: ``ray.data.read_images`` -> ``map_batches`` with one actor class that builds both
  labelers once and runs them plus ``encode_output`` (two actors) -> ``write_parquet``.

    python bench/bench_handwritten.py --images 200 --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")


class BothLabelers:
    """What a user writes: both labelers built once per actor; label, encode, one row per image."""

    def __init__(self):
        import yaml

        from pseudolabel.models.registry import labeler_class
        from pseudolabel.schemas.spec import LabelerSpec

        with open(QUICKSTART) as f:
            specs = yaml.safe_load(f)["labelers"]
        self.labelers = [(s["name"], labeler_class(s["name"])(LabelerSpec.model_validate(s))) for s in specs]

    def __call__(self, batch: dict) -> dict:
        from pseudolabel.engine.encode import encode_output

        images = list(batch["image"])
        rows = {"path": list(batch["path"]), "annotations": [[] for _ in images], "subobjects": [[] for _ in images],
                "layers": [[] for _ in images]}
        for name, lab in self.labelers:
            for i, out in enumerate(lab(images)):
                h, w = images[i].shape[:2]
                rec = encode_output(out, name, h, w, first_id=len(rows["annotations"][i]) + 1)
                for key in ("annotations", "subobjects", "layers"):
                    rows[key][i] += rec[key]
        return rows


def handwritten(images_dir: str, out_dir: str) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    ray.init(include_dashboard=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_images(images_dir, mode="RGB", include_paths=True, file_extensions=["png"])
    ds = ds.map_batches(BothLabelers, batch_size=8, compute=ActorPoolStrategy(size=2), num_cpus=0.5)
    ds.write_parquet(out_dir)
    seconds = time.time() - t0
    import pyarrow.dataset as pads

    n = pads.dataset(out_dir, format="parquet").count_rows()
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def engine(images_dir: str, out_dir: str) -> dict:
    import pseudolabel

    t0 = time.time()
    summary = pseudolabel.run(QUICKSTART, progress=False, **{"input.uri": images_dir, "output.uri": out_dir,
                                                              "input.demo": None})
    seconds = time.time() - t0
    return {"images": summary["labelled"], "seconds": seconds, "images_per_s": summary["labelled"] / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("WHICH", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        which, images, out = args.one
        print(json.dumps((engine if which == "engine" else handwritten)(images, out)))
        return

    import yaml

    from pseudolabel.jobs.demo.data import generate

    demo = yaml.safe_load(open(QUICKSTART))["input"]["demo"]
    from bench_engine import alternating_cold_runs

    with tempfile.TemporaryDirectory() as tmp:
        generate(f"{tmp}/demo", images=args.images, shards=demo["shards"], seed=demo["seed"], size=demo["size"],
                 progress=False)
        results = alternating_cold_runs(__file__, ("engine", "hand-written"), lambda which, k: [
            which.split("-")[0], f"{tmp}/demo/images", f"{tmp}/out-{which}-{k}"], args.pairs)

    print(f"\nmachine: {os.cpu_count()} CPUs; {args.images} quickstart demo images; labelers classical_grabcut + "
          f"classical_tokens; cold starts, {args.pairs} alternating pairs")
    print("| run | images | seconds (median) | images/s | all runs (s) |")
    print("|---|---:|---:|---:|---|")
    med = {}
    for which, runs in results.items():
        med[which] = statistics.median(r["seconds"] for r in runs)
        print(f"| {which} | {runs[0]['images']} | {med[which]:.1f} | {runs[0]['images'] / med[which]:.2f} | "
              f"{', '.join(format(r['seconds'], '.1f') for r in runs)} |")
    print(f"\nengine speed-up over the hand-written job: {med['hand-written'] / med['engine']:.2f}x")


if __name__ == "__main__":
    main()
