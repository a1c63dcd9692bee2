"""Gemma's layers on engine/cpu's one-op kernels give what mlx-lm's own layers give."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxserve.engine import cpu, dtype as dtypes

kernels, why = cpu.load()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"quantized CPU kernels unavailable: {why}")


def _gemma(kind: str):
    from mlx_lm.models import gemma2, gemma3_text

    common = dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        vocab_size=256,
    )
    mx.random.seed(3)
    if kind == "gemma2":
        model = gemma2.Model(gemma2.ModelArgs(model_type=kind, query_pre_attn_scalar=64.0, **common))
    else:
        model = gemma3_text.Model(
            gemma3_text.ModelArgs(model_type=kind, sliding_window=4, sliding_window_pattern=2, **common)
        )
    # Random norm weights: with mlx-lm's ones a norm that forgot gemma's (1 + w) would pass too.
    for _, m in model.named_modules():
        if type(m).__name__ == "RMSNorm":
            m.weight = mx.random.normal(m.weight.shape) * 0.5
    nn.quantize(model, group_size=32, bits=4)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_gemma_norms_are_one_op_with_the_model_outputs(kind):
    model = _gemma(kind)
    ids = mx.array([[1, 5, 9, 200, 17, 3]])
    dtypes.dequantize_model(reference := _gemma(kind), mx.float32)
    want = reference(ids)
    dtypes.use_cpu_kernels(model, kernels)
    norms = [m for _, m in model.named_modules() if isinstance(m, nn.Module) and "RMSNorm" in type(m).__name__]
    assert norms and all(type(m).__name__.startswith("CpuOffset") for m in norms)
    got = model(ids)
    # int8 products of the activations: close to the float reference, not equal to it
    assert mx.abs(got - want).max().item() < 0.05 * mx.abs(want).max().item()
    assert (mx.argmax(got, -1) == mx.argmax(want, -1)).all().item()
    # the swapped-in weight is 1 + the stored one: the norm is mx.fast.rms_norm with it
    norm = model.model.layers[0].input_layernorm
    x = mx.random.normal((2, 3, 128))
    assert mx.allclose(norm(x), mx.fast.rms_norm(x, norm.weight, norm.eps), rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_geglu_is_gelu_approx_of_the_gate_product_times_the_up_product(bits):
    rng = np.random.default_rng(bits + 40)

    def case():
        w = mx.array(rng.standard_normal((100, 256)).astype(np.float32)) * 0.2
        return mx.quantize(w, group_size=32, bits=bits)

    x = mx.array(rng.standard_normal((6, 256)).astype(np.float32))
    (gq, gs, gb), (uq, us, ub) = case(), case()
    gs, gb, us, ub = (a.astype(mx.float16) for a in (gs, gb, us, ub))
    gate = kernels.qmm_rows(x, *cpu.pack(gq, gs, gb, bits)[:3], 32, bits, tiles=0, n=100)
    up = kernels.qmm_rows(x, *cpu.pack(uq, us, ub, bits)[:3], 32, bits, tiles=0, n=100)
    g, u = cpu.pack(gq, gs, gb, bits), cpu.pack(uq, us, ub, bits)
    got = kernels.qmm_swiglu(x, *g[:3], *u[:3], 32, bits, 100, gelu=True)
    assert mx.allclose(got, nn.gelu_approx(gate) * up, rtol=1e-5, atol=1e-5).item()
    assert not mx.allclose(got, nn.silu(gate) * up, rtol=1e-3, atol=1e-3).item()
    alone = kernels.qmm_swiglu(x[2:3], *g[:3], *u[:3], 32, bits, 100, gelu=True)
    assert mx.array_equal(alone[0], got[2]).item()  # the same bits alone or in a batch


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_gemma_mlp_is_one_geglu_op(kind):
    model = _gemma(kind)
    dtypes.use_cpu_kernels(model, kernels)
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__.startswith("CpuGeGLU")
    x = mx.random.normal((3, 128))
    want = mlp.down_proj(nn.gelu_approx(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert mx.allclose(mlp(x), want, rtol=1e-4, atol=1e-5).item()


def test_decode_attention_soft_caps_the_scores_before_the_mask():
    rng = np.random.default_rng(9)
    b, h, hk, s, d, cap = 3, 8, 4, 11, 64, 5.0
    q, k, v = (
        mx.array(rng.standard_normal(shape).astype(np.float32)) * 3
        for shape in ((b, h, 1, d), (b, hk, s, d), (b, hk, s, d))
    )
    mask = mx.array(rng.random((b, 1, 1, s)) > 0.3)
    scores = (q.reshape(b, hk, 2, 1, d) * 0.125) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    scores = mx.where(mx.expand_dims(mask, 2), mx.tanh(scores / cap) * cap, -mx.inf)
    want = (mx.softmax(scores, axis=-1, precise=True) @ mx.expand_dims(v, 2)).reshape(b, h, 1, d)
    got = kernels.decode_attention(q, k, v, 0.125, mask, softcap=cap)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    assert not mx.allclose(kernels.decode_attention(q, k, v, 0.125, mask), want, rtol=1e-3, atol=1e-3).item()


def test_gemma2_decode_attention_is_one_op_with_the_model_outputs():
    from mlx_lm.models import gemma2
    from mlx_lm.models.cache import make_prompt_cache

    model, reference = _gemma("gemma2"), _gemma("gemma2")
    dtypes.use_cpu_kernels(model, kernels)
    dtypes.use_cpu_kernels(reference, kernels)
    for layer in reference.layers:  # the same kernels everywhere else, mlx-lm's attention
        layer.self_attn.__class__ = gemma2.Attention
    assert type(model.layers[0].self_attn).__name__ == "CpuSoftcapAttention"
    caches = make_prompt_cache(model), make_prompt_cache(reference)
    prompt = mx.array([[1, 5, 9, 200, 17, 3]])
    for m, c in zip((model, reference), caches):
        m(prompt, cache=c)
    for token in (7, 70, 111):
        got, want = (m(mx.array([[token]]), cache=c) for m, c in zip((model, reference), caches))
        assert mx.allclose(got, want, rtol=1e-4, atol=1e-4).item()


def test_softcap_is_cap_times_tanh_of_x_over_cap():
    x = mx.array(np.random.default_rng(11).standard_normal((3, 1, 1000)).astype(np.float32)) * 50
    x[0, 0, :4] = mx.array([0.0, 1e-6, 1e4, -1e4])
    got = kernels.softcap(x, 30.0)
    assert mx.allclose(got, mx.tanh(x / 30.0) * 30.0, rtol=0, atol=1e-5).item()
    assert mx.array_equal(kernels.softcap(x[1:2], 30.0), got[1:2]).item()  # the same bits alone or in a batch


def test_gemma2_logits_are_soft_capped_in_one_op():
    model = _gemma("gemma2")
    dtypes.use_cpu_kernels(model, kernels)
    assert type(model).__name__ == "CpuSoftcapModel"
    ids = mx.array([[1, 5, 9, 200]])
    head = model.model.embed_tokens.as_linear(model.model(ids))
    cap = model.final_logit_softcapping
    assert mx.allclose(model(ids), mx.tanh(head / cap) * cap, rtol=0, atol=1e-5).item()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_batched_greedy_equals_solo_for_gemma_on_the_kernels(family, tmp_path):
    """Left-padded rows and the sliding-window mask through the one-op attention."""
    from test_loop import assert_batched_equals_solo

    from mlxserve.testing import ggufmodels

    assert_batched_equals_solo(ggufmodels.write(tmp_path / f"{family}.gguf", family, "Q4_0"), 12)
