"""Tokenizers for served models: from tokenizer.json or rebuilt from GGUF metadata.

Only the ``tokenizers`` package is used (no transformers at run time). A GGUF's tokenizer is
rebuilt as llama.cpp builds it from the same metadata (its split rules per pre-tokenizer, its
SentencePiece merging by score, its special-token rules), entirely inside a ``tokenizers`` object
so that a converted model's tokenizer.json keeps it; tests/engine/test_tokenizer_llamacpp.py
checks the ids against llama.cpp's own.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import LoadError
from .gguf import scalar

# llama.cpp's pre-tokenizer split rules (src/llama-vocab.cpp, llm_tokenizer_bpe), applied one
# after the other as it does; its regex engine treats every non-ASCII letter as both cases, which
# is what the "(?=[\p{L}])[^a-z]" forms below spell out for Oniguruma.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_SPLITS: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "deepseek-llm": [
        r"[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
        "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
        "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
        "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
        "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
        "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    ],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "deepseek-v3": [
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "bloom": [_BLOOM],
    "viking": [_BLOOM, r"\p{N}"],
    "tekken": [
        r"[^\r\n\p{L}\p{N}]?"
        + _UPPER
        + "*"
        + _LOWER
        + r"+|[^\r\n\p{L}\p{N}]?"
        + _UPPER
        + "+"
        + _LOWER
        + r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "gpt-4o": [
        r"[^\r\n\p{L}\p{N}]?"
        + _UPPER
        + "*"
        + _LOWER
        + "+"
        + _CONTRACTIONS
        + r"?|[^\r\n\p{L}\p{N}]?"
        + _UPPER
        + "+"
        + _LOWER
        + "*"
        + _CONTRACTIONS
        + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "seed-coder": [
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ],
    "ufakzeka": [_QWEN2[len(_CONTRACTIONS) + 1 :]],
    "minicpm5": [r"\p{N}{1,3}", _QWEN2.replace(r"|\p{N}|", r"|\p{N}+|")],
}
# tokenizer.ggml.pre -> (split rule, ignore_merges: a word that is a whole token is that token)
_PRE: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(("default", ""), ("default", False)),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        ("llama3", True),
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), ("llama3", False)),
    **dict.fromkeys(("glm4", "glm5"), ("llama3", True)),
    "deepseek-llm": ("deepseek-llm", False),
    "deepseek-coder": ("deepseek-coder", False),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), ("deepseek-v3", False)),
    "falcon": ("falcon", False),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
        ("starcoder", False),
    ),
    **dict.fromkeys(
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ),
        ("gpt2", False),
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open", "megrez", "grok-2"),
        ("qwen2", False),
    ),
    "qwen35": ("qwen35", False),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), ("bloom", False)),
    "viking": ("viking", False),
    "tekken": ("tekken", True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), ("gpt-4o", False)),
    "seed-coder": ("seed-coder", False),
    "ufakzeka": ("ufakzeka", False),
    "minicpm5": ("minicpm5", True),
}
# BPE pre-tokenizers whose add_bos defaults to true in llama.cpp (the GGUF's own key wins).
_ADD_BOS_PRE = {
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "tekken",
}
# llama.cpp (llama_vocab::impl::load) makes these texts control tokens whatever their GGUF type:
# end-of-generation markers always, the EOT/EOM/FIM ones when the GGUF names no such token.
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
)
_NAMED_TEXTS = {
    "eot": (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ),
    "eom": ("<|eom_id|>",),
    "fim_pre": (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    "fim_suf": (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    "fim_mid": (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# gpt-oss's harmony markers, which llama.cpp always renders (user-defined).
_HARMONY_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # tokenizer.ggml.token_type values
SPACE = "\u2581"  # SentencePiece's escaped space


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
        self.eos_token_ids = sorted({i for t in self.eos_tokens if (i := tokenizer.token_to_id(t)) is not None})
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # tokenizers sends added tokens through the byte-level decoder too, which garbles the ones
        # whose text is not byte-level (deepseek-coder's "ö"); llama.cpp prints them as they are.
        self._verbatim: dict[int, str] = {}
        if isinstance(tokenizer.decoder, decoders.ByteLevel):
            self._verbatim = {
                i: t.content
                for i, t in tokenizer.get_added_tokens_decoder().items()
                if not t.special and any(not "!" <= c <= "~" for c in t.content)
            }

    @property
    def eos_token(self) -> str | None:
        return self.eos_tokens[0] if self.eos_tokens else None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's text: a prompt of n characters needs at least n / this tokens
        (byte-level tokens spell one character per byte, SentencePiece pieces one per character)."""
        return max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def _literal_specials(self) -> Tokenizer:
        """The same tokenizer reading control tokens' text as plain text (user-defined tokens
        are still recognised), as llama.cpp's tokenizer without parse_special."""
        src = self.tokenizer
        tok = Tokenizer(src.model)  # shares the model: no second copy of the vocabulary
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            if (value := getattr(src, part)) is not None:
                setattr(tok, part, value)
        added = src.get_added_tokens_decoder().values()
        tok.add_special_tokens([t for t in added if t.special])
        tok.add_tokens([t for t in added if not t.special])
        tok.encode_special_tokens = True
        return tok

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        tok = self.tokenizer if parse_special else self._literal_specials
        try:
            ids = tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates ("\ud800" from a JSON escape) are not valid str for Rust
            ids = tok.encode(_scrub(text), add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        ids = list(ids)
        if not self._verbatim or self._verbatim.keys().isdisjoint(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special)
        parts: list[str] = []
        start = 0
        for k, i in enumerate(ids + [-1]):
            if i == -1 or i in self._verbatim:
                parts.append(self.tokenizer.decode(ids[start:k], skip_special_tokens=skip_special))
                parts.append(self._verbatim.get(i, ""))
                start = k + 1
        return "".join(parts)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)


