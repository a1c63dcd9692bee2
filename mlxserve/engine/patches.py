"""Fixes to mlx-lm's model classes where they differ from the models as trained (and as
llama.cpp runs them); engine/model.py's ``_build`` calls :func:`apply` on every model it builds.

- gemma2: the batch mask gets the grouped-head axis, and the local layers (every other one,
  the first included) attend to a sliding window, as gemma3_text does. mlx-lm's gemma2 attends
  to the whole context on every layer, so past the window its outputs are another model's.
- phi3 LongRoPE: mlx-lm always rotates with the long factors; llama.cpp uses the short ones
  unless the context is longer than the original one (``fit_context``), and the GGUF's
  attention factor.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def apply(model: nn.Module, config: dict[str, Any]) -> None:
    """After the model is made, before its weights load (nothing here adds parameters)."""
    kind = config.get("model_type")
    if kind == "gemma2":
        _gemma2_batch_mask()
        _gemma2_sliding_window()
        window = config.get("sliding_window")
        model.model.sliding_window = int(window) if window else None
    elif kind == "phi3":
        _phi3_longrope(model, config)


def fit_context(model: nn.Module, context_length: int) -> None:
    """Choose what depends on the context the model is served with (num_ctx): phi3's LongRoPE
    factors, by llama.cpp's rule (long ones only for a context longer than the original)."""
    for layer in getattr(model, "layers", []):
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is not None and hasattr(rope, "_mlxserve_long"):
            long = context_length > rope.original_max_position_embeddings
            rope._freqs = rope._mlxserve_long if long else rope._mlxserve_short


# ---------------------------------------------------------------- gemma2


def _gemma2_batch_mask() -> None:
    """mlx-lm's gemma2 attention groups query heads as (B, kv_heads, repeats, L, D) but applies the
    batch's (B, 1, L, S) mask unchanged, which lines B up with the KV heads: with two or more
    sequences in a batch the step fails (or masks the wrong rows). Give the mask the group axis."""
    from mlx_lm.models import gemma2

    call = gemma2.Attention.__call__
    if getattr(call, "mlxserve_grouped_mask", False):
        return

    def grouped_mask(self: Any, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if isinstance(mask, mx.array) and mask.ndim == 4 and self.repeats > 1:
            mask = mx.expand_dims(mask, 2)
        return call(self, x, mask, cache)

    grouped_mask.mlxserve_grouped_mask = True  # type: ignore[attr-defined]
    gemma2.Attention.__call__ = grouped_mask  # type: ignore[method-assign]


def _gemma2_sliding_window() -> None:
    """GemmaModel.__call__ with a windowed mask on the even (local) layers, as llama.cpp and
    Transformers run Gemma 2. Every layer keeps a full KV cache (so the prompt cache can trim
    it); the window is in the mask, which mlx-lm's caches build from their own offsets and
    left padding, for prefill and decode alike."""
    from mlx_lm.models import gemma2
    from mlx_lm.models.base import create_attention_mask

    if getattr(gemma2.GemmaModel.__call__, "mlxserve_window", False):
        return

    def call(self: Any, inputs: mx.array, cache: Any = None) -> mx.array:
        h = self.embed_tokens(inputs)
        h = h * (self.args.hidden_size**0.5)
        if cache is None:
            cache = [None] * len(self.layers)
        full = create_attention_mask(h, cache[0], return_array=True)
        window = getattr(self, "sliding_window", None)
        local = create_attention_mask(h, cache[0], window_size=window, return_array=True) if window else full
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, local if i % 2 == 0 else full, c)
        return self.norm(h)

    call.mlxserve_window = True  # type: ignore[attr-defined]
    gemma2.GemmaModel.__call__ = call  # type: ignore[method-assign]


# ---------------------------------------------------------------- phi3


def _phi3_longrope(model: nn.Module, config: dict[str, Any]) -> None:
    """Keep both factor sets on each SuScaledRoPE and start with the ones for the model's full
    context (llama-server's default); ``rope_scaling["attn_factor"]`` (from a GGUF) replaces the
    scale mlx-lm derives from the context lengths, as llama.cpp reads it from the file."""
    from mlx_lm.models.rope_utils import SuScaledRoPE

    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") not in ("longrope", "su"):
        return
    for layer in model.layers:
        rope = layer.self_attn.rope
        if not isinstance(rope, SuScaledRoPE):
            continue
        periods = float(config.get("rope_theta", 10000.0)) ** (mx.arange(0, rope.dim, 2, dtype=mx.float32) / rope.dim)
        rope._mlxserve_long = rope._freqs
        rope._mlxserve_short = mx.array(scaling.get("short_factor", 1.0), dtype=mx.float32) * periods
        if scaling.get("attn_factor") is not None:
            rope._scale = float(scaling["attn_factor"])
    fit_context(model, int(config.get("max_position_embeddings") or 0))
