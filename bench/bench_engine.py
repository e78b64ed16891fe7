"""Engine benchmark: the quickstart labelers over demo images from S3 (a local S3 server on 127.0.0.1).

Prints one table:
- end to end: ``pseudolabel.run`` (Ray Data streaming, checkpointed Parquet write), images/s, time to
  first committed labels file, peak RSS of the whole process tree (driver + Ray workers);
- ceiling: the same labelers in a tight loop on pre-decoded images in one process;
- naive: one sequential loop (read from S3, decode, label, encode, append to one Parquet file);
- peak RSS again at ``--scale`` times the images, to show memory does not grow with the dataset.

    python bench/bench_engine.py --images 500 --scale 10
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

LABELERS = [
    {"name": "classical_grabcut", "ontology": [{"category": "shape"}]},
    {"name": "classical_tokens"},
]


def tree_rss_mb(root_pid: int, exclude: frozenset[int] = frozenset()) -> float:
    """Resident memory of a process and all its descendants, in MB (from /proc); subtrees rooted at
    ``exclude`` (the S3 server, which holds every object in memory) are left out."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 2**20


def alternating_cold_runs(script: str, variants: tuple[str, str], argv_of, pairs: int) -> dict[str, list[dict]]:
    """Run ``script --one *argv_of(variant, k)`` in a fresh process for each variant, ``pairs`` times,
    alternating which goes first; each run prints one JSON line (its result). bench/ is on the runs'
    PYTHONPATH (benchmark-only labelers) and each starts its own local Ray cluster."""
    import json

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
           "RAY_ADDRESS": ""}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for k in range(pairs):
        for variant in variants if k % 2 == 0 else variants[::-1]:
            out = subprocess.run([sys.executable, script, "--one", *argv_of(variant, k)], env=env,
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"pair {k} {variant}: {results[variant][-1]}", file=sys.stderr)
    return results


#: processes whose memory is not ours to count (set in main: the S3 server)
EXCLUDED_PIDS: set[int] = set()


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.peak, self.interval, self._halt = 0.0, interval, threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, tree_rss_mb(os.getpid(), frozenset(EXCLUDED_PIDS)))
            time.sleep(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def first_file_watcher(fs, path: str, t0: float, result: dict):
    """Polls the labels folder; records when the first file lands and how many rows it holds."""
    def watch():
        while "first" not in result and not result.get("done"):
            try:
                files = [p for p in fs.find(path) if p.endswith(".parquet")]
            except FileNotFoundError:
                files = []
            if files:
                seen = time.time() - t0
                try:
                    with fs.open(files[0], "rb") as f:
                        rows = pq.ParquetFile(f).metadata.num_rows
                except Exception:  # still being written: look again
                    time.sleep(0.1)
                    continue
                result["first"], result["first_rows"] = seen, rows
                return
            time.sleep(0.5)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def run_with_first_file(job: dict) -> tuple[dict, dict]:
    """``pseudolabel.run(job)`` timed: (summary, figures) with seconds, images/s, the time of the first
    committed labels file and the steady-state rate after it (images/s; None when the run was over first)."""
    import pseudolabel
    from pseudolabel.storage import filesystem

    fs, path = filesystem(job["output"]["uri"] + "/labels")
    watch: dict = {}
    t0 = time.time()
    th = first_file_watcher(fs, path, t0, watch)
    summary = pseudolabel.run(job, progress=False)
    seconds = time.time() - t0
    watch["done"] = True
    th.join(timeout=1)
    n = summary["labelled"]
    steady = (n - watch["first_rows"]) / (seconds - watch["first"]) if watch.get("first") else None
    return summary, {"images": n, "ok": summary["ok"], "seconds": seconds, "images_per_s": n / seconds,
                     "steady_images_per_s": steady, "first_file_s": watch.get("first")}


def end_to_end(images_uri: str, out_uri: str, storage, actors: int) -> dict:
    import pseudolabel
    from pseudolabel.storage import filesystem

    job = {"input": {"uri": images_uri}, "output": {"uri": out_uri}, "storage": storage.model_dump(),
           "labelers": LABELERS,
           "resources": {"actors": actors, "cpus_per_actor": 0.5, "batch_size": 8, "decode_batch_size": 16}}
    fs, path = filesystem(out_uri + "/labels", storage)
    sampler = PeakSampler()
    sampler.start()
    watch: dict = {}
    t0 = time.time()
    th = first_file_watcher(fs, path, t0, watch)
    summary = pseudolabel.run(job, progress=False)
    seconds = time.time() - t0
    import ray

    ray.shutdown()  # the next measurement starts without a Ray cluster in the process tree
    watch["done"] = True
    th.join(timeout=1)
    n = summary["labelled"]
    steady = None
    if watch.get("first"):  # throughput once the pipeline is warm (Ray up, actors loaded, first file out)
        steady = (n - watch["first_rows"]) / (seconds - watch["first"])
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "steady_images_per_s": steady,
            "first_file_s": watch.get("first"), "peak_rss_mb": sampler.stop(), "ok": summary["ok"]}


