"""What a CPU worker pays to load a labeler's host half: the light host class vs the whole labeler class.

Every Ray worker that runs a decode (``prepare``) or host (``postprocess``) task imports the class whose
``host_half`` it builds, once per worker process. For labelers listed in ``models.registry.HOST_HALVES``
that is a base class without torch; this script measures, in fresh interpreters, the CPU seconds and
the peak resident memory of importing it against importing the whole labeler (what every worker
loaded before), medians of ``--runs``.

    python bench/bench_host_imports.py --runs 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = r"""
import importlib, json, resource, sys, time
module, _, attr = sys.argv[1].partition(":")
t = time.process_time()
getattr(importlib.import_module(module), attr)
print(json.dumps({"cpu_s": time.process_time() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch": "torch" in sys.modules}))
"""


def probe(target: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, target], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from pseudolabel.models.registry import HOST_HALVES, LABELERS

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| labeler | class imported | CPU s | peak RSS (MB) | torch loaded |")
    print("|---|---|---:|---:|---|")
    for name, host in HOST_HALVES.items():
        for target in (host, LABELERS[name]):
            runs = [probe(target) for _ in range(args.runs)]
            cpu = statistics.median(r["cpu_s"] for r in runs)
            rss = statistics.median(r["rss_mb"] for r in runs)
            print(f"| {name} | `{target.split(':')[1]}` | {cpu:.2f} | {rss:.0f} | {runs[0]['torch']} |")


if __name__ == "__main__":
    main()
