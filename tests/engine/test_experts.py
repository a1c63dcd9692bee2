"""Mixture-of-experts layers on engine/cpu's kernels (cpu/experts.py): the gather product
against mx.gather_qmm, the emulated int8 product and the dense kernel row by row, the mlx-lm
modules it replaces, and a tiny qwen3moe GGUF decoding the same with the kernels on and off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP
from test_qkernels import PATHS, SCALE_DTYPES, _emulated

from mlxserve.engine import cpu
from mlxserve.engine.cpu import experts

kernels, why = cpu.load()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"quantized CPU kernels unavailable: {why}")


def _experts(rng, e, n, k, group, bits, scale_dtype):
    w = mx.array(rng.standard_normal((e, n, k)).astype(np.float32) / np.sqrt(k))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    return wq, s.astype(scale_dtype), b.astype(scale_dtype)


def _choices(rng, rows, e, top):
    return np.stack([rng.choice(e, top, replace=False) for _ in range(rows)]).astype(np.uint32)


def _gather(x, ids, wq, s, b, group, bits, path=-1):
    w, sp, bp, n = experts.pack_experts(wq, s, b, bits)
    return kernels.gather_qmm_rows(x, mx.array(ids), w, sp, bp, group, bits, n, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_gather_matches_gather_qmm_and_each_experts_dense_product(path, bits, rows):
    rng = np.random.default_rng(1000 * bits + rows + 10 * path)
    for trial in range(3):
        e = int(rng.choice([2, 4, 8, 16]))
        top = int(rng.integers(1, min(e, 4) + 1))
        group = int(rng.choice([32, 64]))
        k = group * int(rng.integers(1, 7))
        n = int(rng.choice([8, 24, 37, 64]))  # 37: each expert's tiles padded apart
        wq, s, b = _experts(rng, e, n, k, group, bits, SCALE_DTYPES[trial])
        x = mx.array(rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.1, 10))
        ids = _choices(rng, rows, e, top)
        y = _gather(x, ids, wq, s, b, group, bits, path)
        assert y.shape == (rows, top, n) and y.dtype == mx.float32
        got = np.array(y)
        ref = np.array(
            mx.gather_qmm(
                x[:, None, None, :],
                wq,
                s.astype(mx.float32),
                b.astype(mx.float32),
                rhs_indices=mx.array(ids),
                transpose=True,
                group_size=group,
                bits=bits,
            )
        )[:, :, 0]
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max(), (e, top, k, n)
        for m in range(rows):
            for j in range(top):
                ex = int(ids[m, j])
                want = _emulated(x[m : m + 1], wq[ex], s[ex], b[ex], group, bits, tiles=0)[0]
                assert np.abs(got[m, j] - want).max() <= 1e-4 * (np.abs(want).max() + 1e-6)
                # the dense kernel's bits for this row and this expert: alone or routed, the same
                p = cpu.pack(wq[ex], s[ex], b[ex], bits)
                dense = kernels.qmm_rows(x[m : m + 1], *p[:3], group, bits, path, 0, p[3])
                assert np.array_equal(got[m, j], np.array(dense)[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_per_choice_strided_and_any_integer_indices(bits):
    # down_proj's layout: a row per (token, choice); indices as argpartition slices them
    rng = np.random.default_rng(bits)
    e, top, rows, k, n = 6, 2, 5, 128, 40
    wq, s, b = _experts(rng, e, n, k, 32, bits, mx.float16)
    x = mx.array(rng.standard_normal((rows, top, k)).astype(np.float32))
    logits = mx.array(rng.standard_normal((rows, e)).astype(np.float32))
    ids = mx.argpartition(logits, kth=-top, axis=-1)[..., -top:]
    w, sp, bp, n_ = experts.pack_experts(wq, s, b, bits)
    got = np.array(kernels.gather_qmm_rows(x, ids, w, sp, bp, 32, bits, n_))
    flat = np.array(ids)
    for dtype in (mx.int32, mx.int64, mx.uint8):
        assert np.array_equal(
            np.array(kernels.gather_qmm_rows(x, mx.array(flat).astype(dtype), w, sp, bp, 32, bits, n_)), got
        )
    for m in range(rows):
        for j in range(top):
            one = kernels.gather_qmm_rows(x[m, j][None], mx.array(flat[m, j : j + 1]), w, sp, bp, 32, bits, n_)
            assert np.array_equal(np.array(one)[0], got[m, j])


@pytest.mark.parametrize("bits", [4, 8])
def test_swiglu_is_silu_of_the_gate_product_times_the_up_product(bits):
    rng = np.random.default_rng(7 + bits)
    e, top, rows, k, n = 8, 2, 9, 192, 72
    gate, up = (_experts(rng, e, n, k, 64, bits, mx.bfloat16) for _ in range(2))
    x = mx.array(rng.standard_normal((rows, k)).astype(np.float32) * 3)
    ids = mx.array(_choices(rng, rows, e, top))
    pg, pu = experts.pack_experts(*gate, bits), experts.pack_experts(*up, bits)
    got = np.array(kernels.gather_swiglu(x, ids, *pg[:3], *pu[:3], 64, bits, n))
    flat = np.array(ids)
    for m in range(rows):
        for j in range(top):
            ex = int(flat[m, j])
            dg, du = (cpu.pack(g[0][ex], g[1][ex], g[2][ex], bits) for g in (gate, up))
            dense = kernels.qmm_swiglu(x[m : m + 1], *dg[:3], *du[:3], 64, bits, n)
            assert np.array_equal(got[m, j], np.array(dense)[0])  # the dense fused op's bits


def test_helper_threads_give_the_same_bits():
    rng = np.random.default_rng(3)
    wq, s, b = _experts(rng, 8, 512, 256, 32, 4, mx.float16)
    x = mx.array(rng.standard_normal((40, 256)).astype(np.float32))
    ids = _choices(rng, 40, 8, 2)
    default_macs, default_rows = kernels.thread_macs(), cpu.threads()[1]
    kernels.start_threads(2, 50)
    try:
        kernels.set_thread_macs(1 << 62)
        alone = np.array(_gather(x, ids, wq, s, b, 32, 4))
        kernels.set_thread_macs(0)
        kernels.set_thread_rows(1)
        shared = np.array(_gather(x, ids, wq, s, b, 32, 4))
        assert np.array_equal(alone, shared)
    finally:
        kernels.set_thread_macs(default_macs)
        kernels.set_thread_rows(default_rows)


def test_bad_inputs_are_refused_and_a_missing_expert_gives_nan():
    rng = np.random.default_rng(0)
    wq, s, b = _experts(rng, 4, 16, 128, 32, 4, mx.float16)
    w, sp, bp, n = experts.pack_experts(wq, s, b, 4)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    ids = mx.array([[0, 1], [2, 3], [1, 0]], mx.int32)
    with pytest.raises(ValueError, match="bits"):
        kernels.gather_qmm_rows(x, ids, w, sp, bp, 32, 3, n)
    with pytest.raises(ValueError, match="float32"):
        kernels.gather_qmm_rows(x.astype(mx.float16), ids, w, sp, bp, 32, 4, n)
    with pytest.raises(ValueError, match="3-D"):
        kernels.gather_qmm_rows(x, ids, w[0], sp[0], bp[0], 32, 4, n)
    with pytest.raises(ValueError, match="scales"):
        kernels.gather_qmm_rows(x, ids, w, s, b, 32, 4, n)  # MLX's layout, not packed
    with pytest.raises(ValueError, match="a row per index"):
        kernels.gather_qmm_rows(x[:2], ids, w, sp, bp, 32, 4, n)
    with pytest.raises(ValueError, match="integers"):
        kernels.gather_qmm_rows(x, ids.astype(mx.float32), w, sp, bp, 32, 4, n)
    y = np.array(kernels.gather_qmm_rows(x, mx.array([[0, 9], [2, 3], [-1, 0]], mx.int32), w, sp, bp, 32, 4, n))
    assert np.isnan(y[0, 1]).all() and np.isnan(y[2, 0]).all()
    assert np.isfinite(y[1]).all() and np.isfinite(y[0, 0]).all() and np.isfinite(y[2, 1]).all()


# --- the mlx-lm modules ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40 x top 2: mlx-lm sorts the pairs (64+)
def test_switch_glu_runs_on_the_kernels_as_mlx_lm_computes_it(bits, tokens):
    mx.random.seed(bits)
    glu = SwitchGLU(128, 96, 6)
    nn.quantize(glu, group_size=32, bits=bits)
    assert isinstance(glu.gate_proj, QuantizedSwitchLinear)
    x = mx.random.normal((2, tokens, 128))
    ids = mx.argpartition(mx.random.normal((2, tokens, 6)), kth=-2, axis=-1)[..., -2:]
    want = glu(x, ids)
    assert experts.use_expert_kernels(glu, kernels) == 3
    assert type(glu) is experts.CpuSwitchGLU and isinstance(glu.down_proj, experts.CpuQuantizedSwitchLinear)
    assert glu.gate_proj["weight"].shape == (6, 96 // 8, 128 * bits // 4)  # packed: 8 rows a tile
    got = glu(x, ids)
    assert got.shape == want.shape == (2, tokens, 2, 128)
    assert mx.allclose(got, want, atol=0.03 * mx.abs(want).max().item()).item(), mx.abs(got - want).max().item()
    # the layer's own call (what an unfused SwitchGLU does) on the packed linears
    unfused = SwitchGLU.__call__(glu, x, ids)
    assert mx.allclose(unfused, got, atol=1e-5 * mx.abs(got).max().item()).item()


def test_other_expert_layers_use_the_linears():
    mx.random.seed(0)
    mlp = SwitchMLP(64, 96, 4, bias=True)  # GELU, biases: the linears alone, bias added after
    mlp.fc1.bias = mx.random.normal((4, 96))
    nn.quantize(mlp, group_size=32, bits=8)
    x = mx.random.normal((3, 64))
    ids = mx.array([[0, 3], [2, 1], [3, 3]])
    want = mlp(x, ids)
    assert experts.use_expert_kernels(mlp, kernels) == 2
    assert isinstance(mlp.fc1, experts.CpuQuantizedSwitchLinear) and mlp.fc1["bias"].dtype == mx.float32
    got = mlp(x, ids)
    assert mx.allclose(got, want, atol=0.03 * mx.abs(want).max().item()).item(), mx.abs(got - want).max().item()
    # x with several rows for one index set: mx.gather_qmm's broadcast
    lin = SwitchLinear(64, 24, 4, bias=False).to_quantized(group_size=64, bits=4)
    xs = mx.random.normal((2, 1, 5, 64))
    idx = mx.array([[1], [3]])
    want = lin(xs, idx)
    experts.use_expert_kernels(lin, kernels)
    assert mx.allclose(lin(xs, idx), want, atol=0.03 * mx.abs(want).max().item()).item()
    nv = SwitchLinear(64, 24, 4, bias=False).to_quantized(group_size=16, bits=4, mode="nvfp4")
    assert experts.use_expert_kernels(nv, kernels) == 0 and type(nv) is QuantizedSwitchLinear  # stays on MLX


def _emulated_mxfp4(x, wq, s):
    """float64 product of the MXFP4 weight with x quantized as the kernels do."""
    w = np.array(mx.dequantize(wq, s, group_size=32, bits=4, mode="mxfp4").astype(mx.float32), dtype=np.float64)
    xs = np.array(x, dtype=np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(xs).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), np.float32(0)).astype(np.float32)
    return (np.rint(xs * inv) * d).reshape(x.shape).astype(np.float64) @ w.T


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_mxfp4_experts_match_gather_qmm_and_the_emulated_product(path, rows):
    rng = np.random.default_rng(rows + 10 * path)
    for e, n, k, top in ((4, 24, 64, 2), (8, 37, 256, 3), (3, 8, 32, 1)):
        w = mx.array(rng.standard_normal((e, n, k)).astype(np.float32) * rng.uniform(0.01, 3))
        wq, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        x = mx.array(rng.standard_normal((rows, k)).astype(np.float32))
        ids = _choices(rng, rows, e, top)
        pw, ps, pb, n_ = experts.pack_experts(wq, s, None, 4)
        assert pb is None
        got = np.array(kernels.gather_qmm_rows(x, mx.array(ids), pw, ps, None, 32, 4, n_, path, mode="mxfp4"))
        ref = np.array(
            mx.gather_qmm(
                x[:, None, None, :],
                wq,
                s,
                None,
                rhs_indices=mx.array(ids),
                transpose=True,
                bits=4,
                group_size=32,
                mode="mxfp4",
            )
        )[:, :, 0]
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max(), (e, n, k)
        for m in range(rows):
            for j in range(top):
                want = _emulated_mxfp4(x[m : m + 1], wq[int(ids[m, j])], s[int(ids[m, j])])[0]
                assert np.abs(got[m, j] - want).max() <= 1e-4 * (np.abs(want).max() + 1e-6)
    with pytest.raises(ValueError, match="mode"):
        kernels.gather_qmm_rows(x, mx.array(ids), pw, ps, None, 32, 8, n_, mode="mxfp4")
    with pytest.raises(ValueError, match="uint8"):
        kernels.gather_qmm_rows(x, mx.array(ids), pw, ps.astype(mx.float16), None, 32, 4, n_, mode="mxfp4")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_qwen3moe_block_is_one_op_matching_mlx_lm(bits, normalize):
    from mlx_lm.models import qwen3_moe

    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe",
        hidden_size=128,
        num_hidden_layers=1,
        intermediate_size=256,
        num_attention_heads=4,
        num_experts=8,
        num_experts_per_tok=3,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=96,
        rms_norm_eps=1e-6,
        vocab_size=100,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1e4,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        norm_topk_prob=normalize,
    )
    mx.random.seed(bits)
    block = qwen3_moe.Qwen3MoeSparseMoeBlock(args)
    nn.quantize(
        block, group_size=32, bits=bits, class_predicate=lambda p, m: p != "gate" and hasattr(m, "to_quantized")
    )
    x = mx.random.normal((3, 9, 128))
    want = block(x)
    assert experts.use_expert_kernels(block, kernels) == 3
    assert type(block).__name__ == "CpuQwen3MoeSparseMoeBlock"
    got = block(x)
    assert got.shape == want.shape and got.dtype == mx.float32
    assert mx.allclose(got, want, atol=0.03 * mx.abs(want).max().item()).item(), mx.abs(got - want).max().item()
    # a row alone gets the bits it gets in the batch
    assert np.array_equal(np.array(block(x[1:2, 4:5]))[0, 0], np.array(got)[1, 4])


# --- a qwen3moe GGUF -----------------------------------------------------------------------------


def _greedy_and_forced(model, ref, prompt, steps):
    """ref's greedy tokens after prompt, and the last-position logits of ref and model at each
    step when both are fed those tokens (decode steps: one row a step)."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(ref), make_prompt_cache(model)
    rows = [(ref(mx.array([prompt]), cache=caches[0])[0, -1], model(mx.array([prompt]), cache=caches[1])[0, -1])]
    tokens = []
    for _ in range(steps):
        tokens.append(int(rows[-1][0].argmax()))
        step = mx.array([[tokens[-1]]])
        rows.append((ref(step, cache=caches[0])[0, -1], model(step, cache=caches[1])[0, -1]))
    return tokens, mx.stack([r[0] for r in rows]), mx.stack([r[1] for r in rows])


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_a_moe_gguf_decodes_the_same_with_the_kernels_on_and_off(arch, quant, tmp_path):
    from test_gguf_vs_llamacpp import mlxserve_path

    from mlxserve.engine.model import load_path
    from mlxserve.testing import ggufmodels

    gguf = ggufmodels.write(tmp_path / f"{arch}-{quant}.gguf", arch, quant, seed=0)
    path = mlxserve_path(gguf, tmp_path)  # gpt-oss is converted at create
    on = load_path(path)  # the kernels: dense products and experts
    off = load_path(path, weight_dtype="float32")  # what MLXSERVE_QKERNELS=off loads
    block = on.model.model.layers[0].mlp
    if arch == "qwen3moe":
        assert type(block).__name__ == "CpuQwen3MoeSparseMoeBlock"  # one op after the router
        assert type(block.switch_mlp) is experts.CpuSwitchGLU
        switch, ref = block.switch_mlp, off.model.model.layers[0].mlp.switch_mlp
    else:  # MXFP4 experts with biases and gpt-oss's own activation: the linears alone
        switch, ref = block.experts, off.model.model.layers[0].mlp.experts
        assert switch.up_proj.mode == "mxfp4"
    assert isinstance(switch.up_proj, experts.CpuQuantizedSwitchLinear)
    assert type(ref.up_proj) is QuantizedSwitchLinear
    for prompt in ([3, 17, 42, 5, 9, 100, 7, 8], list(range(20, 60))):  # 40 tokens: mlx-lm sorts
        tokens, want, got = _greedy_and_forced(on.model, off.model, prompt, 16)
        top2 = mx.sort(want, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0] > 0.6).tolist()  # this random model has many near-ties
        same = (got.argmax(-1) == want.argmax(-1)).tolist()
        assert all(s for s, c in zip(same, clear) if c) and sum(clear) >= 6, (tokens, same, clear)
        # int8 activations against float32 ones, dense products included (an expert choice
        # flipped by them moves a step's logits by up to ~3: the median step, not the worst)
        worst = mx.abs(got - want).max(axis=-1)
        assert sorted(worst.tolist())[worst.size // 2] <= 0.04 * mx.abs(want).max().item(), worst
