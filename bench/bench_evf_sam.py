"""evf_sam throughput with 1, 4 and 16 prompts per image, the SAM image encoder timed separately.

Random-weight checkpoints of the real architecture (tiny / small, see
pseudolabel.models.evf_sam.random_checkpoint.SIZES) so it runs offline; the point is the scaling:
the SAM encoder runs once per image whatever the number of prompts, while BEiT-3 fusion and the mask
decoder scale with prompts.

    python bench/bench_evf_sam.py [--sizes tiny small] [--variants sam sam2] [--images 4] [--repeats 2]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch


def _timed(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_one(variant: str, size: str, prompts: int, images: list[np.ndarray], repeats: int, device: str) -> dict:
    from pseudolabel.models.evf_sam.labeler import EvfSamLabeler
    from pseudolabel.models.evf_sam.random_checkpoint import write_random_checkpoint
    from pseudolabel.schemas.spec import LabelerSpec

    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(d, variant, size)
        ontology = [{"category": f"class{i}", "prompts": [f"shape number {i}"]} for i in range(prompts)]
        lab = EvfSamLabeler(LabelerSpec(name="evf_sam", weights=d, ontology=ontology), device=device)
        lab(images[:1])                                             # warm-up
        seen = []
        hook = lab.model.sam.vision_encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
        t_total, _ = _timed(lambda: lab(images), repeats)
        hook.remove()
        enc_per_image = sum(seen) / (len(images) * repeats)
        t_enc, (emb, _) = _timed(lambda: lab.encode_images(images), repeats)
        t_fuse, fused = _timed(lambda: lab.prompt_embeddings(images), repeats)

        def decode_all():
            for i in range(len(images)):
                e = [x[i:i + 1] for x in emb] if isinstance(emb, (list, tuple)) else emb[i:i + 1]
                lab.model.decode(e, fused[i:i + 1])

        t_dec, _ = _timed(decode_all, repeats)
    n = len(images)
    return {"variant": variant, "size": size, "prompts": prompts, "images_s": n / t_total,
            "prompts_s": n * prompts / t_total, "enc_ms": 1e3 * t_enc / n, "fuse_ms": 1e3 * t_fuse / n,
            "dec_ms": 1e3 * t_dec / n, "total_ms": 1e3 * t_total / n, "enc_per_image": enc_per_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--variants", nargs="+", default=["sam", "sam2"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from pseudolabel.jobs.demo.data import render_index

    images = [render_index(0, i, args.image_size).image for i in range(args.images)]
    print(f"# machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}, {args.images} images of {args.image_size}², best of {args.repeats}")
    print("| variant | size | prompts/img | images/s | prompts/s | SAM encoder ms/img | BEiT-3 fusion ms/img "
          "| decoder ms/img | total ms/img | SAM encoder passes/img |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for variant in args.variants:
            for p in args.prompts:
                r = bench_one(variant, size, p, images, args.repeats, args.device)
                print(f"| {r['variant']} | {r['size']} | {p} | {r['images_s']:.2f} | {r['prompts_s']:.1f} | "
                      f"{r['enc_ms']:.1f} | {r['fuse_ms']:.1f} | {r['dec_ms']:.1f} | {r['total_ms']:.1f} | "
                      f"{r['enc_per_image']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
