"""Device-half helpers: host copies and the torch.compile switch with its eager fallback."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pseudolabel.models.device import compiled, to_host


def test_to_host_keeps_shapes_dtypes_and_values():
    tensors = [torch.arange(6, dtype=torch.int32).reshape(2, 3), torch.linspace(0, 1, 5).to(torch.float16),
               torch.ones(2, 2, dtype=torch.uint8)]
    out = to_host(tensors)
    assert [a.dtype for a in out] == [np.int32, np.float16, np.uint8]
    for a, t in zip(out, tensors):
        assert isinstance(a, np.ndarray) and np.array_equal(a, t.numpy())
    assert to_host([]) == []


def test_compile_off_returns_the_function_itself():
    def f(x):
        return x + 1

    assert compiled(f, False, "x") is f


def test_compile_failure_falls_back_to_eager_once_with_a_warning(monkeypatch, caplog):
    calls = {"compiled": 0}

    def broken_compile(fn):
        def run(*args, **kwargs):
            calls["compiled"] += 1
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="pseudolabel"):
        f = compiled(lambda x: x * 2, True, "directsam")
        assert f(3) == 6 and f(4) == 8
    assert calls["compiled"] == 1  # tried once, then eager for good
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "directsam: torch.compile failed (RuntimeError: no compiler here)" in warnings[0]


def test_compile_unavailable_at_wrap_time_runs_eager(monkeypatch, caplog):
    def unavailable(fn):
        raise RuntimeError("unsupported platform")

    monkeypatch.setattr(torch, "compile", unavailable)
    with caplog.at_level(logging.WARNING, logger="pseudolabel"):
        f = compiled(lambda x: x - 1, True, "iseg")
    assert f(1) == 0
    assert any("iseg: torch.compile unavailable" in r.getMessage() for r in caplog.records)


def test_one_dtype_rule_for_every_labeler():
    import torch

    from pseudolabel.models.device import resolve_dtype
    from pseudolabel.models.registry import labeler_class

    assert resolve_dtype("auto", "cpu", "bfloat16") == torch.float32
    assert resolve_dtype(None, "mps") == torch.float32
    assert resolve_dtype("auto", "cuda:3", "bfloat16") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16  # as asked, on any device
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")
    assert labeler_class("directsam").cuda_dtype == "bfloat16"
    assert {labeler_class(n).cuda_dtype for n in ("evf_sam", "iseg", "foba", "incontext")} == {"float16"}
