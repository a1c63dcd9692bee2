"""GGUF models onto mlx-lm's model classes: tensor names, config from metadata, weight fixes.

Architectures (GGUF name -> mlx-lm module): llama -> llama, qwen2 -> qwen2, qwen3 -> qwen3,
qwen3moe -> qwen3_moe, gemma2 -> gemma2, gemma3 -> gemma3_text, phi3 -> phi3, gpt-oss ->
gpt_oss. What llama.cpp's
converter changed is undone or mirrored here: it permutes llama's Q/K projections for its
interleaved rope (mlx's "traditional" rope; the other architectures use llama.cpp's NEOX rope,
mlx's default), stores gemma's norm weights as 1 + w (mlx-lm's gemma norms add the 1 again), and
keeps Llama 3's rope scaling only as a ``rope_freqs`` tensor (fitted back to its parameters).

``mx.load`` keeps Q4_0/Q4_1/Q8_0 tensors quantized (affine, group 32) as ``weight``/``scales``/
``biases`` triples and gives F16/F32 tensors as they are; such files run as they are
(:func:`load_gguf_weights`). Other types are converted at create (engine/convert.py).

GGUF keeps norm weights in float32 while the quantized tensors' scales are float16. On a GPU that
one float32 vector per norm promotes every activation after it, the KV cache included, to
float32 (MLX promotes mixed operands), so :func:`half_floats` casts such tensors to the scales'
half type when the model will run on a GPU. The CPU dequantizes to float32 anyway (engine/dtype.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import numpy as np

from ..errors import LoadError, UnsupportedModel

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {
    "gemma2": _GEMMA_NAMES,
    "gemma3": _GEMMA_NAMES,
    "phi3": {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "qwen3moe": {
        **_LAYER_NAMES,
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
        "ffn_up_exps": "mlp.switch_mlp.up_proj",
        "ffn_down_exps": "mlp.switch_mlp.down_proj",
    },
    "gpt-oss": {
        **_LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "attn_sinks": "self_attn.sinks",
        "ffn_gate_inp": "mlp.router",
        "ffn_gate_exps": "mlp.experts.gate_proj",
        "ffn_up_exps": "mlp.experts.up_proj",
        "ffn_down_exps": "mlp.experts.down_proj",
    },
}
_BARE = ("self_attn.sinks",)  # parameters that are arrays, not modules with a .weight
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt-oss": "gpt_oss",
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
_GEMMA = ("gemma2", "gemma3")


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


def architecture(metadata: Mapping[str, Any]) -> str:
    arch = scalar(metadata.get("general.architecture", ""))
    if arch not in MODEL_TYPES:
        raise UnsupportedModel(
            f"unsupported GGUF architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def rename_tensor(name: str, arch: str = "llama") -> str | None:
    """The mlx-lm parameter name of a GGUF tensor (or of mx.load's scales/biases of one);
    None for tensors the model does not use (rope_freqs: folded into the config)."""
    if m := _LAYER.match(name):
        layer, part, suffix = m.groups()
        target = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES).get(part)
        if target is None:
            return None
        if target in _BARE:
            return f"model.layers.{layer}.{target}"
        return f"model.layers.{layer}.{target}.{suffix}"
    base, _, suffix = name.rpartition(".")
    if base == "output" and arch == "gemma2":
        return None  # mlx-lm's gemma2 always ties the head (llama.cpp ignores output too)
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    return None


def fix_tensor(arch: str, target: str, value: mx.array) -> mx.array:
    """Undo what llama.cpp's converter changed: gemma stores its norms as 1 + w."""
    if arch in _GEMMA and target.endswith("norm.weight"):
        return (value.astype(mx.float32) - 1.0).astype(value.dtype)
    return value


# ---------------------------------------------------------------- config


class _Meta:
    def __init__(self, metadata: Mapping[str, Any], arch: str):
        self.md, self.arch = metadata, arch

    def __call__(self, key: str, default: Any = None, *aliases: str) -> Any:
        """``<arch>.<key>``, else ``<arch>.text.<key>`` or an alias (Ollama's converters)."""
        for k in (key, f"text.{key}", *aliases):
            value = self.md.get(f"{self.arch}.{k}")
            if value is not None:
                return scalar(value)
        return default

    def need(self, key: str) -> int:
        value = self(key)
        if not isinstance(value, int) or value <= 0:
            raise UnsupportedModel(f"GGUF metadata {self.arch}.{key} is missing or not a positive integer")
        return value


def _llama3_scaling(factors: np.ndarray, base: float, dims: int) -> dict[str, Any]:
    """Llama 3's rope_scaling parameters that give llama.cpp's per-frequency ``rope_freqs``
    (periods are multiplied by 1, by ``factor``, or smoothly in between)."""
    factors = np.asarray(factors, np.float64)
    factor = float(factors.max())
    wavelen = 2 * math.pi * base ** (np.arange(0, dims, 2) / dims)
    cfg = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if mid.sum() >= 2:
        # smooth = old_ctx / wavelen / (high - low) - low / (high - low), with low = 1
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[mid], smooth, 1)
        if b < 0:
            cfg |= {"high_freq_factor": 1 - 1 / b, "original_max_position_embeddings": -a / b}
    low = cfg["original_max_position_embeddings"] / cfg["low_freq_factor"]
    high = cfg["original_max_position_embeddings"] / cfg["high_freq_factor"]
    s = (cfg["original_max_position_embeddings"] / wavelen - 1) / (cfg["high_freq_factor"] - 1)
    expect = np.where(wavelen < high, 1.0, np.where(wavelen > low, factor, 1 / ((1 - s) / factor + s)))
    if factor <= 1 or not np.allclose(expect, factors, rtol=1e-3):
        raise UnsupportedModel("rope_freqs does not follow Llama 3's rope scaling")
    return cfg


