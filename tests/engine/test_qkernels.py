"""engine/cpu's quantized products: same answers as MLX and numpy, the same bits alone or in a
batch, on every path this CPU has, and a quantized model decoding through them."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxserve.engine import cpu, dtype as dtypes

kernels, why = cpu.load()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"quantized CPU kernels unavailable: {why}")
PATHS = [
    pytest.param(
        value,
        id=name,
        marks=pytest.mark.skipif(
            kernels is None or value > kernels.best_path(),
            reason=f"no {name} here" + (f" ({kernels.vnni_note()})" if kernels and "vnni" in name else ""),
        ),
    )
    for name, value in cpu.PATHS.items()
]
SCALE_DTYPES = [mx.float16, mx.bfloat16, mx.float32]


def _case(rng, rows, k, n, group, bits, scale_dtype):
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    x = mx.array(rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.1, 10))
    return x, wq, s.astype(scale_dtype), b.astype(scale_dtype)


def _qmm(x, wq, s, b, group, bits, path=-1, tiles=-1):
    """The kernels' product of x with MLX's affine-quantized weight (packed first, as at load)."""
    w, sp, bp, n = cpu.pack(wq, s, b, bits)
    return kernels.qmm_rows(x, w, sp, bp, group, bits, path, tiles, n)


def _emulated(x, wq, s, b, group, bits, tiles=-1):
    """float64 product of the dequantized weights with x quantized as the kernels do (int8 per
    block of 32, scale max|x|/127, round half to even); from blas_rows rows on, x itself
    (dequantized tiles through BLAS)."""
    w = np.array(
        mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits), dtype=np.float64
    )
    if tiles < 0 and x.shape[0] >= kernels.blas_rows() and kernels.has_blas():
        return np.array(x, dtype=np.float64) @ w.T
    xs = np.array(x, dtype=np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(xs).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), np.float32(0)).astype(np.float32)
    xq = (np.rint(xs * inv) * d).reshape(x.shape).astype(np.float64)
    return xq @ w.T


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_products_match_mlx_and_the_emulated_int8_product(path, bits, group):
    rng = np.random.default_rng(bits * 100 + group + path)
    for trial in range(6):
        rows = int(rng.choice([1, 2, 3, 5, 8, 13, 16, 17, 31, 40, 64]))
        k = group * int(rng.integers(1, 24))
        n = int(rng.integers(1, 300))
        x, wq, s, b = _case(rng, rows, k, n, group, bits, SCALE_DTYPES[trial % 3])
        y = _qmm(x, wq, s, b, group, bits, path)
        assert y.shape == (rows, n) and y.dtype == mx.float32
        got = np.array(y, dtype=np.float64)
        # Against float arithmetic on the same int8 activations: only rounding differs.
        want = _emulated(x, wq, s, b, group, bits)
        scale = np.abs(want).max() + 1e-6
        assert np.abs(got - want).max() <= 1e-4 * scale, (rows, k, n)
        # Against MLX's own quantized product at float32 activations: the int8 rounding of x
        # costs at most a few per cent of the largest output (about 0.5% typically).
        ref = np.array(
            mx.quantized_matmul(
                x, wq, s.astype(mx.float32), b.astype(mx.float32), transpose=True, group_size=group, bits=bits
            )
        )
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max(), (rows, k, n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_decode_kernels_at_many_rows_match_the_emulated_product(path, bits, scale_dtype):
    # tiles=0 past blas_rows, an odd column count and 18 or 9 groups a row: the bias term's
    # eight-group vectors and its scalar tail, and a lone last weight row, for every scale dtype
    rng = np.random.default_rng(bits)
    for group in (32, 64):
        x, wq, s, b = _case(rng, 16, 576, 37, group, bits, scale_dtype)
        got = np.array(_qmm(x, wq, s, b, group, bits, path, 0), dtype=np.float64)
        want = _emulated(x, wq, s, b, group, bits, tiles=0)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), group


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(path, bits):
    rng = np.random.default_rng(bits)
    rows = 13
    # N large enough that the helper threads share the product
    x, wq, s, b = _case(rng, rows, 576, 1536, 32, bits, mx.float16)
    batch = np.array(_qmm(x, wq, s, b, 32, bits, path, 0))  # decode's int8 kernels
    for i in (0, rows // 2, rows - 1):
        alone = np.array(_qmm(x[i : i + 1], wq, s, b, 32, bits, path, 0))
        assert np.array_equal(alone[0], batch[i])
    # leading dimensions are rows too
    y3 = np.array(_qmm(x.reshape(rows, 1, 576), wq, s, b, 32, bits, path, 0))
    assert np.array_equal(y3[:, 0], batch)


@pytest.mark.skipif(
    kernels is None or kernels.best_path() < cpu.PATHS["avx512vnni"],
    reason=f"AVX-512 VNNI path not in use: {kernels.vnni_note() if kernels else why}",
)
def test_the_vnni_path_gives_the_avx2_bits():
    # vpdpbusd sums the same products as vpmaddubsw + vpmaddwd, exactly: the same int32 sums
    rng = np.random.default_rng(5)
    for bits in (4, 8):
        for group in (32, 64):
            x, wq, s, b = _case(rng, 9, 320, 77, group, bits, mx.bfloat16)
            assert np.array_equal(
                np.array(_qmm(x, wq, s, b, group, bits, cpu.PATHS["avx2"], 0)),
                np.array(_qmm(x, wq, s, b, group, bits, cpu.PATHS["avx512vnni"], 0)),
            )


def test_the_fastest_path_is_the_default():
    rng = np.random.default_rng(0)
    x, wq, s, b = _case(rng, 3, 256, 70, 32, 4, mx.float16)
    best = _qmm(x, wq, s, b, 32, 4, kernels.best_path())
    assert np.array_equal(np.array(_qmm(x, wq, s, b, 32, 4)), np.array(best))


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(0)
    x, wq, s, b = _case(rng, 2, 128, 16, 32, 4, mx.float16)
    w, sp, bp, n = cpu.pack(wq, s, b, 4)
    with pytest.raises(ValueError, match="bits"):
        kernels.qmm_rows(x, w, sp, bp, 32, 3)
    with pytest.raises(ValueError, match="group_size"):
        kernels.qmm_rows(x, w, sp, bp, 128, 4)
    with pytest.raises(ValueError, match="float32"):
        kernels.qmm_rows(x.astype(mx.float16), w, sp, bp, 32, 4)
    with pytest.raises(ValueError, match="last dimension"):
        kernels.qmm_rows(x[:, :96], w, sp, bp, 32, 4)
    with pytest.raises(ValueError, match="scales"):
        kernels.qmm_rows(x, w, s, b, 32, 4)  # MLX's layout, not packed
    with pytest.raises(ValueError, match="n does not match"):
        kernels.qmm_rows(x, w, sp, bp, 32, 4, n=17)
    with pytest.raises(ValueError, match="path"):
        kernels.qmm_rows(x, w, sp, bp, 32, 4, 7)


def test_helper_threads_give_the_same_bits():
    # a product shared between the caller and a helper thread, chunk by chunk, against the
    # caller alone, for both bit widths and both the decode kernels and the prefill tiles
    rng = np.random.default_rng(3)
    default = kernels.thread_macs()
    kernels.start_threads(2, 50)
    try:
        for bits in (4, 8):
            x, wq, s, b = _case(rng, 5, 576, 1000, 32, bits, mx.float16)
            for tiles in (0, 1):
                kernels.set_thread_macs(1 << 62)
                alone = np.array(_qmm(x, wq, s, b, 32, bits, tiles=tiles))
                kernels.set_thread_macs(0)
                shared = np.array(_qmm(x, wq, s, b, 32, bits, tiles=tiles))
                assert np.array_equal(alone, shared), (bits, tiles)
    finally:
        kernels.set_thread_macs(default)


def test_a_strided_activation_gives_the_same_product():
    rng = np.random.default_rng(1)
    x, wq, s, b = _case(rng, 6, 128, 40, 32, 4, mx.float16)
    strided = mx.array(np.array(x).T.copy()).T  # same values, column-major
    assert np.array_equal(np.array(_qmm(strided, wq, s, b, 32, 4)), np.array(_qmm(x, wq, s, b, 32, 4)))


def test_rms_norm_matches_mlx():
    x = mx.random.normal((3, 5, 576), key=mx.random.key(0)) * 3
    w = mx.random.normal((576,), key=mx.random.key(1))
    want = mx.fast.rms_norm(x, w, 1e-5)
    assert mx.allclose(kernels.rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-5).item()
    assert mx.allclose(
        kernels.rms_norm(x.transpose(1, 0, 2), w, 1e-5), want.transpose(1, 0, 2), rtol=1e-5, atol=1e-5
    ).item()


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_matches_mlx_for_every_offset_kind(traditional):
    x = mx.random.normal((2, 7, 3, 64), key=mx.random.key(2)).transpose(0, 2, 1, 3)  # as attention does
    for dims in (64, 48):
        for offset in (0, 29, mx.array(11), mx.array([4, 300])):
            got = kernels.rope(x, dims, traditional, 10000.0, 0.5, offset)
            want = mx.fast.rope(x, dims, traditional=traditional, base=10000.0, scale=0.5, offset=offset)
            assert got.shape == want.shape
            assert mx.allclose(got, want, rtol=1e-4, atol=1e-4).item(), (dims, offset)
    with pytest.raises(ValueError, match="offset"):
        kernels.rope(x, 64, traditional, 10000.0, 1.0, mx.array([1, 2, 3]))


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_rows_are_the_embedding_rows(bits):
    rng = np.random.default_rng(bits + 10)
    for group, n, scale_dtype in ((32, 50, mx.float16), (64, 16, mx.bfloat16)):
        _, wq, s, b = _case(rng, 1, 192, n, group, bits, scale_dtype)
        ids = mx.array(rng.integers(0, n, (3, 5)).astype(np.int32))
        want = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits)[ids]
        w, sp, bp, _ = cpu.pack(wq, s, b, bits)
        got = kernels.packed_rows(ids, w, sp, bp, group, bits)
        assert got.shape == (3, 5, 192) and got.dtype == mx.float32
        assert mx.allclose(got, want, rtol=1e-6, atol=1e-6).item()
        assert mx.array_equal(kernels.packed_rows(ids.T, w, sp, bp, group, bits), got.transpose(1, 0, 2)).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_swiglu_is_silu_of_the_gate_product_times_the_up_product(bits):
    rng = np.random.default_rng(bits + 20)
    x, gq, gs, gb = _case(rng, 6, 256, 100, 32, bits, mx.float16)
    _, uq, us, ub = _case(rng, 6, 256, 100, 32, bits, mx.float16)
    gate, up = _qmm(x, gq, gs, gb, 32, bits, tiles=0), _qmm(x, uq, us, ub, 32, bits, tiles=0)
    g, u = cpu.pack(gq, gs, gb, bits), cpu.pack(uq, us, ub, bits)
    got = kernels.qmm_swiglu(x, *g[:3], *u[:3], 32, bits, 100)
    assert got.shape == (6, 100)
    assert mx.allclose(got, nn.silu(gate) * up, rtol=1e-5, atol=1e-5).item()
    alone = kernels.qmm_swiglu(x[2:3], *g[:3], *u[:3], 32, bits, 100)
    assert mx.array_equal(alone[0], got[2]).item()  # the same bits alone or in a batch
    with pytest.raises(ValueError, match="differ"):
        kernels.qmm_swiglu(
            x, *g[:3], *cpu.pack(uq, us.astype(mx.bfloat16), ub.astype(mx.bfloat16), bits)[:3], 32, bits, 100
        )


def _kv(rng, b, heads, s, d, spare=0):
    """(b, heads, s, d) float32 as a slice of a longer buffer, as the KV cache hands it over."""
    return mx.array(rng.standard_normal((b, heads, s + spare, d)).astype(np.float32))[:, :, :s]


def test_decode_attention_matches_mlx():
    rng = np.random.default_rng(6)
    for b, h, hk, s, d in [(1, 9, 3, 1, 64), (4, 9, 3, 37, 64), (3, 4, 4, 130, 32), (2, 8, 2, 5, 12)]:
        q = mx.array(rng.standard_normal((b, h, 1, d)).astype(np.float32))
        k, v = _kv(rng, b, hk, s, d, spare=20), _kv(rng, b, hk, s, d, spare=3)
        pad = mx.array(rng.integers(0, max(1, s // 2), b))
        left_padded = (mx.arange(s)[None] >= pad[:, None]).reshape(b, 1, 1, s)
        additive = mx.array(rng.standard_normal((1, h, 1, s)).astype(np.float32))
        for mask in (None, left_padded, additive):
            want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
            got = kernels.decode_attention(q, k, v, 0.125, mask)
            assert got.shape == want.shape
            assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), (b, h, hk, s, d, mask)
    with pytest.raises(ValueError, match="shapes"):
        kernels.decode_attention(mx.zeros((1, 9, 2, 64)), mx.zeros((1, 3, 4, 64)), mx.zeros((1, 3, 4, 64)), 1.0)


def test_decode_attention_gives_a_sequence_the_same_bits_alone_or_left_padded_in_a_batch():
    rng = np.random.default_rng(7)
    s, pad = 20, 7
    q = mx.array(rng.standard_normal((2, 9, 1, 64)).astype(np.float32))
    k, v = _kv(rng, 1, 3, s, 64), _kv(rng, 1, 3, s, 64)
    alone = kernels.decode_attention(q[:1], k, v, 0.125)
    other_k, other_v = _kv(rng, 1, 3, s + pad, 64), _kv(rng, 1, 3, s + pad, 64)
    zeros = mx.zeros((1, 3, pad, 64))
    batch_k = mx.concatenate([mx.concatenate([zeros, k], axis=2), other_k])
    batch_v = mx.concatenate([mx.concatenate([zeros, v], axis=2), other_v])
    mask = mx.array([[[[False] * pad + [True] * s]], [[[True] * (s + pad)]]])
    batch = kernels.decode_attention(q, batch_k, batch_v, 0.125, mask)
    assert np.array_equal(np.array(alone[0]), np.array(batch[0]))


# --- a model on the kernels ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_tiny_dir(tmp_path_factory, tiny_dir):
    """The tiny model quantized the mlx-lm way: 4-bit layers, an 8-bit group-64 embedding."""
    from mlxserve.engine.model import load_path

    model = load_path(tiny_dir, weight_dtype="float32", fuse=False).model  # saved as mlx-lm writes it
    layers = {"model.embed_tokens": {"group_size": 64, "bits": 8}}
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: layers.get(p, hasattr(m, "to_quantized")))
    out = tmp_path_factory.mktemp("tiny-q4")
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    config = json.loads((tiny_dir / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, **layers}
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def test_a_quantized_model_loads_onto_the_kernels(quantized_tiny_dir):
    from mlxserve.engine.model import load_path

    lm = load_path(quantized_tiny_dir)
    assert lm.weight_dtype == dtypes.QKERNELS
    inner = lm.model.model
    assert isinstance(inner.layers[0].mlp.up_proj, dtypes.CpuQuantizedLinear)
    assert isinstance(inner.embed_tokens, dtypes.CpuQuantizedEmbedding)
    if lm.model.args.tie_word_embeddings:  # one packed copy for the lookups and the head
        assert inner.embed_tokens.out_features == lm.model.args.vocab_size
    assert isinstance(inner.norm, dtypes.CpuRMSNorm)
    assert isinstance(inner.layers[0].self_attn.rope, dtypes.CpuRoPE)
    assert type(inner.layers[0].mlp).__name__ == "CpuSwiGLUMLP"  # gate and up as one op
    import sys

    source = sys.modules[type(inner.layers[0].self_attn).__module__]
    assert hasattr(source.scaled_dot_product_attention, "cpu_original")  # decode attention routed
    assert inner.norm.weight.dtype == mx.float32
    ref = load_path(quantized_tiny_dir, weight_dtype="float32")
    prompt = mx.array([[3, 17, 42, 5, 9]])
    a, b = lm.model(prompt), ref.model(prompt)
    assert a.dtype == mx.float32
    assert mx.allclose(a, b, atol=0.05 * mx.abs(b).max().item()).item(), mx.abs(a - b).max().item()
    assert lm.weight_bytes < ref.weight_bytes / 3


def _one_layer_llama(vocab_size: int, tied: bool):
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=1,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        tie_word_embeddings=tied,
    )
    return llama.Model(args)


def test_unsupported_layers_are_dequantized_and_the_rest_use_the_kernels():
    model = _one_layer_llama(vocab_size=256, tied=False)
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: (
            {"group_size": 64, "bits": 6} if p.endswith("down_proj") else hasattr(m, "to_quantized")
        ),
    )
    assert dtypes.use_cpu_kernels(model, kernels) == 8  # 6 linears, the head and the embedding
    mlp = model.model.layers[0].mlp
    assert type(mlp.down_proj) is nn.Linear and mlp.down_proj.weight.dtype == mx.float32
    assert isinstance(mlp.up_proj, dtypes.CpuQuantizedLinear)
    assert model.lm_head(mx.ones((2, 128))).shape == (2, 256)


def test_a_tied_embedding_keeps_one_packed_copy_for_lookups_and_the_head():
    model = _one_layer_llama(vocab_size=300, tied=True)
    nn.quantize(model, group_size=64, bits=8)
    prompt = mx.array([[3, 17, 42, 5, 299]])
    want = model(prompt)
    assert dtypes.use_cpu_kernels(model, kernels) == 8  # 7 linears and the embedding
    embed = model.model.embed_tokens
    assert embed.out_features == 300 and embed["weight"].shape == (38, 128 * 8 // 4)  # packed, padded
    got = model(prompt)
    assert mx.allclose(got, want, atol=0.03 * mx.abs(want).max().item()).item(), mx.abs(got - want).max().item()


def test_batched_greedy_equals_solo_on_the_kernels(quantized_tiny_dir):
    from test_loop import assert_batched_equals_solo

    assert_batched_equals_solo(quantized_tiny_dir, 16)


# --- building, and the way back to float32 ------------------------------------------------------


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    from mlxserve.engine.cpu import buildext as build

    fake = tmp_path / "g++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: refused' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("MLXSERVE_SMALL_GEMM", str(tmp_path / "cache"))  # the build cache
    path, why = build.build()
    assert path is None and "failed" in why and "fake compiler: refused" in why
    monkeypatch.setenv(build.ENV, "off")
    assert build.build() == (None, f"{build.ENV}=off")


def test_off_loads_the_float32_path(quantized_tiny_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = (
        "import sys; from mlxserve.engine.model import load_path; "
        "lm = load_path(sys.argv[1]); print(lm.weight_dtype, type(lm.model.model.layers[0].mlp.down_proj).__name__)"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MLXSERVE_QKERNELS="off", PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", probe, str(quantized_tiny_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["float32", "Linear"]
