"""Tiny random-weight GGUF models of every architecture mlxserve imports, written the way
llama.cpp lays them out (its tensor names, metadata keys and conventions), in any of the quant
types the tests compare against llama.cpp.

The weights are random but well-conditioned (projections scaled by 1/sqrt(fan-in), an output
head giving logits of standard deviation ~3), so a next-token top-5 is not a set of near-ties.
Every matrix has 256 or 512 columns, so the K-quants (256-value super-blocks) fit. The seed
fixes the bytes: tests/engine/llamacpp_reference.json records each file's sha256.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .tinymodel import CHATML, SPECIALS, build_tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "gpt-oss")
QUANT_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K")
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 256, 512, 4, 2, 64, 2
EXPERTS, EXPERTS_USED, EXPERT_FFN = 4, 2, 256
CONTEXT = 2048
_FILE_TYPES = {"F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q4_K": 14}


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A plain Q4_K encoder (llama.cpp searches scales harder; any valid blocks do here):
    (rows, cols) float32 -> (rows, cols // 256 * 144) bytes."""
    rows, cols = x.shape
    sub = x.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 sub-blocks
    lo = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - lo) / 15
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = np.maximum((-lo).max(axis=-1) / 63, 0).astype(np.float16)
    safe = lambda v: np.where(v == 0, 1, v)  # noqa: E731
    sc = np.clip(np.rint(scale / safe(d.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / safe(dmin.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    q = np.clip(
        np.rint((sub + (dmin.astype(np.float32)[:, None] * mn)[..., None]) / safe(step)[..., None]), 0, 15
    ).astype(np.uint8)
    scales = np.zeros((sub.shape[0], 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def _encode(x: np.ndarray, quant: str) -> tuple[np.ndarray, T]:
    qtype = T[quant]
    if qtype == T.F16:
        return x.astype(np.float16), qtype
    if qtype == T.Q4_K:
        flat = x.reshape(-1, x.shape[-1])
        return quantize_q4_k(flat).reshape(*x.shape[:-1], -1), qtype
    return gguf.quants.quantize(x, qtype), qtype


def _tensors(arch: str, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def mat(out: int, inp: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out, inp)) * gain / math.sqrt(inp)).astype(np.float32)

    def norm(n: int, center: float = 1.0) -> np.ndarray:  # gemma stores 1 + w, the others w
        return (center + 0.1 * rng.standard_normal(n)).astype(np.float32)

    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    # the embedding is the output head of the tied architectures too: logits of std ~3
    t = {"token_embd.weight": mat(vocab, HIDDEN, 3.0), "output_norm.weight": norm(HIDDEN)}
    if arch not in ("qwen3", "gemma2", "gemma3"):  # these three tie the output to the embedding
        t["output.weight"] = mat(vocab, HIDDEN, 3.0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(HIDDEN)
        if arch == "gpt-oss":
            t[p + "post_attention_norm.weight"] = norm(HIDDEN)  # its pre-FFN norm
        else:
            t[p + "ffn_norm.weight"] = norm(HIDDEN)
        if arch == "phi3":
            t[p + "attn_qkv.weight"] = mat(q_out + 2 * kv_out, HIDDEN)
            t[p + "ffn_up.weight"] = mat(2 * FFN, HIDDEN)
        else:
            t[p + "attn_q.weight"] = mat(q_out, HIDDEN)
            t[p + "attn_k.weight"] = mat(kv_out, HIDDEN)
            t[p + "attn_v.weight"] = mat(kv_out, HIDDEN)
        t[p + "attn_output.weight"] = mat(HIDDEN, q_out)
        if arch in ("qwen2", "gpt-oss"):
            for part, n in (("attn_q", q_out), ("attn_k", kv_out), ("attn_v", kv_out)):
                t[p + f"{part}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            t[p + "attn_q_norm.weight"] = norm(HEAD_DIM)
            t[p + "attn_k_norm.weight"] = norm(HEAD_DIM)
        if arch in ("gemma2", "gemma3"):
            # gemma scales the (tied) embedding by sqrt(hidden) into the residual; larger
            # sub-layer outputs keep the next token from being the input token, always
            t[p + "post_attention_norm.weight"] = norm(HIDDEN, 24.0)
            t[p + "post_ffw_norm.weight"] = norm(HIDDEN, 24.0)
        if arch == "gpt-oss":
            t[p + "attn_output.bias"] = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            t[p + "attn_sinks.weight"] = rng.standard_normal(HEADS).astype(np.float32)
            t[p + "ffn_gate_inp.bias"] = (0.5 * rng.standard_normal(EXPERTS)).astype(np.float32)
            for part, n in (("ffn_gate_exps", EXPERT_FFN), ("ffn_up_exps", EXPERT_FFN), ("ffn_down_exps", HIDDEN)):
                t[p + f"{part}.bias"] = (0.1 * rng.standard_normal((EXPERTS, n))).astype(np.float32)
        if arch in ("qwen3moe", "gpt-oss"):
            t[p + "ffn_gate_inp.weight"] = mat(EXPERTS, HIDDEN, 2.0)
            t[p + "ffn_gate_exps.weight"] = np.stack([mat(EXPERT_FFN, HIDDEN) for _ in range(EXPERTS)])
            t[p + "ffn_up_exps.weight"] = np.stack([mat(EXPERT_FFN, HIDDEN) for _ in range(EXPERTS)])
            t[p + "ffn_down_exps.weight"] = np.stack([mat(HIDDEN, EXPERT_FFN) for _ in range(EXPERTS)])
            continue
        if arch != "phi3":
            t[p + "ffn_gate.weight"] = mat(FFN, HIDDEN)
            t[p + "ffn_up.weight"] = mat(FFN, HIDDEN)
        t[p + "ffn_down.weight"] = mat(HIDDEN, FFN)
    return t


def _llama3_rope_freqs(base: float, dims: int, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """llama.cpp's converter for Llama 3.1 rope scaling (LlamaModel.generate_extra_tensors)."""
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write(
    path: Path,
    arch: str,
    quant: str = "Q8_0",
    seed: int = 0,
    drop: tuple[str, ...] = (),
    vocab_from: Path | None = None,
    chat_template: str | None = None,
) -> Path:
    """A tiny ``arch`` model with every matrix in ``quant`` (1-D tensors and the MoE router stay
    float32, as llama.cpp's quantizer leaves them); ``drop``: tensor names to leave out;
    ``vocab_from``: a GGUF whose tokenizer (every ``tokenizer.*`` key) replaces the tiny one, e.g.
    a real vocabulary; ``chat_template``: the template to write instead of ChatML."""
    if arch not in ARCHITECTURES or quant not in QUANT_TYPES:
        raise ValueError(f"no test model {arch}/{quant}")
    rng = np.random.default_rng(seed)
    tok = build_tokenizer()
    vocab_fields = _tokenizer_fields(vocab_from) if vocab_from is not None else None
    vocab = len(vocab_fields["tokenizer.ggml.tokens"][0]) if vocab_fields else tok.get_vocab_size()
    tensors = _tensors(arch, vocab, rng)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")  # llama.cpp gives names with "phi3" in them a vocabulary rule
    w.add_file_type(_FILE_TYPES[quant])
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    base = 10000.0
    rope_dim = HEAD_DIM
    if arch == "llama":
        # Llama 3.1-style scaling with a short original context, so it changes short prompts
        tensors["rope_freqs.weight"] = _llama3_rope_freqs(base, HEAD_DIM, 8.0, 1.0, 4.0, 64)
    elif arch == "qwen3":
        base = 1000000.0
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(512)
    elif arch == "gemma2":
        # caps small enough to bend these scores and logits (gemma 2 ships 50 and 30)
        w.add_attn_logit_softcapping(1.5)
        w.add_final_logit_softcapping(8.0)
        w.add_sliding_window(8)  # shorter than the prompts: the local layers' window is checked
    elif arch == "gemma3":
        base = 1000000.0
        w.add_sliding_window(8)  # shorter than the prompts: the window is checked too
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)
        w.add_float32(f"{arch}.rope.freq_base_swa", 10000.0)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
    elif arch == "gpt-oss":
        base = 150000.0
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(EXPERTS_USED)
        w.add_expert_feed_forward_length(EXPERT_FFN)
        w.add_sliding_window(8)  # shorter than the prompts; layer 0 slides, layer 1 is full
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(32.0)
        w.add_rope_scaling_orig_ctx_len(64)
    elif arch == "qwen3moe":
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(EXPERTS_USED)
        w.add_expert_feed_forward_length(EXPERT_FFN)
    elif arch == "phi3":
        rope_dim = 48  # phi-4-mini's partial rotary (0.75)
        orig = 256  # llama.cpp's smallest context: 256 runs the short factors, 512 the long ones
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(CONTEXT / orig) / math.log(orig)) if CONTEXT > orig else 1.0
        )
        factors = np.linspace(1.0, 4.0, rope_dim // 2).astype(np.float32)
        tensors["rope_factors_short.weight"] = factors
        tensors["rope_factors_long.weight"] = factors * 2
    w.add_rope_freq_base(base)
    w.add_rope_dimension_count(rope_dim)
    if vocab_fields is None:
        _add_tokenizer(w, tok)
    else:
        for key, (value, vtype, sub_type) in vocab_fields.items():
            w.add_key_value(key, value, vtype, sub_type)
    w.add_chat_template(chat_template or CHATML)
    for name, x in tensors.items():
        if name in drop:
            continue
        if x.ndim <= 2 and name.endswith(".bias") or x.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            w.add_tensor(name, x)
        elif arch == "gpt-oss" and "_exps." in name:  # gpt-oss ships its experts in MXFP4
            w.add_tensor(name, gguf.quants.quantize(x, T.MXFP4), raw_dtype=T.MXFP4)
        elif quant == "BF16":
            w.add_tensor(name, gguf.quants.quantize(x, T.BF16), raw_dtype=T.BF16)
        else:
            data, qtype = _encode(x, quant)
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w: gguf.GGUFWriter, tok) -> None:
    import json

    tj = json.loads(tok.to_str())
    id_to_tok = {i: t for t, i in tj["model"]["vocab"].items()}
    for added in tj.get("added_tokens", []):
        id_to_tok[added["id"]] = added["content"]
    tokens = [id_to_tok[i] for i in range(tok.get_vocab_size())]
    # The single bytes 0x80-0xff are control tokens here: llama-server holds back the
    # logprobs of a token that ends in an incomplete UTF-8 character, and prints none of these.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    byte_of = {chr(b): b for b in printable}
    byte_of |= {chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS or byte_of.get(t, 0) >= 0x80 else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)


def _tokenizer_fields(path: Path) -> dict:
    """A GGUF's tokenizer keys as (value, type, array element type), to write again (read with
    store/ggufmeta: gguf's own reader takes minutes over a 200k-token vocabulary)."""
    from ..store.ggufmeta import read_header

    V = gguf.GGUFValueType
    types = {
        "tokenizer.ggml.tokens": (V.ARRAY, V.STRING),
        "tokenizer.ggml.merges": (V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (V.ARRAY, V.INT32),
        "tokenizer.ggml.scores": (V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.model": (V.STRING, None),
        "tokenizer.ggml.pre": (V.STRING, None),
    }
    out = {}
    for name, value in read_header(path).metadata.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        vtype, sub = types.get(name, (V.BOOL, None) if isinstance(value, bool) else (V.UINT32, None))
        out[name] = (list(value) if sub else value, vtype, sub)
    return out
