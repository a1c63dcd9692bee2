"""The CUDA few-row quantized matmul (engine/cuda/qmv.py) against mx.quantized_matmul."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxserve.engine.cuda import available, qmv

needs_cuda = pytest.mark.skipif(
    not available(), reason="CUDA kernels: needs MLX with an NVIDIA GPU (mlx-cuda); MLX has no CUDA device here"
)


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_matches_quantized_matmul(bits, group, rows, dtype):
    key = mx.random.key(rows * 1000 + bits * 100 + group)
    kw, kx, ks = mx.random.split(key, 3)
    shape = [(256, 512), (1024, 4096), (4104, 1024)][int(mx.random.randint(0, 3, key=ks).item())]
    n, k = shape
    w = (mx.random.normal((n, k), key=kw) / k**0.5).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    x = mx.random.normal((rows, k), key=kx).astype(dtype)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=bits)
    got = qmv.qmv(x, wq, scales, biases, group, bits)
    assert got.shape == want.shape and got.dtype == dtype
    err = mx.max(mx.abs(got.astype(mx.float32) - want.astype(mx.float32))).item()
    scale = mx.max(mx.abs(want.astype(mx.float32))).item()
    # Both sum in float32; the tolerance is the output type's rounding (bf16: 8 bits of mantissa).
    assert err <= (1e-2 if dtype == mx.bfloat16 else 2e-3) * scale, (err, scale)


@pytest.mark.parametrize(
    "rows,k,group,bits",
    [(9, 64, 32, 4), (0, 64, 32, 4), (1, 48, 32, 4), (1, 64, 32, 3), (1, 64, 16, 4), (1, 96, 64, 8)],
)
def test_refuses_shapes_it_does_not_cover(rows, k, group, bits):
    # Checked before any kernel is built, so this runs on every machine.
    assert not qmv.supports(rows, k, group, bits)
    with pytest.raises(ValueError, match="unsupported"):
        qmv.qmv(
            mx.zeros((rows, k), mx.float16),
            mx.zeros((8, 8), mx.uint32),
            mx.zeros((8, 2), mx.float16),
            mx.zeros((8, 2), mx.float16),
            group,
            bits,
        )


def test_covers_decode_shapes():
    assert all(qmv.supports(r, k, g, b) for r in (1, 8) for k in (4096, 14336) for g in (32, 64) for b in (4, 8))
