"""BLAS selection (in subprocesses: it is per process) and weight dtype choice / dequantization."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlxserve.engine.cpu import backend
from mlxserve.engine.dtype import (
    choose_weight_dtype,
    dequantize_model,
    float_bytes,
    parameter_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


# --- configure_blas, each in a fresh interpreter ----------------------------------------------

_PROBE = """
import json, sys
from mlxserve.engine.cpu import backend
if sys.argv[1] == "late":
    import mlx.core
info = backend.configure_blas()
assert backend.configure_blas() is info
import mlx.core as mx
a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
product = (a @ a.T).tolist()
print(json.dumps({"name": info.name, "path": info.path, "reason": info.reason,
                  "optimized": info.optimized, "product": product,
                  "described": backend.describe_backend()}))
"""


def _probe(blas: str | None, order: str = "early") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXSERVE_BLAS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if blas is not None:
        env["MLXSERVE_BLAS"] = blas
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, order], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_EXPECTED_PRODUCT = [[14.0, 38.0, 62.0], [38.0, 126.0, 214.0], [62.0, 214.0, 366.0]]


def test_the_bootstrap_and_its_settings_import_no_mlx():
    """Entry points import these before mlx.core: the BLAS they load must come first."""
    probe = (
        "import sys, mlxserve.config, mlxserve.engine.cpu.bootstrap, mlxserve.engine.cpu.backend;"
        "mlxserve.config.Settings.from_env();"
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_blas_off_uses_reference_and_still_computes():
    r = _probe("off")
    assert r["name"] == "reference" and r["path"] is None and not r["optimized"]
    assert "MLXSERVE_BLAS=off" in r["reason"]
    assert r["product"] == _EXPECTED_PRODUCT
    assert r["described"]["device"] in ("cpu", "gpu")
    if sys.platform.startswith("linux") and r["described"]["device"] == "cpu":
        # Read from libmlx's own binding, not from what configure_blas believes.
        assert r["described"]["blas"] == "reference"


def test_blas_bad_path_falls_back_to_reference():
    r = _probe("/nonexistent/libopenblas.so.0")
    assert r["name"] == "reference"
    assert "unusable" in r["reason"]
    assert r["product"] == _EXPECTED_PRODUCT


def _installed_openblas() -> str | None:
    return next((p for p in backend.candidate_paths() if os.path.exists(p)), None)


@pytest.mark.skipif(_installed_openblas() is None, reason="no system OpenBLAS (libopenblas0-pthread)")
def test_blas_auto_binds_libmlx_to_openblas():
    r = _probe(None)
    assert r["name"] == "openblas" and r["optimized"]
    assert "openblas" in os.path.basename(r["path"]).lower()
    assert r["described"]["blas"] == "openblas"
    assert r["product"] == _EXPECTED_PRODUCT


def test_blas_after_mlx_import_is_unchanged():
    r = _probe(None, order="late")
    assert r["reason"].startswith("unchanged")
    if sys.platform.startswith("linux"):
        assert r["name"] == "reference"  # too late: libmlx already bound to its bundled BLAS
    assert r["product"] == _EXPECTED_PRODUCT


# --- choose_weight_dtype -----------------------------------------------------------------------


def test_gpu_keeps_quantized():
    assert choose_weight_dtype("gpu", 100 * 2**20, None, 64 * GiB) == "keep"


def test_cpu_dequantizes_when_it_fits():
    # Whatever the BLAS: float32 beat Q4 with the reference BLAS too (measured, see dtype.py).
    assert choose_weight_dtype("cpu", 100 * 2**20, None, 8 * GiB) == "float32"
    assert choose_weight_dtype("cpu", 100 * 2**20, "auto", 8 * GiB) == "float32"


def test_cpu_keeps_quantized_when_float32_does_not_fit():
    # 4 GiB of Q4 is ~25 GiB of f32.
    assert choose_weight_dtype("cpu", 4 * GiB, None, 16 * GiB) == "keep"
    # The exact size, when given, beats the bound (16x, for 2-bit): 1.5 GiB fits in 2 GiB.
    q = 300 * 2**20
    assert choose_weight_dtype("cpu", q, None, 2 * GiB) == "keep"
    assert choose_weight_dtype("cpu", q, None, 2 * GiB, float32_bytes=int(1.5 * GiB)) == "float32"


def test_cpu_stays_quantized_on_the_kernels_when_they_built():
    # Even where float32 would fit: the kernels read the quantized bytes (engine/cpu).
    assert choose_weight_dtype("cpu", 100 * 2**20, None, 8 * GiB, kernels=True) == "quantized-cpu"
    assert choose_weight_dtype("gpu", 100 * 2**20, None, 8 * GiB, kernels=True) == "keep"
    assert choose_weight_dtype("cpu", 1, "float32", None, kernels=True) == "float32"
    assert choose_weight_dtype("cpu", 1, "qkernels", None) == "quantized-cpu"


def test_default_budget_is_half_of_ram():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    small, huge = ram // 64, ram  # 16x small fits in ram/2; huge never does
    assert choose_weight_dtype("cpu", small, None, None) == "float32"
    assert choose_weight_dtype("cpu", huge, None, None) == "keep"


def test_setting_overrides():
    assert choose_weight_dtype("cpu", 4 * GiB, "float32", 1) == "float32"
    assert choose_weight_dtype("gpu", 1, "f16", None) == "float16"
    assert choose_weight_dtype("cpu", 1, "keep", None) == "keep"
    with pytest.raises(ValueError):
        choose_weight_dtype("cpu", 1, "int3", None)


# --- dequantize_model --------------------------------------------------------------------------


def _tiny_model(seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=512,
        tie_word_embeddings=True,
        mlp_bias=True,
    )
    model = llama.Model(args)
    for _, m in model.named_modules():  # non-zero biases, so dropping one would show
        if isinstance(m, nn.Linear) and "bias" in m:
            m.bias = mx.random.normal(m.bias.shape) * 0.1
    mx.eval(model.parameters())
    return model


def _quantize_mixed(model: nn.Module) -> None:
    def predicate(path, module):
        if isinstance(module, nn.Embedding):
            return {"group_size": 32, "bits": 8}
        if path.endswith("down_proj"):
            return {"group_size": 64, "bits": 6}
        return isinstance(module, nn.Linear)

    nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)
    mx.eval(model.parameters())


def test_dequantize_keeps_logits_and_structure():
    q = _tiny_model()
    _quantize_mixed(q)
    f = _tiny_model()
    _quantize_mixed(f)
    expected_bytes = float_bytes(f)
    dequantize_model(f, mx.float32)

    for _, m in f.named_modules():
        assert not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    assert isinstance(f.model.embed_tokens, nn.Embedding)
    assert f.model.layers[0].mlp.up_proj.bias.dtype == mx.float32  # biases kept
    assert parameter_bytes(f) == expected_bytes

    x = mx.array([[1, 5, 9, 200, 31, 7]])
    lq, lf = q(x), f(x)
    assert lf.dtype == mx.float32
    assert mx.allclose(lq, lf, atol=2e-3, rtol=2e-3).item(), mx.abs(lq - lf).max().item()
    # Dequantized values are exactly what the quantized kernel multiplies by.
    up = q.model.layers[1].mlp.up_proj
    ref = mx.dequantize(up.weight, up.scales, up.biases, group_size=32, bits=4)
    assert mx.array_equal(ref, f.model.layers[1].mlp.up_proj.weight).item()

    plain = _tiny_model()
    _quantize_mixed(plain)
    dequantize_model(plain, mx.float32, blas_layout=False)
    assert mx.allclose(plain(x), lf, atol=1e-5).item()


def test_dequantize_accepts_names_and_rejects_non_float():
    m = _tiny_model()
    _quantize_mixed(m)
    dequantize_model(m, "float16")
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16
    assert m.model.norm.weight.dtype == mx.float16
    with pytest.raises(ValueError):
        dequantize_model(_tiny_model(), "keep")
    with pytest.raises(ValueError):
        dequantize_model(_tiny_model(), mx.int32)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(n):
        token = logits.argmax(-1)
        out.append(token.item())
        logits = model(token[:, None], cache=cache)[:, -1]
    return out


def test_dequantized_smollm2_generates_the_same_tokens(smollm2_gguf):
    from mlxserve.engine.model import load_path

    q = load_path(smollm2_gguf, weight_dtype="keep")
    f = load_path(smollm2_gguf, weight_dtype="keep")
    assert isinstance(q.model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    dequantize_model(f.model, mx.float32)

    prompt = q.tokenizer.encode("The capital of France is")
    lq = q.model(mx.array([prompt]))
    lf = f.model(mx.array([prompt]))
    assert mx.allclose(lq, lf, atol=0.1).item(), mx.abs(lq - lf).max().item()
    assert _greedy(q.model, prompt, 10) == _greedy(f.model, prompt, 10)
