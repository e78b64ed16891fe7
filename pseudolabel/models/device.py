"""Device-half helpers shared by the labelers: the dtype rule, copies to the host and optional ``torch.compile``.

- ``resolve_dtype``: the one meaning of a labeler spec's ``dtype``: a named dtype is used as asked on
  any device; ``auto`` is the labeler's ``cuda_dtype`` on CUDA and float32 elsewhere.

- ``to_host``: device tensors -> NumPy arrays for a payload. On CUDA each tensor is copied into pinned
  host memory with a non-blocking copy and the stream is synchronised once for the whole list, so
  the copies of a batch overlap one another instead of each waiting for the GPU.
- ``to_device``: a host array -> a tensor on the device; on CUDA through pinned memory with a
  non-blocking copy (the copy overlaps what the GPU is still doing).
- ``channel_lookup``: uint8 pixels -> a processor's rescaled, normalised values through a per-channel
  table of 256 levels (exact: the table is the processor's own arithmetic).
- ``compiled``: wrap a module's forward in ``torch.compile`` when the labeler spec asks for it
  (``compile: true``), falling back to eager, with one warning, when compilation is unavailable or
  fails on the first call.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

#: spec dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(requested: str | torch.dtype | None, device: str, cuda_dtype: str = "float16") -> torch.dtype:
    """The torch dtype a labeler computes in.

    Args:
        requested: the spec's ``dtype`` (``auto``, ``float32``, ``float16``, ``bfloat16``), a torch dtype,
            or None (= ``auto``).
        device: the torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
        cuda_dtype: what ``auto`` means on CUDA for this labeler (its ``Labeler.cuda_dtype``).

    Returns:
        a named dtype as asked, on any device; ``auto``: ``cuda_dtype`` on CUDA, float32 elsewhere.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "auto"):
        return DTYPES[cuda_dtype] if str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[requested]
    except KeyError:
        raise ValueError(f"dtype {requested!r}: expected one of auto, {', '.join(DTYPES)}") from None


def to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Tensors on any device -> NumPy arrays (same shapes and dtypes; bfloat16 is not a NumPy dtype:
    convert it before)."""
    if not tensors:
        return []
    if not any(t.is_cuda for t in tensors):
        return [t.detach().numpy() if t.device.type == "cpu" else t.detach().cpu().numpy() for t in tensors]
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        hosts.append(host)
    torch.cuda.synchronize()
    return [h.numpy() for h in hosts]


def to_device(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """A NumPy array -> a tensor of the same shape and dtype on ``device`` (pinned + non-blocking on CUDA;
    the array itself on the CPU, no copy when it is contiguous and writable)."""
    host = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else np.array(array))
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def channel_lookup(table: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup of uint8 levels: an image processor's rescale + normalise, made exact.

    Args:
        table: (3, 256) float32, the network input for each uint8 level of each channel.
        pixels: (N, 3, H, W) uint8 (or integer-valued) tensor, any layout, on its device.

    Returns:
        (N, 3, H, W) float32 contiguous, ``table[c, pixels[n, c, y, x]]``, on ``pixels``' device.
    """
    flat = torch.from_numpy(np.ascontiguousarray(table, np.float32)).to(pixels.device).reshape(-1)
    offset = (torch.arange(3, device=pixels.device, dtype=torch.int32) * 256).view(1, 3, 1, 1)
    index = pixels.to(torch.int32) + offset
    return torch.index_select(flat, 0, index.reshape(-1)).view(index.shape)


def compiled(fn: Callable, enabled: bool, what: str) -> Callable:
    """``fn`` through ``torch.compile`` when ``enabled``; on any compile error, ``fn`` itself.

    Compilation happens on the first call (and again for new input shapes); if that call fails the
    wrapper logs one warning naming ``what`` and runs eager from then on.
    """
    if not enabled:
        return fn
    try:
        fast = torch.compile(fn)
    except Exception as err:  # no compiler toolchain, unsupported platform...
        log.warning("%s: torch.compile unavailable (%s: %s); running eager", what, type(err).__name__, err)
        return fn
    state = {"fast": fast}

    def run(*args, **kwargs):
        if state["fast"] is not None:
            try:
                return state["fast"](*args, **kwargs)
            except Exception as err:
                log.warning("%s: torch.compile failed (%s: %s); running eager", what, type(err).__name__, err)
                state["fast"] = None
        return fn(*args, **kwargs)

    return run