def _scrub(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (a surrogate pair is joined)."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def from_gguf_metadata(metadata: dict[str, Any]) -> TokenizerInfo:
    """The tokenizer llama.cpp builds from the same metadata, as a ``tokenizers`` object."""
    model_kind = scalar(metadata.get("tokenizer.ggml.model", ""))
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise LoadError("GGUF file carries no tokenizer (tokenizer.ggml.tokens is empty)")
    types = scalar(metadata.get("tokenizer.ggml.token_type"))
    types = list(types) if types is not None else [NORMAL] * len(tokens)
    pre = scalar(metadata.get("tokenizer.ggml.pre", "default")) or "default"
    if model_kind == "gemma4":
        pre = "gemma4"

    def flag(key: str, default: bool) -> bool:
        value = metadata.get(key)
        return default if value is None else bool(scalar(value))

    if model_kind == "llama":
        add_space_prefix = flag("tokenizer.ggml.add_space_prefix", True)
        tok = _spm(tokens, types, metadata, add_space_prefix)
        add_bos = flag("tokenizer.ggml.add_bos_token", True)
    elif model_kind in ("gpt2", "gemma4"):
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
        if pre == "gemma4" or pre == "granite-embed-multi-311m":
            add_space_prefix = flag("tokenizer.ggml.add_space_prefix", False)
            tok = _spm_bpe(tokens, merges, add_space_prefix)
            add_bos = True  # llama.cpp forces it for Gemma 4
        else:
            add_space_prefix = False
            tok = _byte_level_bpe(tokens, merges, pre)
            add_bos = flag("tokenizer.ggml.add_bos_token", pre in _ADD_BOS_PRE)
    else:
        raise LoadError(f"unsupported GGUF tokenizer model '{model_kind}'")

    kinds, eog = _token_kinds(tokens, types, metadata)
    _add_special_tokens(tok, tokens, kinds, metadata)

    def token_at(key: str) -> str | None:
        i = metadata.get(key)
        if i is None:
            return None
        i = int(scalar(i))
        return tokens[i] if 0 <= i < len(tokens) else None

    eos = [token_at("tokenizer.ggml.eos_token_id"), token_at("tokenizer.ggml.eot_token_id")]
    eos += sorted(tokens[i] for i in eog)  # llama.cpp stops at every end-of-generation token
    return TokenizerInfo(
        tok,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_tokens=list(dict.fromkeys(t for t in eos if t)),
        chat_template=scalar(metadata.get("tokenizer.chat_template")),
        add_bos=add_bos,
    )


def _vocab(tokens: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(tokens)}  # a repeated text maps to its last id, as in llama.cpp


def _known_merges(merges: list[tuple[str, ...]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    # tokenizers refuses merges whose parts or result are not tokens; llama.cpp would fall back to
    # bytes for such a result, which a vocabulary built from the same merges never needs.
    return [(a, b) for a, b in (m for m in merges if len(m) == 2) if a in vocab and b in vocab and a + b in vocab]


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, ...]], pre: str) -> Tokenizer:
    """GPT-2 style byte-level BPE: llama.cpp's split rules for ``pre``, then byte-level merges."""
    if pre not in _PRE:
        raise LoadError(f"unsupported GGUF pre-tokenizer '{pre}'")
    rule, ignore_merges = _PRE[pre]
    vocab = _vocab(tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_known_merges(merges, vocab), ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[rule]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _escaped_spaces(add_space_prefix: bool) -> normalizers.Normalizer:
    # llama.cpp escapes spaces in each stretch of text between special tokens, and puts one in
    # front of each such stretch when the vocabulary asks for a space prefix.
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    return normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])


def _spm_decoder(add_space_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))


