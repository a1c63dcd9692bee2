"""Read llama-family GGUF files into mlx-lm's llama model.

``mx.load`` keeps Q4_0/Q4_1/Q8_0 tensors quantized (affine, group 32) as ``weight``/``scales``/
``biases`` triples and gives F16/F32 tensors as they are; everything here only renames tensors
and turns GGUF metadata into an mlx-lm config. llama.cpp permutes the Q/K projections for its
rotary layout, which is mlx's "traditional" rope, hence ``rope_traditional: True``.

GGUF keeps norm weights in float32 while the quantized tensors' scales are float16. On a GPU that
one float32 vector per norm promotes every activation after it, the KV cache included, to
float32 (MLX promotes mixed operands), so :func:`half_floats` casts such tensors to the scales'
half type when the model will run on a GPU. The CPU dequantizes to float32 anyway (engine/dtype.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import LoadError, UnsupportedModel

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED_ARCHITECTURES = ("llama",)


def scalar(value: Any) -> Any:
    """GGUF metadata scalars arrive as 0-d mx arrays; lists and strings as Python objects."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_gguf(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    try:
        weights, metadata = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as exc:  # mx.load raises bare RuntimeError/ValueError for any bad file
        raise LoadError(f"cannot read GGUF file {Path(path).name}: {exc}") from exc
    return weights, metadata


def rename_tensor(name: str) -> str | None:
    if m := _LAYER.match(name):
        layer, part, suffix = m.groups()
        target = _LAYER_NAMES.get(part)
        if target is None:
            return None
        return f"model.layers.{layer}.{target}.{'bias' if suffix == 'bias' else suffix}"
    base, _, suffix = name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    return None


def config_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    arch = scalar(metadata.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(f"unsupported GGUF architecture '{arch}' (supported: llama family)")

    def meta(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        return scalar(value) if value is not None else None

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    vocab = meta("vocab_size")
    if vocab is None:
        vocab = len(metadata.get("tokenizer.ggml.tokens", []))
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_traditional": True,
        "head_dim": int(meta("rope.dimension_count", hidden // heads)),
    }
    return config


def load_gguf_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, mx.array], dict[str, Any]]:
    """Returns (mlx-lm config, renamed weights, raw metadata)."""
    raw, metadata = read_gguf(path)
    config = config_from_metadata(metadata)
    weights: dict[str, mx.array] = {}
    for name, tensor in raw.items():
        target = rename_tensor(name)
        if target is not None:
            weights[target] = tensor
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    config["quantization"] = quantization_of(weights)
    if mx.default_device().type == mx.DeviceType.gpu:
        weights = half_floats(weights)
    return config, weights, metadata


def half_floats(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """float32 tensors cast to the half type the model otherwise holds (its quantization scales'
    or its float16/bfloat16 weights'), so activations stay in half precision end to end. A
    model with no half tensor at all is left as it is."""
    half = next((w.dtype for name, w in weights.items() if name.endswith(".scales")), None)
    if half is None:
        half = next((w.dtype for w in weights.values() if w.dtype in (mx.float16, mx.bfloat16)), None)
    if half is None or half == mx.float32:
        return weights
    return {name: w.astype(half) if w.dtype == mx.float32 else w for name, w in weights.items()}


def quantization_of(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """Per-layer bits for quantized tensors (a GGUF may mix Q4 and Q8 layers); group size is 32."""
    layers: dict[str, Any] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        prefix = name[: -len(".scales")]
        packed = weights[f"{prefix}.weight"]
        in_features = scales.shape[-1] * 32
        bits = packed.shape[-1] * 32 // in_features
        layers[prefix] = {"group_size": 32, "bits": bits}
    if not layers:
        return None
    # The most common width is the default; only the exceptions are listed per layer.
    counts: dict[int, int] = {}
    for v in layers.values():
        counts[v["bits"]] = counts.get(v["bits"], 0) + 1
    default = max(counts, key=counts.__getitem__)
    exceptions = {k: v for k, v in layers.items() if v["bits"] != default}
    return {"group_size": 32, "bits": default, "layers": exceptions}
