"""Peak memory of a job on huge-dimension images: the labeler batch pixel budget at work.

Writes ``--images`` single-colour PNGs of ``--side`` x ``--side`` pixels (small files, ~86 KB at 9400 px,
under ``input.max_pixels``), then runs ``pseudolabel.run`` with a classical labeler once per
``resources.max_batch_pixels`` setting, each in a driver process of its own (its own local Ray cluster).
A sampler reads the whole process tree every 0.2 s from /proc: the peak of the summed RSS and of the
summed PSS (shared pages split between the processes that map them, so Ray's shared-memory object store
is not counted once per process). Prints one table.

    python bench/bench_memory.py [--images 8] [--side 9400] [--budgets unbounded,default,small]

``unbounded`` is a budget of 10^12 pixels (batches as they come, the behaviour with no budget),
``default`` the spec's default, ``small`` a quarter of one image; a run whose tree passes ``--cap-gb``
is stopped and reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import yaml

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB (0, 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split(":")[0] in ("Rss", "Pss")}
        return fields.get("Rss", 0), fields.get("Pss", 0)
    except (OSError, ValueError, IndexError):
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE_KB
            return rss, rss
        except (OSError, ValueError, IndexError):
            return 0, 0


def _write_images(folder: str, count: int, side: int) -> int:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    total = 0
    for k in range(count):
        path = os.path.join(folder, f"big_{k:02d}.png")
        Image.new("RGB", (side, side), (30 * k % 255, 120, 200)).save(path, compress_level=9)
        total += os.path.getsize(path)
    return total


def _run(folder: str, out: str, budget: int | None, cap_gb: float) -> dict:
    """One job in its own driver process; returns the peaks, seconds and the job's counts."""
    job = {"input": {"uri": folder}, "output": {"uri": out},
           "labelers": [{"name": "classical_grabcut", "ontology": [{"category": "thing"}]}],
           "resources": {"actors": 1, "decode_batch_size": 16}}
    if budget is not None:
        job["resources"]["max_batch_pixels"] = budget
    spec = os.path.join(os.path.dirname(out), os.path.basename(out) + ".yaml")
    with open(spec, "w") as f:
        yaml.safe_dump(job, f)
    code = "import json, sys, pseudolabel; print(json.dumps(pseudolabel.run(sys.argv[1], progress=False)))"
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, spec], env={**os.environ, "RAY_ADDRESS": ""},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    stopped = False
    while proc.poll() is None:
        rss = pss = 0
        for pid in _tree(proc.pid):
            r, p = _memory_kb(pid)
            rss, pss = rss + r, pss + p
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if pss > cap_gb * 2**20:
            stopped = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    seconds = time.time() - started
    summary = {}
    if not stopped and proc.returncode == 0:
        summary = json.loads(stdout.strip().splitlines()[-1])
    elif not stopped:
        raise SystemExit(f"the job failed:\n{stderr[-3000:]}")
    return {"peak_rss_gb": peak_rss / 2**20, "peak_pss_gb": peak_pss / 2**20, "seconds": seconds,
            "ok": summary.get("ok"), "error": summary.get("error"), "stopped": stopped}


def main() -> None:
    from pseudolabel.schemas.spec import ResourcesSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--side", type=int, default=9400)
    ap.add_argument("--budgets", default="unbounded,default,small")
    ap.add_argument("--cap-gb", type=float, default=10.0, help="stop a run whose process tree passes this (PSS)")
    args = ap.parse_args()

    default = ResourcesSpec().max_batch_pixels
    one = args.side * args.side
    budgets = {"unbounded": 10**12, "default": None, "small": max(1, one // 4)}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        folder = os.path.join(tmp, "images")
        file_bytes = _write_images(folder, args.images, args.side)
        print(f"# {args.images} PNGs of {args.side}x{args.side} ({one / 1e6:.1f} MP, {one * 3 / 2**20:.0f} MiB "
              f"decoded each; {file_bytes / args.images / 1024:.0f} KiB per file); classical_grabcut; "
              f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs")
        print("| max_batch_pixels | peak RSS, tree (GB) | peak PSS, tree (GB) | seconds | ok | error |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in args.budgets.split(","):
            budget = budgets[name]
            shown = f"{name} ({(budget if budget is not None else default):.3g})"
            r = _run(folder, os.path.join(tmp, f"out_{name}"), budget, args.cap_gb)
            note = f" (stopped over {args.cap_gb:g} GB)" if r["stopped"] else ""
            print(f"| {shown} | {r['peak_rss_gb']:.2f}{note} | {r['peak_pss_gb']:.2f} | {r['seconds']:.1f} | "
                  f"{r['ok']} | {r['error']} |", flush=True)


if __name__ == "__main__":
    main()
