"""The sampling filters on hand-made distributions (no model): what each keeps and drops."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlxserve.engine import sampling

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def kept(filtered: mx.array) -> list[int]:
    return [i for i, v in enumerate(np.array(filtered)[0].tolist()) if math.isfinite(v)]


def logprobs(probs=PROBS) -> mx.array:
    return mx.log(mx.array([probs], dtype=mx.float32))


def test_typical_p_keeps_the_tokens_nearest_the_entropy_until_the_mass():
    lp = logprobs()
    entropy = -sum(p * math.log(p) for p in PROBS)  # 1.333 nats
    distance = {i: abs(-math.log(p) - entropy) for i, p in enumerate(PROBS)}
    ranked = sorted(distance, key=distance.get)  # 1 (0.20), 2 (0.15), 0 (0.50), 3, 4
    assert ranked[:3] == [1, 2, 0]
    # 0.2 < 0.3 -> add 2 (0.35 >= 0.3): two tokens, and the most likely one is not among them.
    assert kept(sampling.apply_typical_p(lp, 0.3)) == [1, 2]
    assert kept(sampling.apply_typical_p(lp, 0.5)) == [0, 1, 2]
    assert kept(sampling.apply_typical_p(lp, 0.999)) == [0, 1, 2, 3, 4]


def test_typical_p_ignores_tokens_already_ruled_out():
    lp = logprobs([0.6, 0.4, 0.0, 0.0])  # -inf where a grammar or top-k removed a token
    out = sampling.apply_typical_p(lp, 0.5)
    assert not np.isnan(np.array(out)).any()
    assert set(kept(out)) <= {0, 1} and kept(out)


def test_top_p_min_p_top_k():
    lp = logprobs()
    assert kept(sampling.apply_top_p(lp, 0.6)) == [0, 1]
    assert kept(sampling.apply_min_p(lp, 0.25)) == [0, 1, 2]
    assert kept(sampling.apply_top_k(lp, 2)) == [0, 1]


def test_typical_p_reaches_the_sampler_and_restricts_its_choices():
    params = sampling.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, typical_p=0.3, seed=3)
    sampler = sampling.make_sampler(params)
    drawn = {int(sampler(logprobs()).item()) for _ in range(60)}
    assert drawn == {1, 2}  # never the most likely token 0, which typical_p=0.3 removes


def test_top_p_weighs_the_candidates_top_k_left_as_llama_cpp_does():
    # top-k 2 leaves 0.4 and 0.3, renormalized 0.57 and 0.43: top-p 0.5 then keeps token 0 alone.
    # Over the whole vocabulary (top-p first) it would keep 0.4 + 0.3, so both could be drawn.
    probs = [0.4, 0.3, 0.2, 0.1]
    params = sampling.SamplingParams(temperature=1.0, top_k=2, top_p=0.5, seed=5)
    sampler = sampling.make_sampler(params)
    assert {int(sampler(logprobs(probs)).item()) for _ in range(40)} == {0}
    wide = sampling.make_sampler(sampling.SamplingParams(temperature=1.0, top_k=0, top_p=0.5, seed=5))
    assert {int(wide(logprobs(probs)).item()) for _ in range(40)} == {0, 1}
