"""Read and check a safetensors file's header without reading its tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets`` (relative to the end of the header), then the data. Create
checks every header here, so a damaged or truncated file is refused with a clear message instead
of failing when a request loads the model.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from ..errors import BadRequest

# Bytes per element; sub-byte and exotic dtypes are checked for bounds only.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER = 100 << 20  # the format's own limit


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} plus "__metadata__" if present."""
    where = f"{path.parent.name}/{path.name}"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"{where} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadRequest(f"{where} is not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, st.st_size - 8):
                raise BadRequest(
                    f"{where}: header length {n} is larger than the file allows (the file is damaged or truncated)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise BadRequest(f"cannot read {where}: {exc}") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"{where}: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BadRequest(f"{where}: the header is not a JSON object")
    _check(header, st.st_size - 8 - n, where)
    return header


def _check(header: dict, data_size: int, where: str) -> None:
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise BadRequest(f"{where}: tensor {name!r} is not described by an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str):
            raise BadRequest(f"{where}: tensor {name!r} has no dtype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise BadRequest(f"{where}: tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise BadRequest(f"{where}: tensor {name!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise BadRequest(
                f"{where}: tensor {name!r} ends at byte {end} of {data_size} data "
                "bytes (the file is damaged or truncated)"
            )
        count = 1
        for d in shape:
            count *= d
        if dtype in DTYPE_BYTES and count * DTYPE_BYTES[dtype] != end - begin:
            raise BadRequest(
                f"{where}: tensor {name!r} ({dtype} {shape}) needs "
                f"{count * DTYPE_BYTES[dtype]} bytes, its offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, end, name) in zip(spans, spans[1:]):
        if begin < prev_end and end > begin:
            raise BadRequest(f"{where}: tensor {name!r} overlaps tensor {prev!r}")
