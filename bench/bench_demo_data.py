"""Throughput of the synthetic demo-data generator.

Measures (1) in-memory rendering (``render_index``) at several sizes and (2) ``generate`` end to end
for each layout to a local folder and to S3 (a moto server on 127.0.0.1), and prints one table.

    python bench/bench_demo_data.py [--images 200] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time


def _s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stdout

    from pseudolabel.schemas.spec import StorageSpec

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    spec = StorageSpec(endpoint_url=f"http://{host}:{port}", key="testing", secret="testing", region="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=spec.endpoint_url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return server, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()

    from pseudolabel.jobs.demo import data as dd

    rows: list[tuple[str, str, int, float, float]] = []
    # 1. in-memory rendering
    for size in (128, 256, 512):
        n = max(20, args.images // 4)
        dd.render_index(0, 0, size)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            dd.render_index(0, i, size)
        rows.append((f"render_index {size}px", "memory", n, time.perf_counter() - t0, time.process_time() - c0))

    # 2. generate, per layout and target
    tmp = tempfile.mkdtemp(prefix="bench-demo-")
    server, spec = _s3_server()
    try:
        for layout in dd.LAYOUTS:
            for target in ("local", "s3"):
                uri = os.path.join(tmp, layout) if target == "local" else f"s3://bench/{layout}"
                t0, c0 = time.perf_counter(), time.process_time()
                dd.generate(uri, images=args.images, shards=args.shards, seed=0, size=args.size,
                            storage=spec if target == "s3" else None, layout=layout, progress=False)
                rows.append((f"generate {layout} {args.size}px", target, args.images, time.perf_counter() - t0,
                             time.process_time() - c0))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"# demo-data throughput ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)")
    print("(wall = elapsed seconds; cpu = CPU seconds of this process, including the in-process S3 server)")
    print(f"| {'what':<28} | {'target':<6} | {'images':>6} | {'wall s':>7} | {'cpu s':>7} | {'images/s':>8} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 10}|")
    for what, target, n, sec, cpu in rows:
        print(f"| {what:<28} | {target:<6} | {n:>6} | {sec:>7.2f} | {cpu:>7.2f} | {n / sec:>8.1f} |")


if __name__ == "__main__":
    main()
