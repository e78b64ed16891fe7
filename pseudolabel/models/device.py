"""Device-half helpers shared by the labelers: copies to the host and optional ``torch.compile``.

- ``to_host``: device tensors -> NumPy arrays for a payload. On CUDA each tensor is copied into pinned
  host memory with a non-blocking copy and the stream is synchronised once for the whole list, so
  the copies of a batch overlap one another instead of each waiting for the GPU.
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
