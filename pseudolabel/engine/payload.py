"""Device-half payloads as bytes between stages: ``dict[str, np.ndarray] | None`` <-> bytes | None.

The format is NumPy's own ``.npy`` per array, framed by a small JSON header (names and byte lengths):
no pickling either way (``allow_pickle=False``), any dtype NumPy stores natively, exact round trip.
"""
from __future__ import annotations

import io
import json
import struct

import numpy as np

_HEADER = struct.Struct("<I")  # length of the JSON index that follows


def pack_payload(payload: dict[str, np.ndarray] | None) -> bytes | None:
    """{name: array} -> bytes (None stays None). Values are converted with ``np.asarray``."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise TypeError(f"a payload is a dict of arrays or None, got {type(payload).__name__}")
    parts, index = [], []
    for name, value in payload.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        parts.append(buf.getvalue())
        index.append([str(name), len(parts[-1])])
    head = json.dumps(index).encode()
    return b"".join([_HEADER.pack(len(head)), head, *parts])


def unpack_payload(data: bytes | None) -> dict[str, np.ndarray] | None:
    """Inverse of ``pack_payload``."""
    if data is None:
        return None
    (n,) = _HEADER.unpack_from(data, 0)
    index = json.loads(data[_HEADER.size:_HEADER.size + n])
    view, pos, out = memoryview(data), _HEADER.size + n, {}
    for name, size in index:
        out[name] = np.load(io.BytesIO(view[pos:pos + size]), allow_pickle=False)
        pos += size
    return out
