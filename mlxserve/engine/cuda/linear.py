"""Quantized products routed by row count around mlx-cuda 0.32's slow spots (docs/nvidia.md).

``quantized_matmul`` pays per row up to 7 rows and switches to a cheaper kernel at 8, so 4-7 rows
are padded to 8 (2-3 stay: the 8-row kernel's serial cost is about two rows'); from a few hundred
rows dequantizing for cuBLAS's half-precision GEMM is faster. Figures, from
``benchmarks/step_profile.py``: benchmarks/results/history-gpu.md.
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
