"""Token post-processing throughput: boundary map -> tokens (both modes), label map -> RLE, and the
classical baseline labelers end to end on demo images.

Usage: python bench/bench_tokens.py [--repeats 5] [--cells 500]

Boundary maps are synthetic and realistic in structure: the blurred edges of a random Voronoi
partition with ``--cells`` cells plus faint noise, so each map yields about that many tokens.
Prints one table; wall and CPU milliseconds per call (median over repeats) so a busy machine shows.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import numpy as np
from scipy import ndimage

from pseudolabel.models.tokens import boundary_to_tokens
from pseudolabel.schemas.coco import label_map_to_rles, mask_to_rle


def voronoi_boundary_map(size: int, cells: int, seed: int = 0) -> np.ndarray:
    """(size, size) float32 in [0, 1]: blurred Voronoi cell edges + noise."""
    rng = np.random.default_rng(seed)
    pts = rng.random((cells, 2)) * size
    seeds = np.zeros((size, size), bool)
    seeds[pts[:, 0].astype(int), pts[:, 1].astype(int)] = True
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    cell = iy * size + ix
    edge = np.zeros((size, size), np.float32)
    edge[:, 1:] += cell[:, 1:] != cell[:, :-1]
    edge[1:, :] += cell[1:, :] != cell[:-1, :]
    edge = cv2.GaussianBlur(np.minimum(edge, 1.0), (0, 0), 1.5)
    edge = edge / edge.max() + rng.random(edge.shape).astype(np.float32) * 0.05
    return np.clip(edge, 0, 1).astype(np.float32)


def timed(fn, repeats: int):
    """(result, median wall ms, median cpu ms)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append((time.perf_counter() - w0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    return out, float(np.median(walls)), float(np.median(cpus))


def per_mask_rles(label_map: np.ndarray) -> list[dict]:
    """Reference: one full-size mask comparison and one pycocotools call per token."""
    return [mask_to_rle(label_map == k) for k in range(1, int(label_map.max()) + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cells", type=int, default=500)
    args = ap.parse_args()
    rows = []

    # 1. boundary -> tokens, both modes
    label_maps = {}
    for size in (512, 1024):
        prob = voronoi_boundary_map(size, args.cells)
        for mode in ("simple", "partition"):
            tokens, wall, cpu = timed(lambda prob=prob, mode=mode: boundary_to_tokens(prob, 0.2, mode), args.repeats)
            k = int(tokens.label_map.max())
            rows.append((f"boundary_to_tokens {mode}", f"{size}²", k, wall, cpu, k / (wall / 1e3)))
            label_maps[(size, mode)] = tokens.label_map
        _, wall, cpu = timed(lambda prob=prob: boundary_to_tokens(prob, 0.2, "partition", max_tokens=100),
                             args.repeats)
        rows.append(("boundary_to_tokens partition max_tokens=100", f"{size}²", 100, wall, cpu, 100 / (wall / 1e3)))

    # 2. label map -> RLE: the vectorised encoder vs one mask at a time
    for size in (512, 1024):
        lm = label_maps[(size, "partition")]
        k = int(lm.max())
        rles, wall, cpu = timed(lambda lm=lm: label_map_to_rles(lm), args.repeats)
        rows.append(("label_map_to_rles (runs, one pass)", f"{size}²", k, wall, cpu, k / (wall / 1e3)))
        ref, wall, cpu = timed(lambda lm=lm: per_mask_rles(lm), 1)
        assert ref == rles[0], "encoders disagree"
        rows.append(("mask_to_rle per token (reference)", f"{size}²", k, wall, cpu, k / (wall / 1e3)))

    # 3. classical labelers end to end on demo images (256 px)
    from pseudolabel.jobs.demo.data import render_index
    from pseudolabel.models.classical import EdgeTokens, GrabCutForeground
    from pseudolabel.schemas.spec import LabelerSpec

    images = [render_index(0, i, 256).image for i in range(8)]
    for cls, name in ((EdgeTokens, "classical_tokens"), (GrabCutForeground, "classical_grabcut")):
        labeler = cls(LabelerSpec(name=name))
        outs, wall, cpu = timed(lambda labeler=labeler: labeler(images), max(1, args.repeats // 2))
        n = sum(int(o.tokens.label_map.max()) if o.tokens is not None else len(o.instances) for o in outs)
        rows.append((f"{name} labeler (per image)", "256²", n / len(images), wall / len(images),
                     cpu / len(images), len(images) / (wall / 1e3)))

    # 4. table
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; repeats={args.repeats}, cells={args.cells}")
    print(f"| {'what':<46} | {'size':>6} | {'tokens':>7} | {'wall ms':>9} | {'cpu ms':>9} | {'per s (wall)':>12} |")
    print(f"|{'-' * 48}|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 11}|{'-' * 14}|")
    for what, size, k, wall, cpu, rate in rows:
        print(f"| {what:<46} | {size:>6} | {k:>7.0f} | {wall:>9.1f} | {cpu:>9.1f} | {rate:>12.0f} |")
    print("per s: tokens/s for post-processing and RLE rows, images/s for labeler rows; "
          "labeler rows: tokens = mean tokens (or instances) per image")


if __name__ == "__main__":
    main()
