"""Per-sequence samplers and logits processors.

Each sequence owns its sampler; a seeded one carries its own PRNG key so that the same seed and
prompt give the same text whether or not other sequences share the batch.
"""

from __future__ import annotations

from typing import Callable

import attrs
import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

Sampler = Callable[[mx.array], mx.array]


@attrs.frozen
class SamplingParams:
    # Ollama's defaults, so a request without options behaves as it would there.
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def make_sampler(p: SamplingParams) -> Sampler:
    if p.greedy:
        return greedy_sampler  # shared object: the batch samples all greedy rows in one call
    methods: list[Callable[[mx.array], mx.array]] = []
    if 0 < p.top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, p.top_p))
    if p.min_p > 0:
        methods.append(lambda x: apply_min_p(x, p.min_p, 1))
    if p.top_k > 0:
        methods.append(lambda x: apply_top_k(x, p.top_k))
    inv_temp = 1.0 / p.temperature
    key = [mx.random.key(p.seed)] if p.seed is not None else None

    def sampler(logprobs: mx.array) -> mx.array:
        for method in methods:
            logprobs = method(logprobs)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sampler


def make_processors(p: SamplingParams) -> list:
    context = p.repeat_last_n if p.repeat_last_n > 0 else 64
    return make_logits_processors(
        logit_bias=p.logit_bias or None,
        repetition_penalty=p.repeat_penalty if p.repeat_penalty not in (0, 1) else None,
        repetition_context_size=context,
        presence_penalty=p.presence_penalty or None,
        presence_context_size=context,
        frequency_penalty=p.frequency_penalty or None,
        frequency_context_size=context,
    )
