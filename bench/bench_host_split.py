"""Host halves in parallel CPU tasks vs inside the labeler's actor, with a device half that costs nothing.

A CPU-only proxy for "the GPU never waits for the host": ``proxy_labelers:FixedMaps`` hands over a fixed
boundary map (no network) and runs DirectSAM's host half (partition tokens, scores; then RLE encoding).
Two engine plans over the same demo images (local folder), each from a cold start in its own process,
alternating:

- **tasks** (default, ``resources.host: tasks``): the actor runs ``forward``; ``postprocess`` + encoding
  run in CPU tasks, as many at once as the CPUs allow;
- **actor** (``resources.host: actor``): the actor runs the whole labeler and the encoding, as the
  engine did before the split.

Same resources otherwise: one actor at 0.25 CPU, batch ``--batch`` (8), decode batch ``--decode-batch``
(the engine's default), host tasks at ``--host-cpus`` (0.5: three fit next to the actor and a decode task
on 2 cores). Prints one table: seconds, images/s, and the
steady-state rate (after the first labels file is committed).

    python bench/bench_host_split.py --images 300 --size 512 --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile


def one_run(images_uri: str, out_uri: str, host: str, host_cpus: str, batch: str = "8",
            decode_batch: str = "16") -> dict:
    from bench_engine import run_with_first_file

    job = {"input": {"uri": images_uri}, "output": {"uri": out_uri},
           "labelers": [{"name": "proxy_labelers:FixedMaps"}],
           "resources": {"actors": 1, "cpus_per_actor": 0.25, "batch_size": int(batch),
                         "decode_batch_size": int(decode_batch), "host_cpus": float(host_cpus), "host": host}}
    return run_with_first_file(job)[1]


def main() -> None:
    from pseudolabel.schemas.spec import ResourcesSpec

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--host-cpus", type=float, default=0.5, help="resources.host_cpus of both plans")
    parser.add_argument("--batch", type=int, default=8, help="resources.batch_size of both plans (the actor's)")
    parser.add_argument("--decode-batch", type=int, default=ResourcesSpec.model_fields["decode_batch_size"].default,
                        help="resources.decode_batch_size of both plans "
                        "(rows per decode task, and so per host task and written file)")
    parser.add_argument("--one", nargs=6, metavar=("IMAGES_URI", "OUT_URI", "HOST", "HOST_CPUS", "BATCH", "DECODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one)))
        return

    from bench_engine import alternating_cold_runs

    from pseudolabel.jobs.demo.data import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(f"{tmp}/demo", images=args.images, shards=4, seed=0, size=args.size, progress=False)
        results = alternating_cold_runs(__file__, ("tasks", "actor"), lambda host, k: [
            f"{tmp}/demo/images", f"{tmp}/out-{host}-{k}", host, str(args.host_cpus), str(args.batch),
        str(args.decode_batch)], args.pairs)

    print(f"\nmachine: {os.cpu_count()} CPUs; {args.images} demo images of {args.size}px; "
          f"labeler proxy_labelers:FixedMaps (no network; DirectSAM host half); batch {args.batch}, "
          f"decode batch {args.decode_batch}; "
          f"medians of {args.pairs} runs")
    print("| host halves | seconds | images/s | steady images/s | first file (s) |")
    print("|---|---:|---:|---:|---:|")
    med = {}
    for host, runs in results.items():
        med[host] = {key: statistics.median(r[key] for r in runs) if all(r[key] for r in runs) else None
                     for key in ("seconds", "images_per_s", "steady_images_per_s", "first_file_s")}
        print(f"| {host} | " + " | ".join("–" if med[host][key] is None else f"{med[host][key]:.{d}f}" for key, d in (
            ("seconds", 1), ("images_per_s", 2), ("steady_images_per_s", 2), ("first_file_s", 1))) + " |")
    ratio = {key: med["tasks"][key] / med["actor"][key] if med["tasks"][key] and med["actor"][key] else float("nan")
             for key in ("images_per_s", "steady_images_per_s")}
    print(f"\ntasks / actor: {ratio['images_per_s']:.2f}x end to end, {ratio['steady_images_per_s']:.2f}x steady state")

if __name__ == "__main__":
    main()
