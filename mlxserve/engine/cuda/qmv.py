"""Few-row quantized matrix products, ``x @ dequantize(w).T`` for 1-8 rows of x, on CUDA.

The layout is MLX's affine quantization (``mx.quantize``): ``w`` packs 32 // bits values per
uint32, low bits first, and each group of ``group_size`` values along K has a scale and a bias,
value = scale * q + bias. One warp computes one output column for every row of x: each lane
streams 16-byte words of the weight row (the only large read), so the weights are read once
whatever the number of rows. Per group it sums x*q and x, and adds scale * sum(x*q) + bias *
sum(x) in float32.
"""

from __future__ import annotations

import mlx.core as mx

MAX_ROWS = 8
_WARPS_PER_BLOCK = 8

_SOURCE = r"""
    constexpr int VALS = 128 / BITS;            // values in one 16-byte word of w
    constexpr int PER_U32 = 32 / BITS;
    constexpr int VECS = K / VALS;              // 16-byte words per row of w
    constexpr int GROUPS = K / G;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (n >= N) return;
    const uint4* row = reinterpret_cast<const uint4*>(w) + (size_t)n * VECS;
    float acc[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    #pragma unroll 4
    for (int v = lane; v < VECS; v += 32) {
        const uint4 p = __ldg(row + v);
        const unsigned words[4] = {p.x, p.y, p.z, p.w};
        const int k0 = v * VALS;
        const float s = static_cast<float>(scales[(size_t)n * GROUPS + k0 / G]);
        const float b = static_cast<float>(biases[(size_t)n * GROUPS + k0 / G]);
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            const auto* xr = x + (size_t)m * K + k0;
            float dq = 0.f, sx = 0.f;
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                #pragma unroll
                for (int j = 0; j < PER_U32; ++j) {
                    const float xv = static_cast<float>(xr[i * PER_U32 + j]);
                    dq += xv * static_cast<float>((words[i] >> (BITS * j)) & MASK);
                    sx += xv;
                }
            }
            acc[m] += s * dq + b * sx;
        }
    }
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        float a = acc[m];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
        if (lane == 0) out[(size_t)m * N + n] = static_cast<T>(a);
    }
"""

_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="mlxserve_qmv", input_names=["x", "w", "scales", "biases"], output_names=["out"], source=_SOURCE
        )
    return _kernel


def supports(rows: int, k: int, group_size: int, bits: int) -> bool:
    """Shapes this kernel handles: 1..MAX_ROWS rows, 4 or 8 bits, groups of 32/64/128, and K a
    whole number of groups and 16-byte words."""
    vals = 128 // bits if bits in (4, 8) else 0
    return bool(
        1 <= rows <= MAX_ROWS
        and vals
        and group_size in (32, 64, 128)
        and k % group_size == 0
        and k % vals == 0
        and group_size % vals == 0
    )


def qmv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """``x`` (rows, K) times the transposed quantized (N, K) matrix: (rows, N) in x's dtype."""
    rows, k = x.shape
    n = w.shape[0]
    if not supports(rows, k, group_size, bits):
        raise ValueError(f"qmv: unsupported shape/quantization (rows={rows}, K={k}, group={group_size}, bits={bits})")
    out = _get_kernel()(
        inputs=[x, w, scales, biases],
        template=[("T", x.dtype), ("M", rows), ("K", k), ("N", n), ("G", group_size), ("BITS", bits)],
        grid=(-(-n // _WARPS_PER_BLOCK) * _WARPS_PER_BLOCK * 32, 1, 1),  # in threads: whole blocks
        threadgroup=(32 * _WARPS_PER_BLOCK, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[x.dtype],
    )
    return out[0]
