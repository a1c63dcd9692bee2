"""GGUF models run in the GPU's half precision (issue 15, item 1): float32 norm weights from the
file are cast to the quantization scales' type, so no activation is promoted to float32."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxserve.engine import gguf
from mlxserve.engine.model import load_path

ON_GPU = mx.default_device().type == mx.DeviceType.gpu


def test_float32_tensors_take_the_scales_half_type():
    weights = {
        "a.weight": mx.zeros((4, 4), mx.uint32),
        "a.scales": mx.zeros((4, 1), mx.float16),
        "a.biases": mx.zeros((4, 1), mx.float16),
        "norm.weight": mx.ones((32,), mx.float32),
    }
    out = gguf.half_floats(weights)
    assert {k: v.dtype for k, v in out.items()} == {
        "a.weight": mx.uint32,
        "a.scales": mx.float16,
        "a.biases": mx.float16,
        "norm.weight": mx.float16,
    }


def test_unquantized_half_model_casts_to_its_weights_type():
    weights = {"w.weight": mx.zeros((4, 4), mx.bfloat16), "norm.weight": mx.ones((4,), mx.float32)}
    assert gguf.half_floats(weights)["norm.weight"].dtype == mx.bfloat16


def test_all_float32_model_is_left_as_it_is():
    weights = {"w.weight": mx.zeros((4, 4), mx.float32), "norm.weight": mx.ones((4,), mx.float32)}
    assert {v.dtype for v in gguf.half_floats(weights).values()} == {mx.float32}


@pytest.mark.skipif(ON_GPU, reason="checks the CPU path (float32 norms; the CPU dequantizes to float32 anyway)")
def test_cpu_load_keeps_the_files_float32_norms(tiny_gguf):
    _, weights, _ = gguf.load_gguf_weights(tiny_gguf)
    assert weights["model.norm.weight"].dtype == mx.float32


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (CUDA or Metal); MLX runs on the CPU here")
def test_gguf_on_a_gpu_computes_in_half_precision(tiny_gguf):
    lm = load_path(tiny_gguf)
    floats = {v.dtype for _, v in tree_flatten(lm.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    assert floats == {mx.float16}
    assert lm.model(mx.array([[1, 2, 3]])).dtype == mx.float16
