"""GGUF tensor data -> MLX tensors, without ``mx.load``'s GGUF decoder.

MLX's affine quantization is ``w = scale * q + bias`` per group of 32 or more values. Several
GGUF types are exactly that per 32 values and are unpacked code for code (their scales rounded to
float16, as ``mx.load`` stores them): Q4_0, Q4_1 and Q4_K become 4-bit, Q8_0, Q5_0, Q5_1 and Q5_K
8-bit (MLX has 5-bit too, but the CPU kernels of engine/cpu run 4 and 8 bits only). Types with
16-value sub-blocks (Q6_K, Q3_K, Q2_K) and the IQ types are dequantized with the ``gguf``
package (the reference decoder; ``mx.load`` gets Q4_K wrong and cannot read Q5_K) and
re-quantized. MXFP4 (gpt-oss's experts) is MLX's own mxfp4 mode, code for code. Which bits
each type gets is the caller's choice (store/convert.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

GROUP = 32
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16, T.F64})
# Types that are MLX's affine form per 32 values, and their bits (5-bit codes fit 8-bit ones).
NATIVE_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q5_K: 5, T.Q8_0: 8}


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) float32."""
    return b.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1/Q5_* blocks: value j in the low nibble of byte j, value j+16 in its high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and minimums of Q4_K/Q5_K's eight sub-blocks (as gguf's get_scale_min)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(n, 8)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(n, 8)
    return sc.astype(np.float32), mn.astype(np.float32)


def _codes(blocks: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (n, groups, 32) uint8, scales (n, groups), biases (n, groups)) for n blocks."""
    n = blocks.shape[0]
    if qtype == T.Q8_0:
        d = _f16(blocks[:, None, 0:2])
        q = blocks[:, None, 2:].view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d, -128.0 * d
    if qtype in (T.Q4_0, T.Q4_1):
        d = _f16(blocks[:, None, 0:2])
        if qtype == T.Q4_0:
            return _nibbles(blocks[:, None, 2:]), d, -8.0 * d
        return _nibbles(blocks[:, None, 4:]), d, _f16(blocks[:, None, 2:4])
    if qtype in (T.Q5_0, T.Q5_1):
        d = _f16(blocks[:, None, 0:2])
        at = 2 if qtype == T.Q5_0 else 4
        qh = blocks[:, at : at + 4].copy().view(np.uint32)  # (n, 1): bit j is value j's fifth bit
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        q = _nibbles(blocks[:, None, at + 4 :]) | high[:, None, :]
        bias = -16.0 * d if qtype == T.Q5_0 else _f16(blocks[:, None, 2:4])
        return q, d, bias
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        sc, mn = _k_scales(blocks[:, 4:16])
        if qtype == T.Q4_K:
            qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
            q = (qs & 0x0F).reshape(n, 8, 32)
        else:
            qh = blocks[:, 16:48].reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
            ql = blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
            q = (ql & 0x0F).reshape(n, 8, 32) | ((qh & 1).reshape(n, 8, 32) << 4)
        return q, (d * sc).reshape(n, 8), (-dmin * mn).reshape(n, 8)
    raise ValueError(f"{qtype.name} has no exact affine form")


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: 32 // bits codes a uint32, the first in the lowest bits."""
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).view(np.uint32)


def tensor_arrays(raw: np.ndarray, qtype: T, shape: tuple[int, ...], bits: int = 8) -> dict[str, mx.array]:
    """The MLX tensors for one GGUF tensor's bytes ``raw`` (shape in numpy order): ``{"weight": w}``
    for float types and 1-D tensors, else ``{"weight", "scales", "biases"}`` at ``bits`` (4 or
    8, group 32; exact where the type has an affine form that fits)."""
    if qtype == T.F32:
        return {"weight": mx.array(raw.view(np.float32).reshape(shape))}
    if qtype == T.F16:
        return {"weight": mx.array(raw.view(np.float16).reshape(shape))}
    if qtype == T.F64:
        return {"weight": mx.array(raw.view(np.float64).astype(np.float32).reshape(shape))}
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if qtype == T.BF16:
        bits16 = raw.view(np.uint16).reshape(shape).astype(np.uint32) << 16
        return {"weight": mx.array(bits16.view(np.float32)).astype(mx.bfloat16)}
    blocks = raw.reshape(rows * cols // GGML_QUANT_SIZES[qtype][0], -1)
    if qtype == T.MXFP4 and len(shape) >= 2:
        # MLX's mxfp4 has the same E8M0 scale byte and E2M1 codes (ggml's table is the
        # E2M1 values doubled, its scale halved): only the nibble order differs
        codes = _nibbles(blocks[:, None, 1:]).reshape(*shape[:-1], cols)
        return {
            "weight": mx.array(_pack(codes, 4)),
            "scales": mx.array(np.ascontiguousarray(blocks[:, 0]).reshape(*shape[:-1], cols // GROUP)),
        }
    if len(shape) < 2:  # a quantized vector (never in practice): as float
        return {"weight": mx.array(dequantize(blocks, qtype).reshape(shape))}
    if NATIVE_BITS.get(qtype, 99) <= bits:
        codes, scales, biases = _codes(blocks, qtype)
        groups = shape[:-1] + (cols // GROUP,)
        out = {
            "weight": mx.array(_pack(codes.reshape(*shape[:-1], cols), bits)),
            "scales": mx.array(scales.reshape(groups)).astype(mx.float16),
            "biases": mx.array(biases.reshape(groups)).astype(mx.float16),
        }
        return out
    w = mx.array(np.asarray(dequantize(blocks, qtype), np.float32).reshape(shape))
    wq, scales, biases = mx.quantize(w, group_size=GROUP, bits=bits, stream=mx.cpu)
    out = {"weight": wq, "scales": scales.astype(mx.float16), "biases": biases.astype(mx.float16)}
    mx.eval(out)
    return out
