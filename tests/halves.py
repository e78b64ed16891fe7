"""Test helper: LabelOutputs compared field by field, exactly (the two halves vs the whole labeler)."""
from __future__ import annotations

import numpy as np


def assert_same_output(a, b) -> None:
    """One LabelOutput against another: instances (mask, category, id, score, prompt), layers, tokens."""
    assert len(a.instances) == len(b.instances)
    for x, y in zip(a.instances, b.instances):
        assert x.mask.dtype == y.mask.dtype and np.array_equal(x.mask, y.mask)
        assert (x.category_id, x.category, x.score, x.prompt) == (y.category_id, y.category, y.score, y.prompt)
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        assert a.layers[name].dtype == b.layers[name].dtype and np.array_equal(a.layers[name], b.layers[name])
    assert (a.tokens is None) == (b.tokens is None)
    if a.tokens is not None:
        for field in ("label_map", "boundary_score", "embeddings"):
            u, v = getattr(a.tokens, field), getattr(b.tokens, field)
            assert (u is None and v is None) or np.array_equal(u, v)


def assert_same_outputs(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert_same_output(a, b)
