"""Read a GGUF file's header (metadata and tensor table) without reading its tensors.

``gguf.GGUFReader`` builds numpy views for every vocabulary string (seconds for a 49k-token
vocabulary) and ``mx.load`` reads every tensor; create needs only the header, so this parses it
directly from an mmap. Values come back as plain Python objects, which
``mlxserve.engine.gguf.scalar`` and ``config_from_metadata`` accept as they are.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..errors import BadRequest

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8",
       11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@attrs.frozen
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), the reverse of GGUF's ne[]
    ggml_type: int
    offset: int  # absolute offset of the data in the file

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@attrs.frozen
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int


class _Cursor:
    def __init__(self, buf: Any):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype == STRING:
                return [self.string() for _ in range(n)]
            if itype in _NP:
                arr = np.frombuffer(self.buf, dtype=_NP[itype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(itype) for _ in range(n)]
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise ValueError(f"unknown GGUF value type {vtype}")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_header(path: Path) -> GGUFHeader:
    """Raises BadRequest for anything that is not a readable GGUF v2/v3 file."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path)
    except BadRequest:
        raise
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read GGUF file {path.name}: {exc}") from None


def _parse(buf: Any, path: Path) -> GGUFHeader:
    cur = _Cursor(buf)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise BadRequest(f"{path.name} is not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise BadRequest(f"{path.name}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    raw_tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        ndim = cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(ndim)]
        ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
        raw_tensors.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise BadRequest(f"{path.name}: bad general.alignment {alignment!r}")
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = [TensorInfo(n, s, t, data_offset + o) for n, s, t, o in raw_tensors]
    return GGUFHeader(metadata, tensors, data_offset)


def tensor_bytes(info: TensorInfo) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    return info.n_elements // block * type_size
