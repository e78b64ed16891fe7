"""In-context canvases: stitch a demonstration pair and a query into one model input, crop the answer.

Pure numpy helpers, no model code. Images are (H, W, C) arrays of any dtype (uint8 RGB in [0, 255] or
float32 in [0, 1]); cells are square, ``cell`` × ``cell`` pixels.

Layouts:

- ``grid`` (2×2, SeFM): one canvas of (2·cell, 2·cell, C)::

      [ demo in | demo out ]
      [ query   | query    ]     answer cell = bottom-right

  The model repaints the bottom-right cell so that (query → answer) matches (demo in → demo out).
- ``vertical`` (2×1, the Painter/SegGPT style): an image column [demo in; query] and a target column
  [demo out; query], each (2·cell, cell, C), stacked along channels into one (2·cell, cell, 2·C)
  array; answer cell = bottom of the target column (the model's 3-channel output is (2·cell, cell, 3)).

``stitch`` resizes each image to the cell; ``split`` returns the cells; for images that already have the
cell's size the two are exact inverses. ``crop_answer`` takes the model output canvas and returns the
answer cell, optionally resized back to the query's (H, W).
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

Layout = Literal["grid", "vertical"]
LAYOUTS: tuple[str, ...] = ("grid", "vertical")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown canvas layout {layout!r}; expected one of {list(LAYOUTS)}")


def canvas_shape(cell: int, layout: Layout = "grid", channels: int = 3) -> tuple[int, int, int]:
    """(H, W, C) of the stitched input canvas."""
    _check_layout(layout)
    return (2 * cell, 2 * cell, channels) if layout == "grid" else (2 * cell, cell, 2 * channels)


def output_shape(cell: int, layout: Layout = "grid", channels: int = 3) -> tuple[int, int, int]:
    """(H, W, C) of the model's output canvas (the target canvas for ``vertical``)."""
    _check_layout(layout)
    return (2 * cell, 2 * cell, channels) if layout == "grid" else (2 * cell, cell, channels)


def answer_box(cell: int, layout: Layout = "grid") -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the answer cell in the output canvas."""
    _check_layout(layout)
    return (cell, 2 * cell, cell, 2 * cell) if layout == "grid" else (cell, 2 * cell, 0, cell)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) array to (height, width); same dtype.

    Area averaging when shrinking, bilinear when enlarging; a no-op (a copy) at the same size.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.copy()
    interp = cv2.INTER_AREA if height <= h and width <= w else cv2.INTER_LINEAR
    channels = image.shape[2] if image.ndim == 3 else 0
    if channels > 4:  # OpenCV resizes at most 4 channels at once (and up to 512 in some builds)
        return np.concatenate([resize(image[..., i:i + 3], height, width) for i in range(0, channels, 3)], axis=2)
    out = cv2.resize(image, (width, height), interpolation=interp)
    if image.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def to_cell(image: np.ndarray, cell: int) -> np.ndarray:
    """(H, W, C) -> (cell, cell, C), squashing the aspect ratio (undone by ``crop_answer``)."""
    return resize(image, cell, cell)


def stitch(demo_in: np.ndarray, demo_out: np.ndarray, query: np.ndarray, cell: int = 256,
           layout: Layout = "grid") -> np.ndarray:
    """Build the model input canvas.

    Args:
        demo_in, demo_out, query: (H_i, W_i, C) arrays of one dtype (sizes may differ).
        cell: side of each square cell in pixels.
        layout: ``grid`` or ``vertical`` (see the module docstring).

    Returns:
        ``grid``: (2·cell, 2·cell, C); ``vertical``: (2·cell, cell, 2·C); same dtype as the inputs.
    """
    _check_layout(layout)
    a, b, q = (to_cell(x, cell) for x in (demo_in, demo_out, query))
    if layout == "grid":
        return np.concatenate([np.concatenate([a, b], axis=1), np.concatenate([q, q], axis=1)], axis=0)
    image_col = np.concatenate([a, q], axis=0)
    target_col = np.concatenate([b, q], axis=0)
    return np.concatenate([image_col, target_col], axis=2)


def split(canvas: np.ndarray, layout: Layout = "grid") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``stitch`` for cell-sized inputs: (demo in, demo out, query), each (cell, cell, C)."""
    _check_layout(layout)
    if layout == "grid":
        cell = canvas.shape[0] // 2
        return canvas[:cell, :cell].copy(), canvas[:cell, cell:].copy(), canvas[cell:, :cell].copy()
    cell, c = canvas.shape[1], canvas.shape[2] // 2
    return canvas[:cell, :, :c].copy(), canvas[:cell, :, c:].copy(), canvas[cell:, :, :c].copy()


def crop_answer(output: np.ndarray, layout: Layout = "grid", size: tuple[int, int] | None = None) -> np.ndarray:
    """The answer cell of a model output canvas.

    Args:
        output: (2·cell, 2·cell, C) for ``grid`` or (2·cell, cell, C) for ``vertical``.
        size: (H, W) to resize the cell back to (the query's size), or None to keep (cell, cell).

    Returns:
        (cell, cell, C) or (H, W, C), same dtype as ``output``.
    """
    cell = output.shape[0] // 2
    y0, y1, x0, x1 = answer_box(cell, layout)
    ans = output[y0:y1, x0:x1].copy()
    return ans if size is None else resize(ans, int(size[0]), int(size[1]))


def transfer_residual(query: np.ndarray, query_cell: np.ndarray, answer_cell: np.ndarray) -> np.ndarray:
    """Apply a cell-resolution edit to the full-resolution query.

    clean = query + resize(answer_cell − query_cell, query size). Keeps the query's own detail where the
    model changed nothing (an identity model gives back the query exactly).

    Args:
        query: (H, W, 3) float32 in [0, 1].
        query_cell, answer_cell: (cell, cell, 3) float32 in [0, 1].

    Returns:
        (H, W, 3) float32 clipped to [0, 1].
    """
    delta = (answer_cell.astype(np.float32) - query_cell.astype(np.float32))
    delta = resize(delta, query.shape[0], query.shape[1])
    return np.clip(query.astype(np.float32) + delta, 0.0, 1.0)