def _rope_scaling(meta: _Meta) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type", "none")
    factor = meta("rope.scaling.factor")
    if kind == "none" or not factor or float(factor) == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        cfg = {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(meta("rope.scaling.original_context_length")),
        }
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta(f"rope.scaling.{key}") is not None:
                cfg[hf] = float(meta(f"rope.scaling.{key}"))
        return cfg
    raise UnsupportedModel(f"unsupported rope scaling '{kind}' for {meta.arch}")


def config_from_metadata(
    metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], vector: Callable[[str], np.ndarray]
) -> dict[str, Any]:
    """mlx-lm's config.json for a GGUF model. ``shapes``: the GGUF tensors' shapes (numpy order;
    only leading dimensions are read, so mx.load's packed shapes do); ``vector``: a 1-D float
    tensor's values by GGUF name (rope_freqs, rope_factors_*)."""
    arch = architecture(metadata)
    meta = _Meta(metadata, arch)
    heads = meta.need("attention.head_count")
    hidden = meta.need("embedding_length")
    layers = meta.need("block_count")
    head_dim = int(meta("attention.key_length", 0) or hidden // heads)
    rope_dim = int(meta("rope.dimension_count", 0) or head_dim)
    vocab = (
        shapes["token_embd.weight"][0]
        if "token_embd.weight" in shapes
        else (meta("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", [])))
    )
    config: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(meta("feed_forward_length", 0)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "rope_theta": float(meta("rope.freq_base", 1e6 if arch == "gemma3" else 1e4, "rope.global.freq_base")),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if int(meta("expert_count", 0) or 0) and arch not in ("qwen3moe", "gpt-oss"):
        raise UnsupportedModel(f"mixture-of-experts {arch} GGUF models are not supported")
    if rope_dim != head_dim and arch != "phi3":
        raise UnsupportedModel(f"{arch}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    if arch in ("qwen2", "phi3") and head_dim != hidden // heads:
        raise UnsupportedModel(f"{arch}: head size {head_dim} != hidden size / heads")
    scaling = _rope_scaling(meta)
    if arch == "llama":
        config["rope_traditional"] = True  # llama.cpp permuted Q/K for its interleaved rope
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        if "rope_freqs.weight" in shapes:
            scaling = _llama3_scaling(vector("rope_freqs.weight"), config["rope_theta"], rope_dim)
    if arch in ("gemma2", "gemma3"):
        if scaling is not None and (arch == "gemma2" or scaling["rope_type"] != "linear"):
            raise UnsupportedModel(f"{arch}: rope scaling {scaling['rope_type']} is not supported")
        # llama.cpp: 27B scales queries by hidden/heads, the others by the head size
        config["query_pre_attn_scalar"] = hidden / heads if layers == {"gemma2": 46, "gemma3": 62}[arch] else head_dim
    if arch == "gemma2":
        config["attn_logit_softcapping"] = float(meta("attn_logit_softcapping", 50.0))
        config["final_logit_softcapping"] = float(meta("final_logit_softcapping", 30.0))
        # every other layer (the first included) slides: engine/patches.py (llama.cpp's default 4096)
        config["sliding_window"] = int(meta("attention.sliding_window", 4096) or 0) or None
    elif arch == "gemma3":
        # final_logit_softcapping is ignored: Gemma 3 has none (some Ollama files carry a
        # stray 30 that Ollama itself does not apply), and mlx-lm's gemma3_text has no cap.
        window = int(meta("attention.sliding_window", 0) or 0)
        pattern = meta("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one bool a layer: must be mlx-lm's periodic pattern
            period = next((i + 1 for i, s in enumerate(pattern) if not s), len(pattern) + 1)
            if [bool(s) for s in pattern] != [(i + 1) % period != 0 for i in range(layers)]:
                raise UnsupportedModel("gemma3: this sliding-window layer pattern is not supported")
            pattern = period
        config |= {
            "rope_local_base_freq": float(meta("rope.freq_base_swa", 10000.0, "rope.local.freq_base")),
            "sliding_window": window or config["max_position_embeddings"],
            "sliding_window_pattern": int(pattern) if window else 1,
        }
    elif arch == "qwen3moe":
        experts = meta.need("expert_count")
        config |= {
            "num_experts": experts,
            "num_experts_per_tok": meta.need("expert_used_count"),
            "moe_intermediate_size": int(
                meta("expert_feed_forward_length", 0) or shapes["blk.0.ffn_gate_exps.weight"][1]
            ),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        }
        if float(meta("expert_weights_scale", 0.0) or 0.0) not in (0.0, 1.0):
            raise UnsupportedModel("qwen3moe with expert_weights_scale is not supported")
    elif arch == "gpt-oss":
        window = int(meta("attention.sliding_window", 0) or 0)
        pattern = meta("attention.sliding_window_pattern", 2)
        is_swa = pattern if isinstance(pattern, list) else [i % int(pattern) < int(pattern) - 1 for i in range(layers)]
        if not window or len(set(is_swa)) != 2:
            raise UnsupportedModel("gpt-oss: it needs sliding and full attention layers")
        config |= {
            "num_local_experts": meta.need("expert_count"),
            "num_experts_per_tok": meta.need("expert_used_count"),
            "intermediate_size": int(meta("expert_feed_forward_length", 0) or shapes["blk.0.ffn_gate_exps.weight"][1]),
            "sliding_window": window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in is_swa],
        }
    elif arch == "phi3":
        config["partial_rotary_factor"] = rope_dim / head_dim
        if "rope_factors_short.weight" in shapes or "rope_factors_long.weight" in shapes:
            # LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): llama.cpp uses the long factors only
            # when the context is longer than the original one, and the file's attention factor
            # (1 when absent); engine/patches.py does the same with mlx-lm's SuScaledRoPE.
            short = (
                [float(v) for v in vector("rope_factors_short.weight")]
                if "rope_factors_short.weight" in shapes
                else None
            )
            long = (
                [float(v) for v in vector("rope_factors_long.weight")] if "rope_factors_long.weight" in shapes else None
            )
            config["original_max_position_embeddings"] = int(
                meta("rope.scaling.original_context_length", 0) or config["max_position_embeddings"]
            )
            scaling = {
                "type": "longrope",
                "long_factor": long or short,
                "short_factor": short or long,
                "attn_factor": float(meta("rope.scaling.attn_factor", 1.0)),
            }
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# ---------------------------------------------------------------- loading


def load_gguf_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, mx.array], dict[str, Any]]:
    """Returns (mlx-lm config, renamed weights, raw metadata)."""
    raw, metadata = read_gguf(path)
    shapes = {name: tuple(t.shape) for name, t in raw.items()}
    config = config_from_metadata(metadata, shapes, lambda name: np.array(raw[name].astype(mx.float32)))
    arch = architecture(metadata)
    weights: dict[str, mx.array] = {}
    for name, tensor in raw.items():
        target = rename_tensor(name, arch)
        if target is not None:
            weights[target] = fix_tensor(arch, target, tensor)
    complete_weights(config, weights)
    config["quantization"] = quantization_of(weights)
    if mx.default_device().type == mx.DeviceType.gpu:
        weights = half_floats(weights)
    return config, weights, metadata


