"""Constrained decoding with llguidance: a per-sequence logits processor that masks every token
the grammar (a JSON schema, "any JSON object", a tool call) cannot accept next.

The mask is computed on the CPU by llguidance and applied with ``mx.where``; the Metal kernel in
``llguidance.mlx`` is Apple-only, and one where per step costs little next to a forward pass.
"""

from __future__ import annotations

import json
import math
from typing import Any

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from ..errors import BadRequest

# Any JSON object, spelled out so that its numbers are bounded too (see bound_numbers).
ANY_JSON_OBJECT = {
    "$defs": {
        "value": {
            "anyOf": [
                {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
                {"type": "array", "items": {"$ref": "#/$defs/value"}},
                {"type": ["string", "number", "boolean", "null"]},
            ]
        }
    },
    "type": "object",
    "additionalProperties": {"$ref": "#/$defs/value"},
}

# As llama.cpp's json-schema-to-grammar: an integral part of at most 16 digits. A small model
# otherwise writes digits until max_tokens and the object never closes.
INTEGRAL_BOUND = 10**16 - 1
# At most 10 digits after the point: the finest multipleOf llguidance 1.9 takes ("too many digits").
FRACTION_STEP = 1e-10
_I64 = 2**63 - 1  # llguidance reads bounds as 64-bit integers
# Keywords whose values are data, not subschemas: never rewritten.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


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
        grammar = LLMatcher.grammar_from_json_schema(
            bound_numbers(close_objects(schema)), defaults={"whitespace_flexible": False}
        )
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
    out = {k: v if k in _DATA_KEYWORDS else close_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def bound_numbers(schema: Any) -> Any:
    """Integers and numbers get a bounded length unless the schema bounds them already.

    A missing minimum or maximum becomes -+(10^16-1) (moved out past the other bound when that
    one lies beyond it), and a number without multipleOf gets a step of 1e-10, which also rules
    out exponents. Each answer is still valid under the original schema.
    """
    if isinstance(schema, list):
        return [bound_numbers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else bound_numbers(v) for k, v in schema.items()}
    types = out.get("type")
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    if not types & {"integer", "number"}:
        return out
    low = _bound(out, "minimum", "exclusiveMinimum")
    high = _bound(out, "maximum", "exclusiveMaximum")
    if low is None:
        out["minimum"] = (
            -INTEGRAL_BOUND if high is None else max(min(-INTEGRAL_BOUND, math.floor(high) - INTEGRAL_BOUND), -_I64)
        )
    if high is None:
        out["maximum"] = (
            INTEGRAL_BOUND if low is None else min(max(INTEGRAL_BOUND, math.ceil(low) + INTEGRAL_BOUND), _I64)
        )
    if "number" in types and "multipleOf" not in out:
        out["multipleOf"] = FRACTION_STEP
    return out


def _bound(schema: dict, inclusive: str, exclusive: str) -> float | None:
    """The schema's bound on one side; draft 4's boolean exclusive* only qualifies the other."""
    for key in (inclusive, exclusive):
        v = schema.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return v
    return None


class TokenizerCache:
    """llguidance's view of a tokenizer costs ~1 s to build for a 50k vocabulary: once per model."""

    def __init__(self) -> None:
        self._tok: LLTokenizer | None = None

    def get(self, tokenizer_info, n_vocab: int) -> LLTokenizer:
        if self._tok is None:
            self._tok = LLTokenizer(
                tokenizer_info.tokenizer.to_str(),
                n_vocab=n_vocab,
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
            for t in ids[self._seen :]:
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
