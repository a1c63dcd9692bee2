"""engine/fuse.py: one product for a layer's q/k/v (and gate/up) projections, the same logits
as the separate products, on every architecture and weight path (quantized as stored, the CPU
kernels, dequantized to float32; on a GPU the CUDA routing)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlxserve.engine import cpu, dtype as dtypes
from mlxserve.engine.fuse import FusedHead, FusedPart
from mlxserve.engine.model import load_path
from mlxserve.testing import ggufmodels

# phi3 ships its projections fused already; every other family gets q/k/v fused at least.
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3")
PATHS = ("keep", "float32", dtypes.QKERNELS)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuse")


def _heads(model: nn.Module) -> list[FusedHead]:
    return [m for _, m in model.named_modules() if isinstance(m, FusedHead)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", FAMILIES + ("phi3",))
def test_fused_projections_give_the_same_logits(gguf_dir, arch, path):
    if path == dtypes.QKERNELS and mx.default_device() != mx.cpu:
        pytest.skip("the CPU kernels serve the CPU only")
    if path == dtypes.QKERNELS and cpu.load()[0] is None:
        pytest.skip("the quantized CPU kernels do not build here")
    gguf = gguf_dir / f"{arch}.gguf"
    if not gguf.exists():
        ggufmodels.write(gguf, arch, "Q4_0")
    tokens = mx.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 6, 2]])
    fused = load_path(gguf, weight_dtype=path)
    plain = load_path(gguf, weight_dtype=path, fuse=False)
    assert fused.weight_dtype == plain.weight_dtype
    heads = _heads(fused.model)
    if arch == "phi3":
        assert not heads
    else:
        layers = len(fused.model.layers)
        # q/k/v in every layer; gate/up too wherever the MLP is dense (not with the CPU kernels,
        # which compute gate/up with the SiLU as one op of their own)
        assert len(heads) >= layers
        assert not _heads(plain.model)
        if path != dtypes.QKERNELS and arch != "qwen3moe":
            assert len(heads) == 2 * layers
    for head in heads:  # the fused linear is what the load's swaps turned into kernels / floats
        kind = type(plain.model.layers[0].self_attn.k_proj)
        assert type(head.fused) is kind
    a, b = fused.model(tokens), plain.model(tokens)
    # mlx-cuda's float32 products round through TF32 (MLX_ENABLE_TF32 defaults to on): a fused
    # product sums in another grouping, so the GPU gets the half-precision tolerance there too.
    tol = 1e-4 if a.dtype == mx.float32 and mx.default_device() == mx.cpu else 2e-2
    assert mx.allclose(a, b, atol=tol, rtol=tol).item(), float(mx.abs(a - b).max())


def test_a_part_called_on_another_input_computes_its_own(gguf_dir):
    """The product is shared by input identity: a projection called alone, or on another array,
    still returns its own slice of the right product."""
    gguf = gguf_dir / "llama.gguf"
    if not gguf.exists():
        ggufmodels.write(gguf, "llama", "Q4_0")
    fused = load_path(gguf, weight_dtype="keep").model.layers[0].self_attn
    plain = load_path(gguf, weight_dtype="keep", fuse=False).model.layers[0].self_attn
    assert isinstance(fused.k_proj, FusedPart)
    x = mx.random.normal((3, 256)).astype(mx.float16)
    y = mx.random.normal(x.shape).astype(mx.float16)
    q = fused.q_proj(x)  # leaves the product of x pending for k and v
    for got, want in ((fused.v_proj(y), plain.v_proj(y)), (fused.k_proj(x), plain.k_proj(x)), (q, plain.q_proj(x))):
        assert mx.allclose(got, want, atol=1e-2).item()
    fused.q_proj(x), fused.k_proj(x), fused.v_proj(x)
    assert fused.q_proj._state.pending is None  # each slice taken: the product is not held
