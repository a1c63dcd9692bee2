"""An MLX BERT encoder for sentence-transformers models such as all-MiniLM-L6-v2.

Loads a Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json) and reads
the sentence-transformers settings that decide what a sentence's vector is: the pooling modes
from ``1_Pooling/config.json`` (the directory ``modules.json`` names), whether a ``Normalize``
module follows, and ``max_seq_length`` from ``sentence_bert_config.json``. Without
``modules.json`` a plain BERT gets mean pooling and L2 normalisation (what Ollama returns).

Like every model, it must be loaded and run on one thread (MLX streams are per thread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from ..errors import LoadError
from .embedinputs import (
    EmbedInput,
    KeepGoing,
    Tokenized,
    batch_groups,
    normalize_rows,
    padded,
    reduce_dimensions,
    tokenize_all,
)

# Padded batch size bound (rows x longest row): keeps attention scores (heads x L x L per row)
# and activations modest while still batching many short inputs into one pass.
MAX_BATCH_TOKENS = 8192
_NEG = -1e9  # additive mask value: large enough that exp() underflows to 0, finite to avoid NaN


@attrs.frozen
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        names = {a.name for a in attrs.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:
            raise LoadError(f"config.json is not a BERT config: {exc}") from None


_ACTIVATIONS = {
    "gelu": nn.gelu,  # exact (erf) GELU, as transformers' "gelu"
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])
        # Single-segment input: every token has type 0.
        h = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)
        self.num_heads = c.num_attention_heads

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, l, d = x.shape
        heads = self.num_heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, l, heads, d // heads).transpose(0, 2, 1, 3)

        q, k, v = split(self.self.query(x)), split(self.self.key(x)), split(self.self.value(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d // heads), mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(b, l, d)
        return self.output.LayerNorm(self.output.dense(o) + x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)
        try:
            self._act = _ACTIVATIONS[c.hidden_act]
        except KeyError:
            raise LoadError(f"unsupported BERT activation '{c.hidden_act}'") from None

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.output.LayerNorm(self.output.dense(self._act(self.intermediate.dense(h))) + h)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = [BertLayer(c) for _ in range(c.num_hidden_layers)]


class BertModel(nn.Module):
    """BERT without the pooler head (sentence-transformers pools the token states itself)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)

    def __call__(self, ids: mx.array, attention_mask: mx.array) -> mx.array:
        """Token states (B, L, H); ``attention_mask`` is (B, L) with 1 for real tokens."""
        h = self.embeddings(ids)
        # (B, 1, 1, L): padded keys get a large negative score for every query and head.
        mask = ((1 - attention_mask.astype(h.dtype)) * _NEG)[:, None, None, :]
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF checkpoint names -> this module's: drop the pooler and buffers, strip a ``bert.``
    prefix, and rename the old ``gamma``/``beta`` LayerNorm names."""
    out = {}
    for k, v in weights.items():
        if k.startswith("bert."):
            k = k[len("bert.") :]
        if k.startswith(("pooler.", "cls.")) or k.endswith("position_ids"):
            continue
        if ".LayerNorm." in k:
            k = k.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[k] = v
    return out


# ---- sentence-transformers settings ----
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")  # their concatenation order


@attrs.frozen
class SentenceConfig:
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int = 512


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read {path.parent.name}/{path.name}: {exc}") from None


def read_sentence_config(root: Path, max_positions: int) -> SentenceConfig:
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig(max_seq_length=max_positions)
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise LoadError("modules.json is not a list of modules")
    pooling: tuple[str, ...] | None = None
    normalize = False
    for m in modules:
        kind = str(m.get("type", "")) if isinstance(m, dict) else ""
        if kind.endswith(".Pooling"):
            cfg_path = root / str(m.get("path", "")) / "config.json"
            pooling = _pooling_modes(_read_json(cfg_path)) if cfg_path.is_file() else ("mean",)
        elif kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith((".Transformer", "models.Transformer")) or kind == "":
            continue
        else:
            # Dense projections and the like change the vector; refuse rather than be wrong.
            raise LoadError(f"unsupported sentence-transformers module '{kind}'")
    max_len = max_positions
    sb = root / "sentence_bert_config.json"
    if sb.is_file():
        v = _read_json(sb).get("max_seq_length")
        if isinstance(v, int) and v > 0:
            max_len = min(v, max_positions)
    return SentenceConfig(pooling or ("mean",), normalize, max_len)


def _pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers: one named mode
        named = {"mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean": "weightedmean"}
        chosen = {named.get(cfg["pooling_mode"], cfg["pooling_mode"])}
    else:
        chosen = {
            m
            for m in (*POOLING_MODES, "weightedmean")
            if cfg.get(f"pooling_mode_{m}_tokens") or cfg.get(f"pooling_mode_{m}")
        }
    unknown = chosen - set(POOLING_MODES)
    if unknown:
        raise LoadError(f"unsupported pooling mode(s): {', '.join(sorted(unknown))}")
    if not chosen:
        raise LoadError("1_Pooling/config.json selects no pooling mode")
    return tuple(m for m in POOLING_MODES if m in chosen)


def pool(h: mx.array, mask: mx.array, modes: Sequence[str]) -> mx.array:
    """Sentence vectors (B, n*H) from token states (B, L, H) and a (B, L) 0/1 mask."""
    h = h.astype(mx.float32)
    m = mask.astype(mx.float32)[:, :, None]
    counts = mx.maximum(m.sum(axis=1), 1e-9)  # sentence-transformers clamps at 1e-9 too
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "max":
            parts.append(mx.where(m > 0, h, -1e9).max(axis=1))
        elif mode == "mean":
            parts.append((h * m).sum(axis=1) / counts)
        elif mode == "mean_sqrt_len":
            parts.append((h * m).sum(axis=1) / mx.sqrt(counts))
        elif mode == "lasttoken":
            last = (mask.astype(mx.int32).sum(axis=1) - 1).astype(mx.int32)
            parts.append(mx.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class BertEmbedder:
    """A loaded sentence encoder: texts (or token-id lists) in, one vector per input out."""

    kind = "bert"

    def __init__(self, model: BertModel, tokenizer: Tokenizer, sentence: SentenceConfig, *, weight_bytes: int):
        self.model = model
        self.tokenizer = tokenizer
        self.sentence = sentence
        self.weight_bytes = weight_bytes
        self.dimension = model.config.hidden_size * len(sentence.pooling)
        self._prefix, self._suffix = _special_frame(tokenizer)

    @property
    def context_length(self) -> int:
        return self.sentence.max_seq_length

    @classmethod
    def load(cls, path: str | Path) -> BertEmbedder:
        root = Path(path)
        config = _read_json(root / "config.json")
        if not isinstance(config, dict) or config.get("model_type") != "bert":
            raise LoadError(
                f"not a BERT model (model_type '{config.get('model_type')}'); only BERT "
                "encoders are supported for embeddings"
            )
        c = BertConfig.from_dict(config)
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise LoadError(f"no *.safetensors weights in {root.name}")
        weights: dict[str, mx.array] = {}
        for f in files:
            weights.update(mx.load(str(f)))
        weights = sanitize(weights)
        model = BertModel(c)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as exc:
            raise LoadError(f"weights do not match the BERT model: {exc}") from exc
        mx.eval(model.parameters())
        model.eval()
        try:
            tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as exc:
            raise LoadError(f"cannot read tokenizer.json: {exc}") from exc
        # tokenizer.json may carry its own padding/truncation (MiniLM's: 128); lengths are ours.
        tok.no_padding()
        tok.no_truncation()
        sentence = read_sentence_config(root, c.max_position_embeddings)
        return cls(model, tok, sentence, weight_bytes=sum(w.nbytes for w in weights.values()))

    # -- tokenization --
    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize(
        self, inputs: Sequence[EmbedInput], *, truncate: bool = True, limit: int | None = None
    ) -> list[Tokenized]:
        """Ids with [CLS]/[SEP] framing, cut to ``max_seq_length`` (or ``limit`` if smaller);
        an over-long input raises BadRequest when ``truncate`` is false."""
        max_len = min(limit, self.context_length) if limit else self.context_length
        return tokenize_all(
            inputs,
            self._encode_text,
            self._prefix,
            self._suffix,
            max_len,
            truncate=truncate,
            vocab_size=self.model.config.vocab_size,
        )

    # -- inference --
    def embed_ids(
        self,
        seqs: Sequence[Sequence[int]],
        *,
        dimensions: int | None = None,
        chunk: int | None = None,
        keep_going: KeepGoing | None = None,
    ) -> np.ndarray:
        """(N, D) float32 vectors, in input order; batched by padded length. Attention sees the
        whole input, so no input is split: ``chunk`` is unused, and ``keep_going`` is asked
        before each group (at most MAX_BATCH_TOKENS padded tokens); a dropped group stays zero."""
        out = np.zeros((len(seqs), self.dimension), dtype=np.float32)
        for idx in batch_groups([len(s) for s in seqs], MAX_BATCH_TOKENS):
            if keep_going is not None and not keep_going(idx):
                continue
            ids, mask = padded(seqs, idx)
            vecs = pool(self.model(ids, mask), mask, self.sentence.pooling)
            if self.sentence.normalize:
                vecs = normalize_rows(vecs)
            mx.eval(vecs)
            out[idx] = np.array(vecs, dtype=np.float32)
        return reduce_dimensions(out, dimensions)

    def embed(
        self, inputs: Sequence[EmbedInput], *, truncate: bool = True, dimensions: int | None = None
    ) -> np.ndarray:
        return self.embed_ids([t.ids for t in self.tokenize(inputs, truncate=truncate)], dimensions=dimensions)


def _special_frame(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single sequence ([CLS] / [SEP])."""
    bare = tok.encode("a", add_special_tokens=False).ids
    framed = tok.encode("a", add_special_tokens=True).ids
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare) :]
    return [], []
