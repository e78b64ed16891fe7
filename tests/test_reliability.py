"""Fault injection for real: kill -9 of the driver, of labeler actors and task workers; S3 faults through
a proxy; two runs into one output; a corpus of bad inputs. Each case records a row of RELIABILITY.md
(tests/reliability_report.py): what was injected, what happened, images lost, duplicates."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image
from recording_labelers import pids

import pseudolabel
from pseudolabel.jobs.demo.data import generate
from pseudolabel.jobs.outputs.labels_io import read_labels

pytestmark = pytest.mark.reliability

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENS = {"name": "classical_tokens"}
RESOURCES = {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 4, "decode_batch_size": 4}


# -- helpers ------------------------------------------------------------------------------------------

def _job(input_uri: str, out: str, labelers: list[dict] | None = None, storage=None, **resources) -> dict:
    job = {"input": {"uri": input_uri}, "output": {"uri": out}, "labelers": labelers or [TOKENS],
           "resources": {**RESOURCES, **resources}}
    if storage is not None:
        job["storage"] = storage.model_dump()
    return job


def _slow(log: str, sleep_s: float = 0.2) -> dict:
    """A host-task labeler that takes ``sleep_s`` per image and logs each call (the job's heartbeat)."""
    return {"name": "recording_labelers:RecordingHost", "params": {"log": log, "sleep_s": sleep_s}}


def _write_spec(path, job: dict) -> str:
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "",
            "PYTHONPATH": os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))}


def _start(spec: str, log_path, *args: str) -> subprocess.Popen:
    """``pseudolabel run SPEC`` as a driver process of its own (own session, own local Ray cluster)."""
    cmd = [sys.executable, "-m", "pseudolabel.cli", "run", spec, "--quiet", *args]
    with open(log_path, "wb") as err:
        return subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)


