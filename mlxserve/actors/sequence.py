"""One generation request as the actors take it, and what comes back from it.

HTTP builds a ``SequenceRequest`` and reads ``Chunk``s through the Runner without importing the
engine: the sampling parameters, the chunk, the tokenizer's type and the grammar compiler are
re-exported here, and the Runner turns the request into the engine's own command
(``engine.loop.Add``).
"""

from __future__ import annotations

import attrs

from ..engine.constrain import ANY_JSON_OBJECT, grammar_for_schema
from ..engine.loop import Add, Chunk, LogprobEntry, SeqStats
from ..engine.sampling import SamplingParams
from ..engine.tokenizer import TokenizerInfo

__all__ = [
    "ANY_JSON_OBJECT",
    "Chunk",
    "LogprobEntry",
    "SamplingParams",
    "SeqStats",
    "SequenceRequest",
    "TokenizerInfo",
    "grammar_for_schema",
]


@attrs.frozen
class SequenceRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; 0: the chosen token only; n: with top-n alternatives
    grammar: str | None = None  # a compiled grammar (grammar_for_schema) every token must satisfy
    images: tuple[bytes, ...] = ()  # encoded images (PNG, JPEG...) for a vision model, in prompt order

    def command(self, seq_id: int) -> Add:
        return Add(
            seq_id=seq_id,
            prompt_ids=self.prompt_ids,
            max_tokens=self.max_tokens,
            params=self.params,
            stop=self.stop,
            logprobs=self.logprobs,
            grammar=self.grammar,
            images=self.images,
        )
