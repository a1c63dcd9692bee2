"""GGUF quant types -> MLX tensors, checked value for value against the gguf package's decoder
(the reference; it and llama.cpp agree) on random blocks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

from mlxserve.engine.ggufquant import tensor_arrays
from mlxserve.store.convert import bits_for

SHAPE = (2, 8, 512)  # a 3-D (expert) tensor: every row is 2 K-quant super-blocks
# f16 fields (byte offset in the block) set to sane scales; the other bytes stay random
_F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q5_0: (0,),
    T.Q8_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (-2,),
    T.Q3_K: (-2,),
    T.Q2_K: (-4, -2),
}


def random_blocks(qtype: T, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(SHAPE)) // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        off %= size
        raw[:, off : off + 2] = rng.uniform(0.001, 0.01, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw


def decoded(raw: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray, int]:
    """(ours as float32, the reference, bits)."""
    bits = bits_for(qtype)
    out = tensor_arrays(raw.reshape(-1), qtype, SHAPE, bits)
    ours = mx.dequantize(
        out["weight"], out["scales"].astype(mx.float32), out["biases"].astype(mx.float32), group_size=32, bits=bits
    )
    ref = np.asarray(dequantize(raw, qtype), np.float32).reshape(SHAPE)
    return np.array(ours), ref, bits


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K])
def test_affine_types_are_unpacked_code_for_code(qtype):
    ours, ref, bits = decoded(random_blocks(qtype), qtype)
    assert bits == (4 if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else 8)
    groups = np.abs(ref).reshape(-1, 32).max(-1, keepdims=True)
    # only each group's scale and minimum rounded to float16 (K-quants: d * sub-block scale)
    assert (np.abs(ours - ref).reshape(-1, 32) <= 1e-3 * groups + 1e-7).all()


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K, T.Q2_K])
def test_sixteen_value_sub_blocks_are_requantized_within_a_step(qtype):
    ours, ref, bits = decoded(random_blocks(qtype), qtype)
    assert bits == 8
    groups = ref.reshape(-1, 32)
    step = (groups.max(-1) - groups.min(-1)) / (2**bits - 1)
    # mx.quantize (fp16 scale and bias) is off by at most about one step of a group's range
    bound = 1.1 * step + 2e-3 * np.abs(groups).max(-1) + 1e-6
    assert (np.abs(ours - ref).reshape(-1, 32).max(-1) <= bound).all()


def test_mxfp4_is_mlx_mxfp4_code_for_code():
    from gguf.quants import quantize

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    raw = quantize(x, T.MXFP4)
    out = tensor_arrays(raw.reshape(-1), T.MXFP4, SHAPE, bits_for(T.MXFP4))
    assert set(out) == {"weight", "scales"} and out["scales"].dtype == mx.uint8
    ours = mx.dequantize(out["weight"], out["scales"], None, group_size=32, bits=4, mode="mxfp4")
    np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), dequantize(raw, T.MXFP4))


def test_float_types_are_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    out = tensor_arrays(bf16.view(np.uint8).reshape(-1), T.BF16, SHAPE)["weight"]
    assert out.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), (bf16.astype(np.uint32) << 16).view(np.float32))
    out = tensor_arrays(x.astype(np.float16).view(np.uint8).reshape(-1), T.F16, SHAPE)["weight"]
    assert out.dtype == mx.float16
    np.testing.assert_array_equal(np.array(out), x.astype(np.float16))


def _mx_load(tmp_path, qtype: T, raw: np.ndarray) -> np.ndarray:
    import gguf

    path = tmp_path / "one.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t.weight", raw.reshape(SHAPE[0] * SHAPE[1], -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = mx.load(str(path))
    if "t.scales" not in got:
        return np.array(got["t.weight"].astype(mx.float32))
    bits = got["t.weight"].shape[-1] * 32 // (got["t.scales"].shape[-1] * 32)
    return np.array(
        mx.dequantize(got["t.weight"], got["t.scales"], got["t.biases"], group_size=32, bits=bits).astype(mx.float32)
    )


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_mx_load_reads_the_types_kept_as_gguf(tmp_path, qtype):
    """Q4_0/Q4_1/Q8_0 files are served through mx.load: it must match the reference."""
    raw = random_blocks(qtype)
    ref = np.asarray(dequantize(raw, qtype), np.float32).reshape(-1, SHAPE[-1])
    got = _mx_load(tmp_path, qtype, raw)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_mx_load_misreads_q4_k(tmp_path):
    """Why Q4_K is converted with our own unpacking: mx.load decodes it wrongly (the issue's
    lead: odd sub-blocks use the neighbouring even one's scale and minimum). If this starts
    failing, MLX was fixed and Q4_K files could be served as they are."""
    raw = random_blocks(T.Q4_K)
    ref = np.asarray(dequantize(raw, T.Q4_K), np.float32).reshape(-1, SHAPE[-1])
    got = _mx_load(tmp_path, T.Q4_K, raw)
    assert np.abs(got - ref).max() > 0.05 * np.abs(ref).max()
