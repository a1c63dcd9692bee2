"""GGUF metadata -> mlx-lm config for what the tiny models of the llama.cpp comparison do not
cover: real Llama 3.1/3.2 rope_freqs, Ollama's own gemma3 keys, refusals."""

from __future__ import annotations

import pytest

from mlxserve.engine.gguf import config_from_metadata
from mlxserve.errors import UnsupportedModel
from mlxserve.testing.ggufmodels import _llama3_rope_freqs

SHAPES = {"token_embd.weight": (1000, 64), "output_norm.weight": (64,)}


def meta(arch: str, **extra) -> dict:
    base = {
        "general.architecture": arch,
        f"{arch}.embedding_length": 4096,
        f"{arch}.block_count": 4,
        f"{arch}.feed_forward_length": 8192,
        f"{arch}.attention.head_count": 32,
        f"{arch}.attention.head_count_kv": 8,
    }
    return base | {f"{arch}.{k.replace('__', '.')}": v for k, v in extra.items()}


@pytest.mark.parametrize("factor,old_ctx", [(8.0, 8192), (32.0, 8192)])  # Llama 3.1, 3.2
def test_llama3_rope_freqs_become_its_rope_scaling(factor, old_ctx):
    freqs = _llama3_rope_freqs(500000.0, 128, factor, 1.0, 4.0, old_ctx)
    config = config_from_metadata(
        meta("llama", rope__freq_base=500000.0), {**SHAPES, "rope_freqs.weight": (64,)}, lambda name: freqs
    )
    s = config["rope_scaling"]
    assert s["rope_type"] == "llama3" and s["factor"] == factor
    assert s["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)
    assert s["original_max_position_embeddings"] == pytest.approx(old_ctx, rel=1e-3)
    assert config["rope_traditional"] is True


def test_rope_freqs_of_another_shape_are_refused():
    freqs = _llama3_rope_freqs(500000.0, 128, 8.0, 1.0, 4.0, 8192)[::-1].copy()
    with pytest.raises(UnsupportedModel, match="rope_freqs"):
        config_from_metadata(
            meta("llama", rope__freq_base=500000.0), {**SHAPES, "rope_freqs.weight": (64,)}, lambda name: freqs
        )


def test_ollama_gemma3_keys():
    """Ollama's converter writes rope.global/local.freq_base, a per-layer bool pattern and a
    final soft-cap of 30 that Gemma 3 does not have (nor Ollama apply)."""
    pattern = [(i + 1) % 6 != 0 for i in range(12)]
    md = meta(
        "gemma3",
        rope__global__freq_base=1e6,
        rope__local__freq_base=1e4,
        attention__sliding_window=512,
        attention__sliding_window_pattern=pattern,
        final_logit_softcapping=30.0,
        block_count=12,
        attention__key_length=256,
    )
    config = config_from_metadata(md, SHAPES, lambda name: None)
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (512, 6)
    assert config["model_type"] == "gemma3_text" and config["query_pre_attn_scalar"] == 256


@pytest.mark.parametrize(
    "md,why",
    [
        (meta("llama", expert_count=8, expert_used_count=2), "mixture-of-experts"),
        (meta("qwen2", rope__scaling__type="longrope", rope__scaling__factor=4.0), "rope scaling"),
        (
            meta(
                "gemma3",
                block_count=4,
                attention__sliding_window=8,
                attention__sliding_window_pattern=[True, False, False, True],
            ),
            "pattern",
        ),
        (meta("mamba"), "unsupported GGUF architecture"),
    ],
)
def test_what_mlx_lm_cannot_run_is_refused(md, why):
    with pytest.raises(UnsupportedModel, match=why):
        config_from_metadata(md, SHAPES, lambda name: None)
