"""A tiny random-weight llama with a small byte-level BPE tokenizer, written as an mlx-lm
directory and as a GGUF (F32, Q/K permuted as llama.cpp stores them).

Used by the test suite and by ``mlxctl chaos`` (which must not depend on the test tree). Random
weights rarely emit EOS, so ``num_predict`` sets each answer's length. Written with numpy,
safetensors and gguf, not MLX: only engine/ imports MLX.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! How are you today? I am fine, thank you.",
    "Once upon a time there was a small model that answered questions.",
    'JSON: {"name": "value", "count": 3, "items": [1, 2, 3]}',
    "def add(a, b):\n    return a + b\n",
] * 20

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = CONFIG
    h, inter = c["hidden_size"], c["intermediate_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd

    def w(*shape):
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    out = {
        "model.embed_tokens.weight": w(vocab, h),
        "model.norm.weight": np.ones(h, np.float32),
        "lm_head.weight": w(vocab, h),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": w(h, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(inter, h),
            p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    return out


def write_mlx_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": CHATML,
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "add_bos_token": False,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    (path / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": vocab}))
    save_file(_weights(vocab), str(path / "model.safetensors"))
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert script: interleave the two rotary halves of every head.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(path: Path) -> Path:
    """The same model as ``write_mlx_dir`` (same seed), as llama.cpp would store it."""
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    c = CONFIG
    tensors = {}
    for name, arr in _weights(vocab).items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            mod = ".".join(rest[:-1])
            if mod == "self_attn.q_proj":
                arr = _permute(arr, c["num_attention_heads"])
            elif mod == "self_attn.k_proj":
                arr = _permute(arr, c["num_key_value_heads"])
            gname = f"blk.{i}.{_GGUF_NAMES[mod]}.weight"
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        tensors[gname] = arr
    tj = json.loads(tok.to_str())
    id_to_tok = {i: t for t, i in tj["model"]["vocab"].items()}
    for added in tj.get("added_tokens", []):
        id_to_tok[added["id"]] = added["content"]
    tokens = [id_to_tok[i] for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_uint32("llama.embedding_length", c["hidden_size"])
    w.add_uint32("llama.block_count", c["num_hidden_layers"])
    w.add_uint32("llama.feed_forward_length", c["intermediate_size"])
    w.add_uint32("llama.attention.head_count", c["num_attention_heads"])
    w.add_uint32("llama.attention.head_count_kv", c["num_key_value_heads"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    w.add_uint32("llama.context_length", c["max_position_embeddings"])
    w.add_float32("llama.rope.freq_base", c["rope_theta"])
    w.add_uint32("llama.vocab_size", vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    w.add_uint32("tokenizer.ggml.bos_token_id", tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
