"""Tokenizers for served models: from tokenizer.json or rebuilt from GGUF metadata.

Only the ``tokenizers`` package is used (no transformers at run time): it is what HF's fast
tokenizers are, so ids match the reference exactly for byte-level BPE models.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import LoadError
from .gguf import scalar

# GPT-2 / Llama-3 pre-tokenizer patterns, as llama.cpp names them in tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTROL, USER_DEFINED = 3, 4


class TokenizerInfo:
    """A tokenizer plus what generation needs around it: specials, eos ids, chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None,
        eos_tokens: list[str],
        chat_template: str | None,
        add_bos: bool,
    ):
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_tokens = [t for t in eos_tokens if t]
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.eos_token_ids = sorted(
            {i for t in self.eos_tokens if (i := tokenizer.token_to_id(t)) is not None}
        )
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.eos_tokens[0] if self.eos_tokens else None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's text: a prompt of n characters needs at least n / this tokens
        (byte-level tokens spell one character per byte, SentencePiece pieces one per character)."""
        return max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates ("\ud800" from a JSON escape) are not valid str for Rust
            ids = self.tokenizer.encode(_scrub(text), add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)


def _scrub(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (a surrogate pair is joined)."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def from_gguf_metadata(metadata: dict[str, Any]) -> TokenizerInfo:
    model_kind = scalar(metadata.get("tokenizer.ggml.model", ""))
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise LoadError("GGUF file carries no tokenizer (tokenizer.ggml.tokens is empty)")
    types = scalar(metadata.get("tokenizer.ggml.token_type"))
    types = list(types) if types is not None else [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges_raw = list(metadata.get("tokenizer.ggml.merges") or [])
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]

    if model_kind == "gpt2":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        pre = scalar(metadata.get("tokenizer.ggml.pre", "default"))
        if pre in ("llama-bpe", "llama3", "smaug-bpe"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    elif model_kind == "llama":
        # SentencePiece BPE with byte fallback, as llama.cpp stores it.
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                   unk_token=tokens[0]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        raise LoadError(f"unsupported GGUF tokenizer model '{model_kind}'")

    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens(specials)

    def token_at(key: str) -> str | None:
        i = metadata.get(key)
        if i is None:
            return None
        i = int(scalar(i))
        return tokens[i] if 0 <= i < len(tokens) else None

    eos = [token_at("tokenizer.ggml.eos_token_id"), token_at("tokenizer.ggml.eot_token_id")]
    add_bos = scalar(metadata.get("tokenizer.ggml.add_bos_token", model_kind == "llama"))
    return TokenizerInfo(
        tok,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_tokens=[t for t in eos if t],
        chat_template=scalar(metadata.get("tokenizer.chat_template")),
        add_bos=bool(add_bos),
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def from_directory(path: str | Path) -> TokenizerInfo:
    """A Hugging Face / mlx-lm model directory: tokenizer.json (+ tokenizer_config.json)."""
    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise LoadError(f"no tokenizer.json in {path.name}")
    tok = Tokenizer.from_file(str(tj))
    cfg: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    model_cfg: dict[str, Any] = {}
    if (path / "config.json").exists():
        model_cfg = json.loads((path / "config.json").read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    eos = [_token_text(cfg.get("eos_token"))]
    eos_ids = model_cfg.get("eos_token_id")
    for i in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
        if isinstance(i, int) and (t := tok.id_to_token(i)):
            eos.append(t)
    # tokenizer.json's own post-processor adds BOS where the model wants it; we add it ourselves
    # so that chat templates (which already write BOS) do not get two.
    bos = _token_text(cfg.get("bos_token"))
    add_bos = bool(cfg.get("add_bos_token", False)) and bos is not None
    tok.no_truncation()
    return TokenizerInfo(
        tok, bos_token=bos, eos_tokens=list(dict.fromkeys(t for t in eos if t)),
        chat_template=template, add_bos=add_bos,
    )


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Each step decodes only the tokens not yet emitted, together with the ones emitted last
    (decoders such as SentencePiece's drop a leading space at the start of a window, so a window
    must start on a token whose text is already out): two short decodes per token, whatever the
    length of the text. (The window used to run back to the last text ending in a space or
    newline, which byte-level BPE text seldom does: 17.7 us per token at 253 tokens, growing
    with the length of the answer.) Text ending in U+FFFD is held back until the next token
    completes the character.
    """

    def __init__(self, info: TokenizerInfo):
        self._info = info
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the tokens emitted last
        self._read = 0  # first token not yet emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def add(self, token: int) -> str:
        self._ids.append(token)
        text = self._info.decode(self._ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(self._prefix_text):
            return ""  # an incomplete character, or nothing visible yet: wait for more
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._info.decode(self._ids[self._prefix:self._read])
        return delta

    def flush(self) -> str:
        text = self._info.decode(self._ids[self._prefix:])
        delta = text[len(self._prefix_text):]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return delta
