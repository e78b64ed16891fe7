"""GPU throughput: the network alone, the labeler in-process, and the engine, for DirectSAM and iSeg.

Builds random-weight models at full size (saved with ``save_pretrained`` and loaded through the real
loaders): DirectSAM as a Segformer-B5 at 1024 px, iSeg as a Stable Diffusion 1.5-sized UNet + VAE +
CLIP text encoder at 512 px. Demo images of 512 px. Rows (images/s):

- ``network alone``: the network on pre-made device tensors at the labeler's batch size (eager, and
  with ``torch.compile`` when ``--compile``); the ceiling.
- ``labeler``: ``labeler(images)`` in-process on decoded arrays (both halves, one process).
- ``engine``: ``pseudolabel.run`` over PNG files: one GPU actor runs the device half, CPU tasks the host
  half. Reported: whole run, start-up (command to first committed labels file), steady state (rate
  after the first file), mean GPU utilisation in steady state (nvidia-smi / NVML samples every 0.2 s),
  CPU-seconds per image of each phase (``prepare`` in the decode tasks, the actor, the host half) and
  the CPUs the host work keeps busy at the steady rate: how many CPUs the host needs per GPU.
  ``--resize-in-actor`` adds DirectSAM's engine row with its views resized in the actor (no ``prepare``).

Every step has a time limit (``--step-timeout``); a step that runs out is reported, not fatal.
On the offline GPU machine (see ../shared/device/README.md):

    source .device/env.sh && python3 bench/bench_gpu.py 2>&1 | tee $OUT/gpu.txt

Here, to test the script on CPU with tiny models: ``python bench/bench_gpu.py --tiny``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # sd_tiny / iseg_tiny: offline tokenizer and tiny SD builders


class StepTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise StepTimeout(f"over {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class GpuSampler(threading.Thread):
    """GPU utilisation (%) every ``interval`` s from NVML, else nvidia-smi; (time, percent) samples."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.samples, self._halt = interval, [], threading.Event()
        self._read = self._reader()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            def smi():
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            return smi
        return None

    def run(self):
        while self._read is not None and not self._halt.is_set():
            try:
                self.samples.append((time.time(), self._read()))
            except Exception:
                pass
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)

    def mean_after(self, t0: float | None) -> float | None:
        vals = [u for t, u in self.samples if t0 is None or t >= t0]
        return float(np.mean(vals)) if vals else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, n_items: int, device: str, repeats: int) -> float:
    """Items/s of ``fn`` (which handles ``n_items``), after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return n_items * repeats / (time.perf_counter() - t)


def demo_images(root: str, n: int, size: int, unique: int = 64) -> str:
    """``n`` demo PNGs of ``size`` px under ``root/images`` (``unique`` rendered, the rest copies with
    their own names, so ids differ); returns the images folder."""
    from pseudolabel.jobs.demo.data import generate

    generate(root, images=min(n, unique), shards=1, size=size, progress=False)
    folder = os.path.join(root, "images")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs if f.endswith(".png"))
    os.makedirs(os.path.join(folder, "copies"), exist_ok=True)
    for k in range(len(files), n):
        shutil.copyfile(files[k % len(files)], os.path.join(folder, "copies", f"{k:06d}.png"))
    return folder


def engine_row(job: dict, device: str) -> dict:
    """``pseudolabel.run`` with a first-file watcher and the GPU sampler."""
    import pseudolabel

    labels = os.path.join(job["output"]["uri"], "labels")
    first: dict = {}

    def watch():
        while "t" not in first and not first.get("done"):
            if os.path.isdir(labels) and any(f.endswith(".parquet") for f in os.listdir(labels)):
                first["t"] = time.time()
                return
            time.sleep(0.1)

    sampler = GpuSampler()
    sampler.start()
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.time()
    summary = pseudolabel.run(job, progress=False)
    seconds = time.time() - t0
    first["done"] = True
    sampler.stop()
    import pyarrow.dataset as pads

    n = summary["labelled"]
    at_first = None
    if first.get("t"):  # rows committed by the time of the first file are few; count from the files' times
        files = [os.path.join(labels, f) for f in os.listdir(labels) if f.endswith(".parquet")]
        early = [f for f in files if os.path.getmtime(f) <= first["t"] + 0.5]
        at_first = pads.dataset(early, format="parquet").count_rows() if early else 0
    steady = (n - at_first) / (t0 + seconds - first["t"]) if first.get("t") and seconds > first["t"] - t0 else None
    phases = summary["labeler_seconds"][0]
    return {"images": n, "ok": summary["ok"], "seconds": seconds, "rate": n / seconds,
            "startup_s": first["t"] - t0 if first.get("t") else None, "steady": steady,
            "gpu_util": sampler.mean_after(first.get("t")),
            # CPU-seconds per image of each phase (wall time of the tasks/actor doing it)
            "per_image": {k: phases.get(k, 0.0) / max(n, 1) for k in ("prepare", "device", "host")}}


# ------------------------------------------------------------------------------------------- DirectSAM

def directsam_rows(args, tmp: str, images: list[np.ndarray], folder: str) -> list[tuple]:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    from pseudolabel.models.device import resolve_dtype
    from pseudolabel.models.directsam import DirectSAM, segformer_config
    from pseudolabel.schemas.spec import LabelerSpec

    res = args.directsam_resolution
    model_dir = os.path.join(tmp, "directsam")
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(segformer_config("tiny" if args.tiny else "b5")).save_pretrained(model_dir)
    SegformerImageProcessorPil(size={"height": res, "width": res}).save_pretrained(model_dir)
    params = {"threshold": 0.5, "pyramid_layers": 0, "batch_size": args.batch}
    spec = dict(name="directsam", weights=model_dir, dtype=args.dtype, params=params)
    rows = []
    lab = DirectSAM(LabelerSpec(**spec), device=args.device)
    dtype = resolve_dtype(args.dtype, args.device, DirectSAM.cuda_dtype)
    x = torch.randn(args.batch, 3, res, res, device=args.device, dtype=dtype)
    with torch.inference_mode():
        rows.append(("directsam", "network alone, eager", rate(lambda: lab.model(pixel_values=x), args.batch,
                                                                 args.device, args.repeats)))
        if args.compile:
            fast = torch.compile(lab.model)
            rows.append(("directsam", "network alone, torch.compile",
                         rate(lambda: fast(pixel_values=x), args.batch, args.device, args.repeats)))
    batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]
    lab(batches[0])
    t = time.perf_counter()
    for b in batches:
        lab(b)
    rows.append(("directsam", "labeler in-process", len(images) / (time.perf_counter() - t)))
    lab = None  # free the model before the engine loads its own
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    job = {"name": "bench-gpu-directsam", "input": {"uri": folder, "format": "folder"},
           "output": {"uri": os.path.join(tmp, "out-directsam")},
           "labelers": [{**spec, "compile": args.compile}],
           "resources": {"actors": 1, "gpus_per_actor": 1 if args.device.startswith("cuda") else 0,
                         "cpus_per_actor": args.actor_cpus, "batch_size": args.batch, "decode_batch_size": args.batch,
                         "host_cpus": args.host_cpus}}
    rows.append(("directsam", "engine", engine_row(job, args.device)))
    if args.resize_in_actor:  # the same job with the views resized in the actor (no prepare in the decode tasks)
        job = {**job, "output": {"uri": os.path.join(tmp, "out-directsam-actor-resize")},
               "labelers": [{**job["labelers"][0], "name": "proxy_labelers:DirectSAMResizeInActor"}]}
        rows.append(("directsam", "engine, views resized in the actor", engine_row(job, args.device)))
    return rows


# ------------------------------------------------------------------------------------------------ iSeg

def build_sd(path: str, tiny: bool) -> str:
    """A random SD-1.5-sized (or tiny) checkpoint in diffusers layout with an offline CLIP tokenizer."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from iseg_tiny import build_sd21_tiny
    from sd_tiny import write_tiny_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tiny:  # SD 2.1's layer names and head counts (iSeg's reference layers and heads), tiny widths
        return build_sd21_tiny(path)
    torch.manual_seed(0)
    init = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init):
        UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(
            torch.float16).save_pretrained(os.path.join(path, "unet"))
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      sample_size=512).save_pretrained(os.path.join(path, "vae"))
        tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(os.path.join(path, "tokenizer")))
        CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(os.path.join(path, "text_encoder"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return path


def iseg_rows(args, tmp: str, images: list[np.ndarray], folder: str) -> list[tuple]:
    from pseudolabel.models.attention import encode_text, noisy_unet_pass
    from pseudolabel.models.iseg import ISeg
    from pseudolabel.schemas.spec import LabelerSpec

    sd_dir = build_sd(os.path.join(tmp, "sd"), args.tiny)
    res = 64 if args.tiny else 512
    ontology = [{"category": c} for c in ("cat", "dog", "sky")]
    spec = dict(name="iseg", weights=sd_dir, dtype=args.dtype, ontology=ontology, params={"resolution": res})
    lab = ISeg(LabelerSpec(**spec), device=args.device)
    sd, b = lab.sd, args.iseg_batch
    unet_dtype = next(sd.unet.parameters()).dtype
    latents = torch.randn(b, 4, res // 8, res // 8, device=args.device, dtype=unet_dtype)
    with torch.inference_mode():
        emb, _ = encode_text(sd.tokenizer, sd.text_encoder, ["a photograph of cat and dog and sky"] * b)
        rows = [("iseg", "UNet pass alone", rate(lambda: noisy_unet_pass(sd.unet, sd.scheduler, latents, 100, emb),
                                                  b, args.device, args.repeats))]
    small = [im for im in images[: 4 * b]]
    lab(small[:b])
    t = time.perf_counter()
    for i in range(0, len(small), b):
        lab(small[i:i + b])
    rows.append(("iseg", "labeler in-process", len(small) / (time.perf_counter() - t)))
    lab = sd = None  # free the models before the engine loads its own
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    job = {"name": "bench-gpu-iseg", "input": {"uri": folder, "format": "folder", "limit": args.iseg_images},
           "output": {"uri": os.path.join(tmp, "out-iseg")}, "labelers": [spec],
           "resources": {"actors": 1, "gpus_per_actor": 1 if args.device.startswith("cuda") else 0,
                         "cpus_per_actor": args.actor_cpus, "batch_size": b, "decode_batch_size": b,
                         "host_cpus": args.host_cpus}}
    rows.append(("iseg", "engine", engine_row(job, args.device)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto = bf16 (DirectSAM) / fp16 (SD) on CUDA, fp32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny models and few images (to test the script on CPU)")
    ap.add_argument("--images", type=int, default=2000, help="DirectSAM engine images")
    ap.add_argument("--iseg-images", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--directsam-resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iseg-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--actor-cpus", type=float, default=2)
    ap.add_argument("--host-cpus", type=float, default=1)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (network row and engine)")
    ap.add_argument("--step-timeout", type=float, default=240)
    ap.add_argument("--only", choices=["directsam", "iseg"], default=None)
    ap.add_argument("--resize-in-actor", action="store_true",
                    help="also run DirectSAM's engine row with its views resized in the actor (no prepare)")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.iseg_images, args.image_size = min(args.images, 48), min(args.iseg_images, 16), 96
        args.directsam_resolution, args.batch, args.iseg_batch, args.repeats = 64, 4, 2, 2
        args.actor_cpus, args.host_cpus = 0.25, 0.5

    import ray

    from pseudolabel.jobs.demo.data import render_index

    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    os.environ.setdefault("PSEUDOLABEL_CACHE", os.path.join(tmp, "cache"))
    t0 = time.time()
    folder = demo_images(os.path.join(tmp, "demo"), args.images, args.image_size)
    images = [render_index(0, i, args.image_size).image for i in range(min(64, args.images))]
    # bench/ on the workers' path (benchmark-only labelers); the engine rows share one warm cluster
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, log_to_driver=False)
    print(f"setup {time.time() - t0:.0f}s: {args.images} images of {args.image_size}px, Ray up", file=sys.stderr)

    rows: list[tuple] = []
    for name, fn in (("directsam", directsam_rows), ("iseg", iseg_rows)):
        if args.only and args.only != name:
            continue
        t = time.time()
        try:
            with time_limit(args.step_timeout):
                rows += fn(args, tmp, images, folder)
        except StepTimeout as err:
            rows.append((name, f"(stopped: {err})", None))
        except Exception as err:  # report and go on to the next method
            rows.append((name, f"(failed: {type(err).__name__}: {err})", None))
        print(f"{name}: {time.time() - t:.0f}s", file=sys.stderr)

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none"
    print(f"\n# bench_gpu: device {args.device} ({gpu}), {os.cpu_count()} CPUs, dtype {args.dtype}, torch "
          f"{torch.__version__}, Ray {ray.__version__}; DirectSAM {'tiny' if args.tiny else 'Segformer-B5'} @"
          f"{args.directsam_resolution} batch {args.batch}; iSeg {'tiny' if args.tiny else 'SD-1.5-size'} batch "
          f"{args.iseg_batch}; actor {args.actor_cpus:g} CPUs, host tasks {args.host_cpus:g} CPU each")
    print("| method | row | images/s | of the network alone | start-up (s) | steady images/s | GPU util (steady) "
          "| CPU-s/image: prepare, actor, host | host CPUs at the steady rate |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    ceiling: dict[str, float] = {}
    for method, what, value in rows:
        if value is None:
            print(f"| {method} | {what} | – | – | – | – | – | – | – |")
            continue
        if isinstance(value, dict):
            r = value
            steady = r["steady"]
            frac = f"{steady / ceiling[method]:.2f} (steady)" if steady and method in ceiling else "–"
            util = f"{r['gpu_util']:.0f} %" if r["gpu_util"] is not None else "–"
            per = r["per_image"]
            phases = ", ".join(f"{per[k] * 1000:.1f} ms" for k in ("prepare", "device", "host"))
            cpus = f"{(per['prepare'] + per['host']) * steady:.1f}" if steady else "–"
            print(f"| {method} | {what}, {r['images']} images ({r['ok']} ok) | {r['rate']:.1f} | {frac} | "
                  f"{r['startup_s']:.1f} | {steady:.1f} | {util} | {phases} | {cpus} |" if steady else
                  f"| {method} | {what}, {r['images']} images | {r['rate']:.1f} | – | – | – | {util} | {phases} | – |")
            continue
        ceiling.setdefault(method, value)
        print(f"| {method} | {what} | {value:.1f} | {value / ceiling[method]:.2f} | | | | | |")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