def complete_weights(config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Parameters as mlx-lm's class has them where a GGUF differs: qwen2's Q/K/V biases
    (zero if left out); phi3's Q, K and V in one projection (some files keep them apart)."""
    if config["model_type"] == "phi3":
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            parts = [f"{p}{x}_proj" for x in "qkv"]
            if f"{parts[0]}.weight" not in weights:
                continue
            for suffix in ("weight", "scales", "biases"):
                if f"{parts[0]}.{suffix}" in weights:
                    pieces = [weights.pop(f"{q}.{suffix}") for q in parts]
                    if len({x.shape[-1] for x in pieces}) != 1:
                        raise UnsupportedModel("phi3: Q, K and V quantized differently")
                    weights[f"{p}qkv_proj.{suffix}"] = mx.concatenate(pieces, axis=0)
    if config["model_type"] != "qwen2":
        return
    for i in range(config["num_hidden_layers"]):
        for proj, heads in (("q", "num_attention_heads"), ("k", "num_key_value_heads"), ("v", "num_key_value_heads")):
            name = f"model.layers.{i}.self_attn.{proj}_proj.bias"
            if name not in weights:
                weights[name] = mx.zeros((config[heads] * config["head_dim"],), mx.float32)


def half_floats(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """float32 tensors cast to the half type the model otherwise holds (its quantization scales'
    or its float16/bfloat16 weights'), so activations stay in half precision end to end. A
    model with no half tensor at all is left as it is. MoE routers stay float32, as llama.cpp
    keeps them: their logits only pick experts (mlx-lm casts the weighted sum back), and half
    precision there flips near-tied choices."""
    half = next(
        (w.dtype for name, w in weights.items() if name.endswith(".scales") and w.dtype != mx.uint8), None
    )  # uint8: MXFP4
    if half is None:
        half = next((w.dtype for w in weights.values() if w.dtype in (mx.float16, mx.bfloat16)), None)
    if half is None or half == mx.float32:
        return weights
    return {name: w.astype(half) if w.dtype == mx.float32 and not is_router(name) else w for name, w in weights.items()}


def is_router(name: str) -> bool:
    return name.endswith((".mlp.gate.weight", ".mlp.router.weight"))


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
        if scales.dtype == mx.uint8:  # E8M0 scales: MXFP4 (gpt-oss's experts)
            layers[prefix]["mode"] = "mxfp4"
    return quantization_config(layers)


def quantization_config(layers: dict[str, dict]) -> dict[str, Any] | None:
    """The most common (group, bits) is the default; only the exceptions are listed per layer
    (mlx-lm reads them at the top level; mlxserve.engine under "layers")."""
    if not layers:
        return None
    counts: dict[tuple[int, int], int] = {}
    for q in layers.values():
        if "mode" not in q:
            key = (q["group_size"], q["bits"])
            counts[key] = counts.get(key, 0) + 1
    group, bits = max(counts, key=counts.__getitem__) if counts else (32, 4)
    exceptions = {k: v for k, v in layers.items() if (v["group_size"], v["bits"]) != (group, bits) or "mode" in v}
    return {"group_size": group, "bits": bits, **exceptions, "layers": exceptions}
