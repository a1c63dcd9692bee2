"""Constrained decoding with llguidance: a per-sequence logits processor that masks every token
the grammar (a JSON schema, "any JSON object", a tool call) cannot accept next.

The mask is computed on the CPU by llguidance and applied with ``mx.where``; the Metal kernel in
``llguidance.mlx`` is Apple-only, and one where per step costs little next to a forward pass.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from ..errors import BadRequest

ANY_JSON_OBJECT = {"type": "object"}


def grammar_for_schema(schema: Any) -> str:
    """A grammar from a JSON schema (dict or JSON text); raises BadRequest when it is unusable."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise BadRequest(f"format is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise BadRequest("a JSON schema must be an object")
    try:
        grammar = LLMatcher.grammar_from_json_schema(close_objects(schema),
                                                     defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"invalid JSON schema: {exc}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise BadRequest(f"unsupported JSON schema: {error}")
    return grammar


def close_objects(schema: Any) -> Any:
    """Objects that list their properties take no others unless the schema says so.

    A schema that is silent on additionalProperties allows any extra key, and a small model will
    happily invent keys until it runs out of tokens. Every answer under the closed schema is still
    valid under the original one (as OpenAI's strict mode, and most constrained decoders, do).
    """
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


class TokenizerCache:
    """llguidance's view of a tokenizer costs ~1 s to build for a 50k vocabulary: once per model."""

    def __init__(self) -> None:
        self._tok: LLTokenizer | None = None

    def get(self, tokenizer_info, n_vocab: int) -> LLTokenizer:
        if self._tok is None:
            self._tok = LLTokenizer(
                tokenizer_info.tokenizer.to_str(), n_vocab=n_vocab,
                eos_token=tokenizer_info.eos_token_ids or None,
            )
        return self._tok


class GrammarProcessor:
    """A logits processor for mlx-lm's BatchGenerator, owning one sequence's LLMatcher.

    BatchGenerator calls it once per step with the sequence's tokens so far (prompt included on
    the first call); tokens that arrived since the last call are fed to the matcher first.
    """

    def __init__(self, tokenizer: LLTokenizer, grammar: str, vocab: int):
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise BadRequest(f"grammar error: {self.matcher.get_error()}")
        self._vocab = vocab
        self._seen: int | None = None
        self._bits = np.arange(32, dtype=np.uint32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        ids = tokens.reshape(-1).tolist()
        if self._seen is None:
            self._seen = len(ids)  # the prompt: nothing to feed
        else:
            for t in ids[self._seen:]:
                self.matcher.consume_token(int(t))
            self._seen = len(ids)
        if self.matcher.is_error():
            return logits  # nothing sane to enforce; the engine reports the sequence as failed
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        allowed = ((words[:, None] >> self._bits) & 1).reshape(-1)[: logits.shape[-1]]
        if allowed.shape[0] < logits.shape[-1]:
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return mx.where(mx.array(allowed.astype(bool)), logits, mx.array(-float("inf"), dtype=logits.dtype))

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