def _spm(tokens: list[str], types: list[int], metadata: dict[str, Any], add_space_prefix: bool) -> Tokenizer:
    """SentencePiece vocabularies (tokenizer.ggml.model "llama"): scores, no merges. llama.cpp
    merges, over the whole text, the adjacent pair whose joined text is the best-scoring token
    (leftmost first); as BPE merges that is every split of every token into two tokens, ranked
    by the joined token's score. Characters that end up in no token become byte tokens."""
    scores = scalar(metadata.get("tokenizer.ggml.scores"))
    scores = list(scores) if scores is not None else [0.0] * len(tokens)
    vocab = _vocab(tokens)
    ranked = sorted(
        (-scores[i], i, k)
        for text, i in vocab.items()
        for k in range(1, len(text))
        if text[:k] in vocab and text[k:] in vocab
    )
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_id = int(scalar(unk)) if unk is not None else 0
    merges = [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            byte_fallback=True,
            unk_token=tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
        )
    )
    tok.normalizer = _escaped_spaces(add_space_prefix)
    tok.decoder = _spm_decoder(add_space_prefix)
    return tok


def _spm_bpe(tokens: list[str], merges: list[tuple[str, ...]], add_space_prefix: bool) -> Tokenizer:
    """Gemma 4: BPE merges over raw UTF-8 with escaped spaces, split only at runs of newlines; a
    run of newlines that is a token is that token (added below), bytes as <0xXX> tokens."""
    vocab = _vocab(tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_known_merges(merges, vocab), byte_fallback=True))
    tok.normalizer = _escaped_spaces(add_space_prefix)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = _spm_decoder(add_space_prefix)
    tok.add_tokens([AddedToken(t, normalized=False) for t in tokens if t and not t.strip("\n")])
    return tok


def _token_kinds(tokens: list[str], types: list[int], metadata: dict[str, Any]) -> tuple[list[int], set[int]]:
    """Each token's type after llama.cpp's overrides by text, and its end-of-generation ids."""
    kinds = list(types)
    ids = _vocab(tokens)

    def given(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(scalar(value))

    named = {}
    for key, texts in _NAMED_TEXTS.items():
        named[key] = given(key)
        if named[key] is None:
            for text in texts:
                if text in ids:
                    kinds[ids[text]] = CONTROL
                    named[key] = ids[text] if named[key] is None else named[key]
    eog = {named[k] for k in ("fim_pad", "fim_rep", "fim_sep") if named[k] is not None}
    for text in _EOG_TEXTS:
        if text in ids:
            kinds[ids[text]] = CONTROL
            eog.add(ids[text])
    for text in _HARMONY_TEXTS:
        if text in ids:
            kinds[ids[text]] = USER_DEFINED
    eog |= {i for i in (given("eos"), named["eot"], named["eom"]) if i is not None and 0 <= i < len(tokens)}
    eog_texts = {tokens[i] for i in eog}
    if "<|end|>" in eog_texts and ({"<|return|>", "<|call|>"} <= eog_texts or {"<|calls|>", "<|flush|>"} <= eog_texts):
        eog.discard(ids["<|end|>"])  # harmony: <|end|> ends a message, not the answer
        kinds[ids["<|end|>"]] = USER_DEFINED
    if "</s>" in eog_texts and eog_texts & {"<|tool_response>", "<|plamo:eos|>"}:
        eog.discard(ids["</s>"])
        kinds[ids["</s>"]] = NORMAL
    return kinds, eog


def _add_special_tokens(tok: Tokenizer, tokens: list[str], kinds: list[int], metadata: dict[str, Any]) -> None:
    """Control and unknown tokens are recognised in text only with parse_special (the default
    here), user-defined ones always. Phi-3's special tokens swallow the whitespace after them,
    as in llama.cpp."""
    name = str(scalar(metadata.get("general.name", "")) or "").lower()
    phi3 = "phi-3" in name or "phi3" in name
    control, user = [], []
    for text, kind in zip(tokens, kinds):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            strip = phi3 and text not in ("<unk>", "<s>", "<|endoftext|>")
            added = AddedToken(text, special=kind != USER_DEFINED, normalized=False, rstrip=strip)
            (user if kind == USER_DEFINED else control).append(added)
    tok.add_special_tokens(control)
    tok.add_tokens(user)


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
        tok,
        bos_token=bos,
        eos_tokens=list(dict.fromkeys(t for t in eos if t)),
        chat_template=template,
        add_bos=add_bos,
    )


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Each step decodes only the tokens not yet emitted, together with the ones emitted last
    (decoders such as SentencePiece's drop a leading space at the start of a window, so a window
    must start on a token whose text is already out): two short decodes per token, whatever the
    length of the text. Text ending in U+FFFD is held back until the next token completes the
    character.
    """

    def __init__(self, info: TokenizerInfo):
        self._info = info
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the tokens emitted last
        self._read = 0  # first token not yet emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def add(self, token: int) -> str:
        self._ids.append(token)
        text = self._info.decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(self._prefix_text):
            return ""  # an incomplete character, or nothing visible yet: wait for more
        delta = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._info.decode(self._ids[self._prefix : self._read])
        return delta

    def flush(self) -> str:
        text = self._info.decode(self._ids[self._prefix :])
        delta = text[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return delta