def _wait(condition, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``proc`` exits / the timeout passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


#: kill point -> processes of the killed driver still running 20 s after the kill (filled by the kill cases)
_LEFT_AFTER_KILL: dict[str, list[str]] = {}


def _left_text(names: list[str]) -> str:
    noun = "process" if len(names) == 1 else "processes"
    return f"{len(names)} driver {noun} outlived the kill" + (f" ({', '.join(sorted(names))})" if names else "")


def _kill_driver(proc: subprocess.Popen) -> list[str]:
    """kill -9 of the driver's process group; returns the names of its descendants still running 20 s
    later (they are then killed one by one, so nothing is left behind)."""
    children, tree, todo = _children(), [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait(lambda: not any(_alive(p) for p in tree[1:]), timeout=20.0)
    left = [p for p in tree[1:] if _alive(p)]
    names = []
    for pid in left:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            names.append(next((os.path.basename(a) for a in args[1:] if a.endswith(".py")),
                              os.path.basename(args[0]) if args else "?"))
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return names


def _labels_files(out: str) -> list[str]:
    d = os.path.join(out, "labels")
    return [f for f in os.listdir(d) if f.endswith(".parquet")] if os.path.isdir(d) else []


def _tally(out: str, expected_ids, storage=None) -> dict:
    """Rows, distinct ids, status counts, images lost (expected ids with no ok row) and duplicates."""
    table = read_labels(out, storage, columns=["image_id", "status", "error", "file_name", "provenance"])
    rows = table.to_pylist()
    ids = [r["image_id"] for r in rows]
    ok = {r["image_id"] for r in rows if r["status"] == "ok"}
    status = [r["status"] for r in rows]
    return {"rows": len(rows), "distinct": len(set(ids)), "ok": status.count("ok"), "error": status.count("error"),
            "retry": status.count("retry"), "lost": len(set(expected_ids) - ok), "duplicates": len(ids) - len(set(ids)),
            "table": rows}


def _demo_ids(images_uri: str, storage=None) -> list[str]:
    from pseudolabel.engine.sources import list_input
    from pseudolabel.schemas.spec import InputSpec

    return list_input(InputSpec(uri=images_uri), storage).column("image_id").to_pylist()


def _s3_demo(s3_bucket, images: int, seed: int) -> tuple[str, str, object, list[str]]:
    """Demo images written straight to the test bucket (not through the proxy); returns (bucket name,
    images URI, the direct storage spec, the images' ids)."""
    bucket, direct = s3_bucket
    generate(f"{bucket}/demo", images=images, shards=2, seed=seed, size=48, storage=direct, progress=False)
    return bucket.split("://", 1)[1], f"{bucket}/demo/images", direct, _demo_ids(f"{bucket}/demo/images", direct)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# -- kill -9 of the driver ----------------------------------------------------------------------------

def test_driver_killed_during_listing_and_manifest_write_then_rerun(ray_cluster, fault_proxy, s3_bucket,
                                                                    tmp_path, reliability_log):
    """Input and output on S3 through the proxy. Run 1 is killed while the proxy holds its listing
    request; run 2 while it holds the manifest's part uploads (after the first part); run 3, with
    another decode_batch_size, must give every image exactly once."""
    proxy, storage = fault_proxy
    name, images, direct, expected = _s3_demo(s3_bucket, images=20, seed=3)
    out = f"s3://{name}/out"
    spec = _write_spec(tmp_path / "job.yaml", _job(images, out, storage=storage))

    # 1. Kill while listing the input.
    proxy.delay(60, match=rf"^GET /{name}/?\?.*list-type=2.*prefix=demo")
    proc = _start(spec, tmp_path / "run1.err")
    reached = _wait(lambda: proxy.requests_matching(r"list-type=2.*prefix=demo") > 0, proc)
    left1 = _kill_driver(proc)
    assert reached, (tmp_path / "run1.err").read_text()[-2000:]
    # 2. Kill while the manifest's parts are being uploaded (the first done, the second held).
    proxy.delay(60, match=rf"^PUT /{name}/out/manifest/part-0*1\.parquet")
    proc = _start(spec, tmp_path / "run2.err")
    reached = _wait(lambda: proxy.requests_matching(rf"^PUT /{name}/out/manifest/part-0*1\.parquet") > 0, proc)
    left2 = _kill_driver(proc)
    proxy.clear()
    assert reached, (tmp_path / "run2.err").read_text()[-2000:]
    # 3. Re-run, with another decode_batch_size (not part of what the images are).
    summary = pseudolabel.run(spec, progress=False, **{"resources.decode_batch_size": 3})
    tally = _tally(out, expected, direct)
    for point, left in (("during listing", left1), ("during the manifest upload", left2)):
        reliability_log.add(f"driver kill -9 {point}", "S3 in/out through the proxy (request held); kill -9 "
                            "of the driver's process group, then the job again (decode_batch_size changed)",
                            "1 kill", f"re-run: {tally['ok']}/{len(expected)} ok, {tally['rows']} rows; "
                            + _left_text(left), tally["lost"], tally["duplicates"])
    _LEFT_AFTER_KILL.update({"during listing": left1, "during the manifest upload": left2})
    assert tally["lost"] == tally["duplicates"] == 0 and tally["rows"] == len(expected) == summary["labelled"], \
        sorted({(r["status"], r["error"]) for r in tally["table"] if r["status"] != "ok"})[:5]


def test_driver_killed_mid_labelling_and_after_first_commit_then_rerun(ray_cluster, tmp_path, reliability_log):
    root = tmp_path / "demo"
    generate(str(root), images=16, shards=2, seed=4, size=48, progress=False)
    images, out, log = str(root / "images"), str(tmp_path / "out"), str(tmp_path / "calls.jsonl")
    expected = _demo_ids(images)
    spec = _write_spec(tmp_path / "job.yaml", _job(images, out, [TOKENS, _slow(log)]))

    # 1. Kill once labelling has begun, before anything is committed.
    proc = _start(spec, tmp_path / "run1.err")
    reached = _wait(lambda: os.path.exists(log), proc)
    committed_at_kill1 = len(_labels_files(out))
    left1 = _kill_driver(proc)
    assert reached, (tmp_path / "run1.err").read_text()[-2000:]
    # 2. The same job again, killed just after its first commit.
    proc = _start(spec, tmp_path / "run2.err")
    reached = _wait(lambda: bool(_labels_files(out)), proc)
    left2 = _kill_driver(proc)
    assert reached, (tmp_path / "run2.err").read_text()[-2000:]
    partial = _tally(out, expected)["rows"]
    # 3. Run to the end: resumes, skipping what was committed.
    summary = pseudolabel.run(spec, progress=False)
    tally = _tally(out, expected)
    runs = [r["provenance"]["run_id"] for r in tally["table"]]
    committed = len(runs) - runs.count(summary["run_id"])  # rows of the killed runs that were kept
    redone = partial - committed  # written but never committed: dropped and labelled again
    reliability_log.add("driver kill -9 mid-labelling", "folder input; kill -9 of the driver's process group "
                        "after the first labeler call, before any commit, then the job again", "1 kill",
                        f"{committed_at_kill1} files committed at the kill; re-run: {tally['ok']}/{len(expected)} ok; "
                        + _left_text(left1),
                        tally["lost"], tally["duplicates"])
    reliability_log.add("driver kill -9 just after the first commit", "the same job: kill -9 as the first labels "
                        "file appears, then the job again", "1 kill",
                        f"{partial} rows written before the kill, {summary['this_run']} labelled by the re-run, "
                        f"{redone} uncommitted rows dropped and redone; " + _left_text(left2),
                        tally["lost"], tally["duplicates"])
    _LEFT_AFTER_KILL.update({"mid-labelling": left1, "just after the first commit": left2})
    assert committed_at_kill1 == 0
    assert tally["lost"] == tally["duplicates"] == 0 and tally["rows"] == len(expected)
    assert 0 < partial < len(expected) and summary["this_run"] + committed == len(expected)


def test_no_process_of_a_killed_driver_keeps_running():
    """Read from the kill cases above: every process the killed driver had started (its local Ray's
    agents and workers included: ``engine/reaper.py``) is gone 20 s later."""
    if not _LEFT_AFTER_KILL:
        pytest.skip("no driver was killed in this session (run the kill cases with this one)")
    assert not any(_LEFT_AFTER_KILL.values()), _LEFT_AFTER_KILL


# -- kill -9 of a labeler actor and of a host-task worker ---------------------------------------------

def test_labeler_actor_and_task_worker_killed_mid_run(ray_cluster, tmp_path, reliability_log):
    """A labeler that runs in actors and one that runs in host tasks, each logging its process id; a
    watcher kill -9s the first actor process and the first task worker it sees while the job runs."""
    root = tmp_path / "demo"
    generate(str(root), images=16, shards=2, seed=5, size=48, progress=False)
    images, out = str(root / "images"), str(tmp_path / "out")
    actor_pids, task_pids = str(tmp_path / "actor.pids"), str(tmp_path / "task.pids")
    labelers = [{"name": "recording_labelers:RecordingWhole", "params": {"pid_log": actor_pids, "sleep_s": 0.2}},
                {"name": "recording_labelers:RecordingHost", "params": {"pid_log": task_pids, "sleep_s": 0.1}},
                TOKENS]
    killed: list[int] = []
    done = threading.Event()

    def killer():
        for path in (actor_pids, task_pids):
            while not done.is_set():
                got = [p for p in pids(path) if p != os.getpid()]
                if got:
                    try:
                        os.kill(got[0], signal.SIGKILL)
                        killed.append(got[0])
                    except ProcessLookupError:
                        pass
                    break
                time.sleep(0.02)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        summary = pseudolabel.run(_job(images, out, labelers, actors=1, batch_size=2, decode_batch_size=2),
                                  progress=False)
    finally:
        done.set()
        watcher.join(5)
    expected = _demo_ids(images)
    tally = _tally(out, expected)
    reliability_log.add("labeler actor and task worker kill -9", "kill -9 of the first labeler actor process "
                        "and of the first host-task worker seen, mid-run", f"{len(killed)} kills",
                        f"job finished: {summary['ok']} ok, {summary['error']} error; actor restarted, work retried",
                        tally["lost"], tally["duplicates"])
    assert len(killed) == 2
    assert tally["lost"] == tally["duplicates"] == 0 and tally["rows"] == len(expected) == summary["ok"]


# -- S3 faults through the proxy ----------------------------------------------------------------------

def test_s3_input_with_5xx_throttling_drops_and_an_outage_loses_nothing(ray_cluster, fault_proxy, s3_bucket,
                                                                        tmp_path, reliability_log):
    proxy, storage = fault_proxy
    name, images, _, expected = _s3_demo(s3_bucket, images=16, seed=6)
    out = str(tmp_path / "out")
    object_gets = rf"^GET /{name}/demo/images/.*\.png"
    # 1. A quarter of the image reads fail (500, 503 SlowDown, dropped connection), and the first image
    #    read starts an outage of 3 s in which every image read fails.
    proxy.set_faults(0.25, match=object_gets)
    outage_started = threading.Event()

    def outage_on_first_read():
        if _wait(lambda: proxy.requests_matching(object_gets) > 0, timeout=120):
            proxy.outage(3.0, kind="503")
            outage_started.set()

    threading.Thread(target=outage_on_first_read, daemon=True).start()
    job = _job(images, out, storage=storage)
    job["input"].update(fetch_backoff_s=0.5)
    pseudolabel.run(job, progress=False)
    proxy.clear()
    after_first = _tally(out, expected)
    # 2. Whatever outlived the retries is a retry row: the same job again labels it.
    second = pseudolabel.run(job, progress=False)
    tally = _tally(out, expected)
    counts = proxy.counts
    reliability_log.add("S3 input: 5xx, throttling, drops, 3 s outage", "proxy: 25% of image reads fail (500 / "
                        "503 SlowDown / dropped connection), plus a 3 s outage of every image read",
                        f"{counts['500']}x500, {counts['503']}x503, {counts['drop']} drops, "
                        f"{counts['outage']} in the outage",
                        f"run 1: {after_first['ok']} ok, {after_first['retry']} retry, {after_first['error']} error; "
                        f"run 2 relabelled {second['this_run']}", tally["lost"], tally["duplicates"])
    assert outage_started.is_set() and proxy.injected > 0
    assert after_first["error"] == 0, [r["error"] for r in after_first["table"] if r["status"] == "error"]
    assert tally["lost"] == tally["duplicates"] == 0 and tally["ok"] == len(expected)


def test_s3_outage_longer_than_the_retries_leaves_retry_rows_that_a_rerun_labels(
        ray_cluster, fault_proxy, s3_bucket, tmp_path, reliability_log):
    proxy, storage = fault_proxy
    name, images, _, expected = _s3_demo(s3_bucket, images=2, seed=8)
    out = str(tmp_path / "out")
    # 1. Every image read fails for the whole first run (the listing still works).
    proxy.set_faults(0.0, match=rf"^GET /{name}/demo/images/.*\.png")
    proxy.outage(3600, kind="500")
    job = _job(images, out, storage=storage, decode_batch_size=1)
    job["input"].update(fetch_retries=1, fetch_backoff_s=0.1)
    first = pseudolabel.run(job, progress=False)
    after_first = _tally(out, expected)
    injected = proxy.injected
    # 2. The store is back: the same job labels the retry rows.
    proxy.clear()
    second = pseudolabel.run(job, progress=False)
    tally = _tally(out, expected)
    reliability_log.add("S3 input: outage longer than the retries", "proxy: every image read answers 500 for the "
                        "whole first run; then the same job again", f"{injected}x500",
                        f"run 1: {after_first['retry']} retry, {after_first['error']} error rows; run 2 relabelled "
                        f"{second['this_run']}", tally["lost"], tally["duplicates"])
    assert first["error"] == 0 and after_first["error"] == 0 and after_first["retry"] == len(expected)
    assert tally["lost"] == tally["duplicates"] == 0 and tally["rows"] == len(expected)


# -- two runs into one output -------------------------------------------------------------------------

def test_two_runs_started_together_into_one_output_label_each_image_once(tmp_path, reliability_log):
    root = tmp_path / "demo"
    generate(str(root), images=8, shards=2, seed=9, size=48, progress=False)
    images, out = str(root / "images"), str(tmp_path / "out")
    expected = _demo_ids(images)
    spec = _write_spec(tmp_path / "job.yaml", _job(images, out))
    first = _start(spec, tmp_path / "a.err")
    time.sleep(0.5)
    second = _start(spec, tmp_path / "b.err")
    codes = [p.wait(timeout=300) for p in (first, second)]
    errs = [(tmp_path / n).read_text().strip() for n in ("a.err", "b.err")]
    tally = _tally(out, expected)
    refused = [e.splitlines()[-1].replace(out, "OUT") if e else "" for c, e in zip(codes, errs) if c != 0]
    reliability_log.add("two runs into one output", "the same job started twice, 0.5 s apart, into one output",
                        "2 runs", f"exit codes {codes}; refused: {refused[0][:150] if refused else 'none'}",
                        tally["lost"], tally["duplicates"])
    assert tally["lost"] == tally["duplicates"] == 0 and tally["rows"] == len(expected)
    assert min(codes) == 0, errs
    for code, err in zip(codes, errs):  # a refused run says so in one line, naming the holder
        if code != 0:
            assert len(err.splitlines()) == 1 and "another run" in err, err


# -- a corpus of bad inputs ---------------------------------------------------------------------------

class _FifoGuard:
    """Tells whether anything opened the FIFO ``path`` for reading (and unblocks that reader with EOF, so
    a job that does open it still ends)."""

    def __init__(self, path: str):
        self.path, self.opened, self._stop = path, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # only succeeds while a reader waits
            except OSError:
                time.sleep(0.02)
                continue
            self.opened = True
            os.close(fd)

    def stop(self):
        self._stop.set()
        self._thread.join(2)


def _run_catching(job: dict) -> tuple[dict | None, str | None]:
    try:
        return pseudolabel.run(job, progress=False), None
    except Exception as err:  # the case records what happened; the test asserts on it
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@pytest.fixture(scope="module")
def bad_folder(ray_cluster, tmp_path_factory):
    """Good demo images plus a corrupt PNG, a PNG whose header claims 100000x100000 pixels, a 16-bit PNG
    and a FIFO named like an image, in one folder job."""
    base = tmp_path_factory.mktemp("bad_folder")
    generate(str(base / "demo"), images=6, shards=1, seed=10, size=48, progress=False)
    images = base / "demo" / "images"
    bad = images / "bad"
    bad.mkdir()
    good_png = _png(np.full((40, 40, 3), 120, np.uint8))
    (bad / "corrupt.png").write_bytes(good_png[:60] + b"\x00garbage" * 20)
    (bad / "huge.png").write_bytes(_png_header_only(100_000, 100_000))
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(bad / "deep16.png")
    os.mkfifo(bad / "pipe.png")
    guard = _FifoGuard(str(bad / "pipe.png"))
    started = time.time()
    summary, failure = _run_catching(_job(str(images), str(base / "out")))
    guard.stop()
    rows = {} if failure else {r["file_name"]: r for r in read_labels(str(base / "out")).to_pylist()}
    return {"images": str(images), "summary": summary, "failure": failure, "rows": rows,
            "fifo_opened": guard.opened, "seconds": time.time() - started}


def _record_bad(log, case: str, what: str, result: dict, names: list[str], good_prefix: str) -> tuple[int, int]:
    rows = result["rows"]
    good = [r for k, r in rows.items() if k.startswith(good_prefix)]
    lost = sum(1 for r in good if r["status"] != "ok") if rows else "all"
    ids = [r["image_id"] for r in rows.values()]
    dups = len(ids) - len(set(ids))
    if result["failure"]:
        happened = f"job failed: {result['failure'][:160]}"
    else:
        happened = "; ".join(f"{n}: {rows[n]['status']}" + (f" ({rows[n]['error'][:110]})" if rows[n]["error"] else "")
                             if n in rows else f"{n}: no row" for n in names)
        if result.get("note"):
            happened += f"; {result['note']}"
    log.add(case, what, len(names), happened, lost, dups)
    return lost, dups


def test_bad_images_are_error_rows_and_the_good_ones_ok(bad_folder, reliability_log):
    lost, dups = _record_bad(reliability_log, "bad images in a folder", "corrupt PNG; PNG header claiming "
                             "100000x100000 (over input.max_pixels)", bad_folder,
                             ["bad/corrupt.png", "bad/huge.png"], "0")
    assert bad_folder["failure"] is None
    rows = bad_folder["rows"]
    assert rows["bad/corrupt.png"]["status"] == "error" and "decode" in rows["bad/corrupt.png"]["error"]
    assert rows["bad/huge.png"]["status"] == "error" and "max_pixels" in rows["bad/huge.png"]["error"]
    assert lost == dups == 0 and sum(1 for k in rows if not k.startswith("bad/")) == 6


def test_sixteen_bit_png_is_scaled_not_clipped(bad_folder, reliability_log):
    from pseudolabel.engine.decode import ImageError, decode_image

    with open(os.path.join(bad_folder["images"], "bad", "deep16.png"), "rb") as f:
        data = f.read()
    try:  # what the engine's decoder makes of it: refusing it as unsupported is allowed, clipping it is not
        decoded, refused = decode_image(data, 10**7), None
    except ImageError as err:
        decoded, refused = None, str(err)
    ramp = decoded[0, :, 0].astype(int) if decoded is not None else None
    note = (f"refused: {refused[:80]}" if refused else
            f"decoded ramp 0 / 33026 / 65535 -> {ramp[0]} / {ramp[32]} / {ramp[-1]}")
    _record_bad(reliability_log, "16-bit PNG", "16-bit greyscale ramp 0..65535", {**bad_folder, "note": note},
                ["bad/deep16.png"], "0")
    row = bad_folder["rows"]["bad/deep16.png"]
    if refused:
        assert row["status"] == "error" and "16" in refused
        return
    assert row["status"] == "ok"
    assert ramp[0] <= 1 and ramp[-1] >= 254 and abs(ramp[32] - 130) <= 3, ramp  # the ramp survives, scaled


def test_fifo_in_the_folder_is_an_error_row_never_opened(bad_folder, reliability_log):
    _record_bad(reliability_log, "FIFO named like an image", "a named pipe bad/pipe.png in the input folder",
                bad_folder, ["bad/pipe.png"], "0")
    assert bad_folder["failure"] is None
    assert not bad_folder["fifo_opened"], "the engine opened the FIFO (a job would hang on it)"
    row = bad_folder["rows"].get("bad/pipe.png")
    assert row is None or row["status"] == "error"


def test_bad_tar_shards_are_error_rows_and_the_job_goes_on(ray_cluster, tmp_path, reliability_log):
    generate(str(tmp_path / "wds"), images=8, shards=2, seed=12, size=48, layout="webdataset", progress=False)
    images = tmp_path / "wds" / "images"
    shard = (images / "shard-00001.tar").read_bytes()
    with tarfile.open(images / "shard-00001.tar") as tar:
        first = tar.getmembers()[0]
    (images / "shard-00002-cut.tar").write_bytes(shard[: first.offset_data + first.size // 2])  # cut mid-member
    (images / "shard-00003-empty.tar").write_bytes(b"")
    (images / "shard-00004-junk.tar").write_bytes(b"this is not a tar file " * 40)
    _, failure = _run_catching(_job(str(images), str(tmp_path / "out")))
    rows = [] if failure else read_labels(str(tmp_path / "out")).to_pylist()
    by_shard: dict[str, list[str]] = {}
    for r in rows:
        by_shard.setdefault(r["uri"].rsplit("/", 1)[-1], []).append(r["status"])
    good = [s for k in ("shard-00000.tar", "shard-00001.tar") for s in by_shard.get(k, [])]
    ids = [r["image_id"] for r in rows]
    reliability_log.add("bad tar shards", "a tar cut mid-member, a 0-byte .tar, a non-tar .tar next to 2 good shards",
                        3, f"job failed: {failure[:160]}" if failure else
                        "; ".join(f"{k}: {', '.join(sorted(set(v)))}" for k, v in sorted(by_shard.items())),
                        8 - good.count("ok"), len(ids) - len(set(ids)))
    assert failure is None
    assert good.count("ok") == 8 and len(ids) == len(set(ids))
    for bad in ("shard-00002-cut.tar", "shard-00003-empty.tar", "shard-00004-junk.tar"):
        assert "error" in by_shard.get(bad, []), (bad, by_shard)


def test_coco_file_names_leaving_the_root_are_refused(ray_cluster, tmp_path, reliability_log):
    generate(str(tmp_path / "demo"), images=4, shards=1, seed=13, size=48, progress=False)
    images = tmp_path / "demo" / "images"
    (tmp_path / "demo" / "outside.png").write_bytes(_png(np.full((30, 30, 3), 200, np.uint8)))
    coco = json.loads((tmp_path / "demo" / "annotations" / "instances.json").read_text())
    escapes = ["../outside.png", str(tmp_path / "demo" / "outside.png"), "../missing.png"]
    coco["images"] += [{"id": 1000 + k, "file_name": name, "width": 30, "height": 30} for k, name in enumerate(escapes)]
    coco_path = tmp_path / "coco.json"
    coco_path.write_text(json.dumps(coco))
    job = _job(str(images), str(tmp_path / "out"))
    job["input"].update(format="coco", coco_json=str(coco_path))
    _, failure = _run_catching(job)
    rows = {} if failure else {r["file_name"]: r for r in read_labels(str(tmp_path / "out")).to_pylist()}
    good = [r for k, r in rows.items() if k not in escapes]
    shown = dict(zip(escapes, ["../outside.png", "absolute path", "../missing.png"]))
    first_error = (f" ({rows[escapes[0]]['error'].replace(str(tmp_path), '')[:90]})"
                   if escapes[0] in rows and rows[escapes[0]]["error"] else "")
    reliability_log.add("COCO file_name leaving the root", "file_name '../outside.png' (exists), an absolute path "
                        "(exists), '../missing.png'", len(escapes), f"job failed: {failure[:160]}" if failure else
                        "; ".join(f"{shown[n]}: {rows[n]['status']}" if n in rows else f"{shown[n]}: no row"
                                  for n in escapes) + first_error,
                        4 - sum(1 for r in good if r["status"] == "ok"), 0)
    assert failure is None
    assert sum(1 for r in good if r["status"] == "ok") == 4
    for name in escapes:
        assert name in rows and rows[name]["status"] == "error", rows.get(name)
    # the same refusal whether or not the file exists (nothing learnt about what lies outside the root)
    assert (rows["../outside.png"]["error"].replace("../outside.png", "NAME")
            == rows["../missing.png"]["error"].replace("../missing.png", "NAME"))
