"""Which GGUF files are converted at create, and what their tensors become.

GGUF files whose tensor types ``mx.load`` keeps quantized (Q4_0, Q4_1, Q8_0) or reads exactly
(F32, F16) are stored and run as they are. Any other type is converted once, at create, into an
mlx-lm directory (engine/convert.py, engine/ggufquant.py). This module reads only the header,
so the store imports no MLX; the conversions themselves are in engine/, injected as a
``Converter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from gguf.constants import GGMLQuantizationType as T

from ..errors import BadRequest, EngineError, MlxserveError
from .ggufmeta import GGUFHeader, TensorInfo

# Tensor types mx.load keeps quantized (Q*) or reads exactly (F*): such files are stored as is.
KEPT_TYPES = frozenset({T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q8_0})
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16, T.F64})
# Q* -> bits that become MLX's affine form code for code (group 32, scales rounded to float16).
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q8_0: 8, T.Q5_0: 8, T.Q5_1: 8, T.Q5_K: 8, T.MXFP4: 4}
GROUP_SIZE = 64  # --quantize of a safetensors directory
GGUF_GROUP = 32


def needs_conversion(header: GGUFHeader) -> bool:
    for t in header.tensors:
        try:
            T(t.ggml_type)
        except ValueError:
            raise BadRequest(f"tensor {t.name} has an unknown GGUF type {t.ggml_type}") from None
    return any(T(t.ggml_type) not in KEPT_TYPES for t in header.tensors)


def bits_for(qtype: T) -> int:
    """The MLX bit width a quantized GGUF type becomes: the exact ones as above; the rest
    (Q6_K, Q3_K, Q2_K, IQ*: 16-value sub-blocks or codebooks) are re-quantized to 8 bits:
    re-quantized to 4 bits they drift about ten times further from llama.cpp's logprobs."""
    return EXACT_BITS.get(qtype, 8)


def describe_type(qtype: T) -> str:
    """What one GGUF tensor type becomes in mlxserve, e.g. "4-bit group 32 (exact), 5 bits a
    weight" (a float16 scale and bias per group of 32 add one bit a weight)."""
    if qtype in FLOAT_TYPES:
        return {T.BF16: "bfloat16", T.F16: "float16"}.get(qtype, "float32")
    if qtype == T.MXFP4:  # MLX's own mxfp4 mode: one E8M0 byte a group of 32
        return f"mxfp4 group {GGUF_GROUP} (exact), 4.25 bits a weight"
    how = "exact" if qtype in EXACT_BITS else "re-quantized"
    bits = bits_for(qtype)
    return f"{bits}-bit group {GGUF_GROUP} ({how}), {bits + 32 // GGUF_GROUP} bits a weight"


def describe(header: GGUFHeader) -> dict[str, str]:
    """{GGUF type name: what it becomes} for the file's matrices (1-D tensors stay float)."""
    seen = sorted({T(t.ggml_type) for t in header.tensors if len(t.shape) >= 2}, key=lambda q: q.name)
    return {q.name: describe_type(q) for q in seen}


class Converter(Protocol):
    """The conversions that need MLX, given to the store by whoever opens it (the daemon and the
    CLI pass the module engine/convert.py), so the store itself imports no MLX."""

    def convert_gguf(
        self,
        path: Path,
        metadata: dict[str, Any],
        tensors: Sequence[TensorInfo],
        out_dir: Path,
        bits_for: Callable[[T], int],
        progress: Callable[[dict], None] | None = None,
    ) -> dict[str, Any]: ...

    def quantize_directory(self, src: Path, out_dir: Path, bits: int, group_size: int) -> dict[str, Any]: ...

    def knows_model_type(self, config: dict[str, Any]) -> bool: ...


def _engine(converter: Converter | None) -> Converter:
    if converter is None:  # a programming error: the store was opened for reading only
        raise EngineError("this store was opened without the engine's conversions (Store(converter=...))")
    return converter


def convert_gguf(
    converter: Converter | None,
    path: Path,
    header: GGUFHeader,
    out_dir: Path,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Write an mlx-lm directory for the GGUF at ``path`` into ``out_dir``; returns its config."""
    engine = _engine(converter)
    try:
        return engine.convert_gguf(path, header.metadata, header.tensors, out_dir, bits_for, progress)
    except (MlxserveError, NotImplementedError) as exc:  # NotImplementedError: gguf cannot decode it
        raise BadRequest(f"cannot convert {path.name}: {exc}") from None


def quantize_directory(converter: Converter | None, src: Path, out_dir: Path, bits: int) -> dict[str, Any]:
    """Quantize a float mlx-lm / HF directory with mlx-lm (group 64)."""
    engine = _engine(converter)
    try:
        return engine.quantize_directory(src, out_dir, bits, GROUP_SIZE)
    except ValueError as exc:
        raise BadRequest(f"cannot quantize {src.name}: {exc}") from None


def knows_model_type(converter: Converter | None, config: dict[str, Any]) -> bool:
    return _engine(converter).knows_model_type(config)
