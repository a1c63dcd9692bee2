"""Per-sequence samplers and logits processors.

Each sequence owns its sampler; a seeded one carries its own PRNG key so that the same seed and
prompt give the same text whether or not other sequences share the batch.
"""

from __future__ import annotations

import math
from typing import Callable

import attrs
import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

Sampler = Callable[[mx.array], mx.array]


@attrs.frozen
class SamplingParams:
    # Ollama's defaults, so a request without options behaves as it would there.
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0  # 1.0: off
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


# Our own top-k / top-p / min-p: mlx-lm's are mx.compile'd with the value baked in, so every new
# value recompiles (seconds on a CPU), and an exception inside the trace corrupts the thread's
# random state. These are a few plain ops each.
_NEG_INF = -float("inf")


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k : -k + 1]
    return mx.where(logprobs >= kth, logprobs, _NEG_INF)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    order = mx.argsort(logprobs, axis=-1)  # ascending
    ranked = mx.take_along_axis(logprobs, order, axis=-1)
    keep = mx.cumsum(mx.exp(ranked), axis=-1) > (1.0 - p)
    mask = mx.put_along_axis(mx.zeros(logprobs.shape, dtype=mx.bool_), order, keep, axis=-1)
    return mx.where(mask, logprobs, _NEG_INF)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, _NEG_INF)


def apply_typical_p(logprobs: mx.array, mass: float) -> mx.array:
    """Locally typical sampling (Meister et al. 2022; llama.cpp's and Ollama's ``typical_p``):
    keep the tokens whose surprise is closest to the distribution's entropy, fewest first, until
    they hold ``mass`` of the probability."""
    probs = mx.exp(logprobs)
    # Tokens already ruled out (-inf) carry no probability and no entropy (0 * -inf is nan).
    entropy = -mx.sum(mx.where(probs > 0, probs * logprobs, 0.0), axis=-1, keepdims=True)
    distance = mx.where(probs > 0, mx.abs(-logprobs - entropy), float("inf"))
    order = mx.argsort(distance, axis=-1)  # most typical first
    ranked = mx.take_along_axis(probs, order, axis=-1)
    keep = (mx.cumsum(ranked, axis=-1) - ranked) < mass  # the one that crosses the mass stays
    mask = mx.put_along_axis(mx.zeros(logprobs.shape, dtype=mx.bool_), order, keep, axis=-1)
    return mx.where(mask, logprobs, _NEG_INF)


def _on_candidates(before: list[Sampler], method: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
    if not before:  # the step's log-probabilities are normalized already
        return method
    return lambda x: method(x - mx.logsumexp(x, axis=-1, keepdims=True))


def make_sampler(p: SamplingParams) -> Sampler:
    if p.greedy:
        return greedy_sampler  # shared object: the batch samples all greedy rows in one call
    # llama.cpp's order (what Ollama's GGUF users get): top-k, typical-p, top-p, min-p, then the
    # temperature; a filter that weighs probability mass sees the candidates left, renormalized.
    methods: list[Callable[[mx.array], mx.array]] = []
    if p.top_k > 0:
        methods.append(lambda x: apply_top_k(x, p.top_k))
    if 0 < p.typical_p < 1.0:
        methods.append(_on_candidates(methods, lambda x: apply_typical_p(x, p.typical_p)))
    if 0 < p.top_p < 1.0:
        methods.append(_on_candidates(methods, lambda x: apply_top_p(x, p.top_p)))
    if p.min_p > 0:  # relative to the most likely token: no renormalizing needed
        methods.append(lambda x: apply_min_p(x, p.min_p))
    inv_temp = 1.0 / p.temperature
    # Any integer is a seed (Ollama sends -1 for "random"; PRNG keys take 64 unsigned bits).
    key = [mx.random.key(p.seed % (1 << 64))] if p.seed is not None and p.seed >= 0 else None

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
