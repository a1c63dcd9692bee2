"""Quantized products routed by row count around mlx-cuda 0.32's slow spots (docs/nvidia.md).

Measured with ``benchmarks/step_profile.py`` (4-bit group 32, float16, H200): its
``quantized_matmul`` pays per row at 2-7 rows (7 rows cost 5x one row) and switches to another
kernel at 8 rows, so 4-7 rows are padded to 8. (That kernel timed as cheap as one row, but over
independent products the GPU may overlap; the decode steps put its serial cost nearer twice a
row's, so 2-3 rows stay as they are.) From a few hundred rows its quantized GEMM falls to
70-110 GB/s of weights, where dequantizing the weight for cuBLAS's half-precision GEMM is
1.5-2.5x faster (for 1024 outputs only from about 1000 rows), and far more at a burst's
thousands of prefill rows.
"""

from __future__ import annotations

import mlx.core as mx

PAD_FROM, PAD_ROWS = 4, 8  # PAD_FROM..PAD_ROWS-1 rows are padded up to PAD_ROWS
DEQUANT_ROWS = 256  # from here on: dequantize + matmul, for outputs of DEQUANT_MIN_OUT and more
DEQUANT_MIN_OUT, DEQUANT_ROWS_NARROW = 2048, 1024  # narrower ones (k, v) from 1024 rows


def quantized_linear(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """``x @ dequantize(w).T`` for a 2-D ``x``, the same function as ``mx.quantized_matmul``."""
    rows = x.shape[0]
    if mode == "affine" and rows >= (DEQUANT_ROWS if w.shape[0] >= DEQUANT_MIN_OUT else DEQUANT_ROWS_NARROW):
        return x @ mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(x.dtype).T
    if PAD_FROM <= rows < PAD_ROWS:
        x = mx.pad(x, [(0, PAD_ROWS - rows), (0, 0)])
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)[
            :rows
        ]
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
