"""Quantized products routed by row count around mlx-cuda 0.32's slow spots (docs/nvidia.md).

Measured on an H200 (``benchmarks/step_profile.py``, 4-bit group 32, float16): its
``quantized_matmul`` pays per row at 2-7 rows (7 rows: 5x one row) while 8-16 rows cost what one
row does, so a 2-7-row input is padded to 8 rows; and from a few hundred rows its quantized GEMM
falls to 70-110 GB/s of weights, where dequantizing the weight and taking cuBLAS's half-precision
GEMM is 1.5-2.5x faster (and far more at prefill's thousands of rows).
"""

from __future__ import annotations

import mlx.core as mx

PAD_ROWS = 8  # 2..PAD_ROWS-1 rows are padded up to this
DEQUANT_ROWS = 256  # from here on: dequantize + matmul


def quantized_linear(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                     bits: int, mode: str = "affine") -> mx.array:
    """``x @ dequantize(w).T`` for a 2-D ``x``, the same function as ``mx.quantized_matmul``."""
    rows = x.shape[0]
    if mode == "affine" and rows >= DEQUANT_ROWS:
        return x @ mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(x.dtype).T
    if 1 < rows < PAD_ROWS:
        x = mx.pad(x, [(0, PAD_ROWS - rows), (0, 0)])
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits,
                                   mode=mode)[:rows]
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
