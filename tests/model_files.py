"""Model files written during the run: a tiny llama safetensors directory, a tiny K-quant GGUF,
and files the engine cannot run (for tests that check create refuses them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_vocab() -> list[str]:
    return SPECIALS + [c for _, c in sorted(_bytes_to_unicode().items())]


TINY_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_llama_dir(path: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random llama in mlx-lm layout: config.json, model.safetensors, tokenizer files."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    vocab = byte_vocab()
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "chat_template": TINY_CHATML,
            }
        )
    )
    (path / "README.md").write_text("not a model file\n")
    return path


def _random_blocks(rng: np.random.Generator, qtype, rows: int, cols: int) -> np.ndarray:
    """Random quantized rows whose f16 scale fields hold small finite values (random bytes would
    make NaN/inf scales)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[qtype]
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)

    def f16(lo: float, hi: float) -> np.ndarray:
        v = rng.uniform(lo, hi, size=(rows, nb)).astype(np.float16)
        return v.view(np.uint8).reshape(rows, nb, 2)

    if qtype in (T.Q4_K, T.Q5_K, T.Q2_K):
        off = 0 if qtype != T.Q2_K else size - 4
        raw[:, :, off : off + 2] = f16(0.001, 0.01)  # d
        raw[:, :, off + 2 : off + 4] = f16(0.0, 0.005)  # dmin
    elif qtype == T.Q6_K:
        raw[:, :, size - 2 :] = f16(0.0005, 0.003)
    elif qtype == T.Q3_K:
        raw[:, :, size - 2 :] = f16(0.001, 0.01)
    elif qtype in (T.Q8_0, T.Q4_0, T.Q5_0):
        raw[:, :, 0:2] = f16(0.001, 0.01)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, nb * size)


def write_kquant_gguf(path: Path, *, seed: int = 0) -> dict[str, object]:
    """A one-layer llama GGUF (hidden 256: K-quant blocks are 256 wide) mixing Q4_K, Q5_K,
    Q6_K and Q8_0, with a byte-level BPE tokenizer and a chat template in its metadata.
    Returns {tensor name: GGMLQuantizationType}."""
    import gguf
    from gguf.constants import GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    vocab = byte_vocab()
    V, H, F = len(vocab), 256, 512
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny kquant")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(TINY_CHATML)
    types = {
        "token_embd.weight": (T.Q4_K, V, H),
        "blk.0.attn_q.weight": (T.Q4_K, H, H),
        "blk.0.attn_k.weight": (T.Q4_K, 128, H),
        "blk.0.attn_v.weight": (T.Q6_K, 128, H),
        "blk.0.attn_output.weight": (T.Q5_K, H, H),
        "blk.0.ffn_gate.weight": (T.Q4_K, F, H),
        "blk.0.ffn_up.weight": (T.Q8_0, F, H),
        "blk.0.ffn_down.weight": (T.Q6_K, H, F),
        "output.weight": (T.Q6_K, V, H),
    }
    for name, (qtype, rows, cols) in types.items():
        w.add_tensor(name, _random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, rng.uniform(0.5, 1.5, size=H).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {name: qtype for name, (qtype, _, _) in types.items()}


def write_unsupported_gguf(path: Path) -> Path:
    """A structurally valid GGUF of an architecture the engine has no loader for (falcon)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
