"""Device-half payloads as bytes between stages: ``dict[str, np.ndarray] | None`` <-> bytes | None.

The format is NumPy's own ``.npy`` per array, framed by a small JSON header (names and byte lengths):
no pickling either way, any dtype NumPy stores natively, exact round trip. Payloads can be megabytes
per image (network-sized views, boundary maps), so each side copies an array's data once: packing
joins the headers and the arrays' own buffers, unpacking reads each array straight out of the buffer
it is handed (``bytes``, a ``memoryview`` or a ``pyarrow.Buffer``) into a new, writable array.
"""
from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
from numpy.lib import format as npy

_HEADER = struct.Struct("<I")  # length of the JSON index that follows


def _npy_parts(value: Any) -> list:
    """An array's ``.npy`` header and its data buffer (C order), without copying the data."""
    array = np.asarray(value)
    if not array.flags.c_contiguous:  # (never for 0-d arrays, which ascontiguousarray would make 1-d)
        array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("a payload array cannot hold Python objects (no pickling)")
    head = io.BytesIO()
    npy.write_array_header_1_0(head, npy.header_data_from_array_1_0(array))
    return [head.getvalue(), array.reshape(-1).view(np.uint8).data]


def pack_payload(payload: dict[str, np.ndarray] | None) -> bytes | None:
    """{name: array} -> bytes (None stays None). Values are converted with ``np.asarray``."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise TypeError(f"a payload is a dict of arrays or None, got {type(payload).__name__}")
    parts, index = [], []
    for name, value in payload.items():
        head, data = _npy_parts(value)
        parts += [head, data]
        index.append([str(name), len(head) + data.nbytes])
    head = json.dumps(index).encode()
    return b"".join([_HEADER.pack(len(head)), head, *parts])


def unpack_payload(data) -> dict[str, np.ndarray] | None:
    """Inverse of ``pack_payload``; ``data``: bytes, memoryview or ``pyarrow.Buffer`` (None stays None)."""
    if data is None:
        return None
    view = memoryview(data).cast("B")
    (n,) = _HEADER.unpack_from(view, 0)
    index = json.loads(bytes(view[_HEADER.size:_HEADER.size + n]))
    pos, out = _HEADER.size + n, {}
    for name, size in index:
        head = io.BytesIO(view[pos:pos + min(size, 4096)])
        version = npy.read_magic(head)
        shape, fortran, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(head)
        start = pos + head.tell()
        count = int(np.prod(shape, dtype=np.int64))
        flat = np.frombuffer(view[start:pos + size], dtype=dtype, count=count)
        out[name] = flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
        pos += size
    return out
