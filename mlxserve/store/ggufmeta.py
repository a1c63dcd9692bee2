"""Read a GGUF file's header (metadata and tensor table) without reading its tensors.

``gguf.GGUFReader`` builds numpy views for every vocabulary string (seconds for a 49k-token
vocabulary) and ``mx.load`` reads every tensor; create needs only the header, so this parses it
directly from an mmap. Values come back as plain Python objects, which
``mlxserve.engine.gguf.scalar`` and ``config_from_metadata`` accept as they are.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..errors import BadRequest

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
_MAX_NESTING = 8  # arrays of arrays: deeper than this is a crafted file, not a model
GGML_MAX_DIMS = 4
# What engine/gguf.py builds (the store must not import the engine); a test keeps them equal.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "gpt-oss")


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
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            if depth >= _MAX_NESTING:
                raise ValueError("metadata arrays nested too deeply")
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype == STRING:
                return [self.string() for _ in range(n)]
            if itype in _NP:
                size = np.dtype(_NP[itype]).itemsize
                if n > (len(self.buf) - self.pos) // size:
                    raise ValueError("metadata array runs past the end of the file")
                # A copy: a view would pin the mmap, which must close when parsing ends.
                values = np.frombuffer(self.buf, dtype=_NP[itype], count=n, offset=self.pos).tolist()
                self.pos += n * size
                return values
            return [self.value(itype, depth + 1) for _ in range(n)]
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise ValueError(f"unknown GGUF value type {vtype}")


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic (a FIFO or a device
    is never opened: opening a FIFO blocks until someone writes to it)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_header(path: Path) -> GGUFHeader:
    """Raises BadRequest for anything that is not a readable GGUF v2/v3 file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadRequest(f"{path.name} is not a regular file")
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
        if ndim > GGML_MAX_DIMS:
            raise BadRequest(
                f"{path.name}: tensor {name!r} has {ndim} dimensions (at most {GGML_MAX_DIMS}; the file is damaged)"
            )
        dims = [cur.unpack("<Q") for _ in range(ndim)]
        ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
        raw_tensors.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise BadRequest(f"{path.name}: bad general.alignment {alignment!r}")
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = [TensorInfo(n, s, t, data_offset + o) for n, s, t, o in raw_tensors]
    _check_tensors(tensors, alignment, data_offset, len(buf), path)
    return GGUFHeader(metadata, tensors, data_offset)


def _check_tensors(tensors: list[TensorInfo], alignment: int, data_offset: int, file_size: int, path: Path) -> None:
    """Every tensor's data must lie inside the file, aligned, without overlapping another: a
    truncated or crafted file is refused here instead of failing when a request loads it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def bad(t: TensorInfo, why: str) -> BadRequest:
        return BadRequest(f"{path.name}: tensor {t.name!r} {why} (the file is damaged or truncated)")

    if data_offset > file_size and tensors:
        raise BadRequest(f"{path.name}: the tensor data is missing (the file is truncated)")
    spans = []
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise bad(t, "appears twice")
        names.add(t.name)
        try:
            block, _size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        except ValueError:
            raise bad(t, f"has an unknown type {t.ggml_type}") from None
        if not 1 <= len(t.shape) <= GGML_MAX_DIMS or any(d <= 0 for d in t.shape):
            raise bad(t, f"has a bad shape {list(t.shape)}")
        if t.n_elements >= 1 << 62 or t.shape[-1] % block:
            raise bad(t, f"has a shape {list(t.shape)} its type cannot hold")
        if (t.offset - data_offset) % alignment:
            raise bad(t, f"starts at an unaligned offset {t.offset - data_offset}")
        end = t.offset + tensor_bytes(t)
        if end > file_size:
            raise bad(t, f"ends at byte {end}, past the end of the file ({file_size} bytes)")
        spans.append((t.offset, end, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    for (_, prev_end, prev), (start, _, t) in zip(spans, spans[1:]):
        if start < prev_end:
            raise bad(t, f"overlaps tensor {prev.name!r}")


def tensor_bytes(info: TensorInfo) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    return info.n_elements // block * type_size
