"""engine/cuda/linear.py's row routing (pad 4-7 rows to 8; dequantize + matmul from 256 rows) computes
mx.quantized_matmul's function; on CUDA a loaded model uses it, and a K-quant import computes in half
precision. The routing is plain MLX, so its arithmetic is checked on every machine."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from model_files import write_kquant_gguf

from mlxserve.engine import model as engine_model
from mlxserve.engine.cuda import available, linear

needs_cuda = pytest.mark.skipif(
    not available(), reason="CUDA routing: needs MLX with an NVIDIA GPU (mlx-cuda); MLX has no CUDA device here"
)


@pytest.mark.parametrize(
    "rows,n",
    [(1, 96), (2, 96), (3, 96), (4, 96), (7, 96), (8, 96), (9, 96), (300, 96), (256, 2048), (300, 2048), (1024, 96)],
)
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_routing_computes_quantized_matmul(rows, n, bits, group):
    key = mx.random.key(rows * 10 + bits)
    kw, kx = mx.random.split(key)
    k = 256
    # float16 as a model runs on CUDA; float32 elsewhere (MLX's CPU float16 GEMM is very slow)
    dtype = mx.float16 if available() else mx.float32
    w = (mx.random.normal((n, k), key=kw) / k**0.5).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    x = mx.random.normal((rows, k), key=kx).astype(dtype)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=bits)
    got = linear.quantized_linear(x, wq, scales, biases, group, bits)
    assert got.shape == want.shape == (rows, n) and got.dtype == dtype
    err = mx.max(mx.abs(got.astype(mx.float32) - want.astype(mx.float32))).item()
    scale = mx.max(mx.abs(want.astype(mx.float32))).item()
    # 1% of the largest output (float16 products round differently); a wrong row, column or
    # group would be off by the output's own size.
    assert err <= 1e-2 * scale, (err, scale)


@needs_cuda
def test_model_on_cuda_routes_its_quantized_layers(tiny_dir, tmp_path):
    lm = engine_model.load_path(tiny_dir)
    nn.quantize(lm.model, group_size=32, bits=4)
    engine_model._flatten_quantized_inputs(lm.model)
    layers = [m for _, m in lm.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is engine_model._CudaQuantizedLinear for m in layers)
    ids = mx.array([[5, 6, 7, 8] * 80] * 3)  # 3 rows of 320: prefill takes the dequantize path
    got = lm.model(ids)
    for m in layers:
        m.__class__ = engine_model._FlatQuantizedLinear
    want = lm.model(ids)
    err = mx.max(mx.abs(got.astype(mx.float32) - want.astype(mx.float32))).item()
    assert err <= 2e-2 * mx.max(mx.abs(want.astype(mx.float32))).item()


@needs_cuda
def test_kquant_import_computes_in_half_precision_on_a_gpu(tmp_path):
    from mlx.utils import tree_flatten

    from mlxserve.engine import convert
    from mlxserve.store.convert import convert_gguf
    from mlxserve.store.ggufmeta import read_header

    src = tmp_path / "kq.gguf"
    write_kquant_gguf(src)
    out = tmp_path / "converted"
    convert_gguf(convert, src, read_header(src), out)
    lm = engine_model.load_path(out)
    floats = {v.dtype for _, v in tree_flatten(lm.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    assert floats == {mx.float16}
    assert lm.model(mx.array([[1, 2, 3]])).dtype == mx.float16
