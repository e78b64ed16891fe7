"""Test helpers for labelers' ``prepare``: small images, the engine's shipping, bit-exact comparisons."""
from __future__ import annotations

import numpy as np

from pseudolabel.engine.payload import pack_payload, unpack_payload


def two_images(seed: int = 0) -> list[np.ndarray]:
    """Two non-square (H, W, 3) uint8 RGB images: a wide and a tall one, both within 64 px."""
    rng = np.random.default_rng(seed)
    wide = np.full((48, 64, 3), 40, np.uint8)
    wide[10:30, 20:50] = (220, 180, 60)
    wide = np.clip(wide + rng.integers(0, 30, wide.shape), 0, 255).astype(np.uint8)
    tall = rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)
    return [wide, tall]


def shipped(prepared: list) -> list:
    """Prepared inputs as the engine ships them: each dict through ``pack_payload``/``unpack_payload``
    (None stays None)."""
    return [None if p is None else unpack_payload(pack_payload(p)) for p in prepared]


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Two dicts of arrays equal bit for bit: same keys, dtypes, shapes and values."""
    assert set(a) == set(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


def assert_same_payloads(a: list, b: list) -> None:
    """Two lists of payloads (dicts of arrays) equal bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_same_arrays(x, y)