def load_images(images_uri: str, storage) -> list[tuple[str, bytes]]:
    from pseudolabel.storage import filesystem, to_uri

    fs, root = filesystem(images_uri, storage)
    files = sorted(p for p in fs.find(root) if p.endswith(".png"))
    return [(to_uri(fs, p), fs.cat_file(p)) for p in files]


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on 127.0.0.1 (so it does not share a GIL with what is measured)."""
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto S3 server did not start")


def build_labelers():
    from pseudolabel.models.registry import labeler_class
    from pseudolabel.schemas.spec import LabelerSpec

    out = []
    for lab in LABELERS:
        spec = LabelerSpec.model_validate(lab)
        cls = labeler_class(spec.name)
        spec.params = cls.Params.model_validate(spec.params).model_dump()
        out.append((spec.name, cls(spec)))
    return out


def ceiling(raw: list[tuple[str, bytes]], batch: int = 8) -> dict:
    from pseudolabel.engine.decode import decode_image

    images = [decode_image(data, 10**8) for _, data in raw]
    labelers = build_labelers()
    t0 = time.time()
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        for _, lab in labelers:
            lab(chunk)
    seconds = time.time() - t0
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}


def naive(images_uri: str, storage, out_path: str) -> dict:
    """A plain script: list, then for each image read, decode, label, encode, append to one Parquet file."""
    from pseudolabel.engine.decode import decode_image
    from pseudolabel.engine.encode import encode_output
    from pseudolabel.schemas.tables import LABELS_SCHEMA
    from pseudolabel.storage import filesystem, to_uri

    sampler = PeakSampler()
    sampler.start()
    t0 = time.time()
    fs, root = filesystem(images_uri, storage)
    labelers = build_labelers()
    writer = pq.ParquetWriter(out_path, LABELS_SCHEMA)
    n = 0
    for p in sorted(p for p in fs.find(root) if p.endswith(".png")):
        image = decode_image(fs.cat_file(p), 10**8)
        h, w = image.shape[:2]
        row = {"image_id": p, "uri": to_uri(fs, p), "member": None, "file_name": p, "width": w, "height": h,
               "status": "ok", "error": None, "annotations": [], "subobjects": [], "layers": [], "provenance": None}
        for name, lab in labelers:
            rec = encode_output(lab([image])[0], name, h, w, first_id=len(row["annotations"]) + 1)
            for key in ("annotations", "subobjects", "layers"):
                row[key] += rec[key]
        writer.write_table(pa.Table.from_pylist([row], schema=LABELS_SCHEMA))
        n += 1
    writer.close()
    seconds = time.time() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mb": sampler.stop()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--scale", type=int, default=10, help="RSS is measured again at this many times the images")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()

    import boto3

    from pseudolabel.jobs.demo.data import generate
    from pseudolabel.schemas.spec import StorageSpec

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server, endpoint = start_s3_server()
    EXCLUDED_PIDS.add(server.pid)
    storage = StorageSpec(endpoint_url=endpoint, key="bench", secret="bench", region="us-east-1")
    boto3.client("s3", endpoint_url=storage.endpoint_url, region_name="us-east-1").create_bucket(Bucket="bench")

    rows = []
    for k, n in enumerate([args.images] + ([args.images * args.scale] if args.scale > 1 else [])):
        root = f"s3://bench/demo-{n}"
        t = time.time()
        generate(root, images=n, shards=max(1, n // 64), seed=0, size=args.size, storage=storage, progress=False)
        print(f"generated {n} images in {time.time() - t:.0f}s", file=sys.stderr)
        e2e = end_to_end(f"{root}/images", f"s3://bench/out-{n}", storage, args.actors)
        rows.append((f"end to end (Ray, S3), {n} images", e2e))
        if k == 0:
            raw = load_images(f"{root}/images", storage)
            rows.append((f"ceiling: labelers in a tight loop, {n} pre-decoded images", ceiling(raw)))
            with tempfile.TemporaryDirectory() as tmp:
                rows.append((f"naive sequential script, {n} images",
                             naive(f"{root}/images", storage, f"{tmp}/l.parquet")))

    print(f"\nmachine: {os.cpu_count()} CPUs; images {args.size}px; labelers: "
          + " + ".join(lab["name"] for lab in LABELERS))
    print("| run | images | seconds | images/s | after first file, images/s | first file (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        first = f"{r['first_file_s']:.1f}" if r.get("first_file_s") else "–"
        steady = f"{r['steady_images_per_s']:.2f}" if r.get("steady_images_per_s") else "–"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "–"
        print(f"| {name} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {steady} | {first} | {rss} |")
    e2e, ceil, nv = rows[0][1], rows[1][1], rows[2][1]
    print(f"\nend to end / ceiling = {e2e['images_per_s'] / ceil['images_per_s']:.2f}; "
          f"end to end / naive = {e2e['images_per_s'] / nv['images_per_s']:.2f}")
    if e2e.get("steady_images_per_s"):
        print(f"after the first file: end to end / ceiling = {e2e['steady_images_per_s'] / ceil['images_per_s']:.2f}; "
              f"end to end / naive = {e2e['steady_images_per_s'] / nv['images_per_s']:.2f}")
    if len(rows) > 3:
        print(f"peak RSS at {args.scale}x images / 1x = {rows[3][1]['peak_rss_mb'] / e2e['peak_rss_mb']:.2f}")
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
