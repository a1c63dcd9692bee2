"""Each GGUF architecture and quant type, as mlxserve loads and runs it, against llama.cpp.

The tiny models of mlxserve/testing/ggufmodels.py are written here with the reference's seed;
llama.cpp's top-5 next-token logprobs on the same token ids are in
data/llamacpp_reference.json (regenerate with make_llamacpp_reference.py). Per prompt at least 4
of llama.cpp's top 5 must be mlxserve's top 5, and over all prompts the mean |difference| of the
logprobs of llama.cpp's top-5 tokens must be at most 0.15. The context cases hold the same bounds on greedy decoding steps
past a sliding window (a batch of sequences, through mlx-lm's batched KV caches) and on phi3's
LongRoPE at a context past its original one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from mlxserve.engine import convert as engine_convert, patches
from mlxserve.engine.model import load_path
from mlxserve.store import convert
from mlxserve.store.ggufmeta import read_header
from mlxserve.testing import ggufmodels

REFERENCE = json.loads((Path(__file__).parent / "data" / "llamacpp_reference.json").read_text())
MIN_OVERLAP = 4
MAX_MEAN_DELTA = 0.15


def mlxserve_path(gguf: Path, tmp_path: Path) -> Path:
    """What create stores: the GGUF itself, or the mlx-lm directory it is converted to."""
    header = read_header(gguf)
    if not convert.needs_conversion(header):
        return gguf
    out = tmp_path / "converted"
    convert.convert_gguf(engine_convert, gguf, header, out)
    return out


def compare(rows: list[mx.array], refs: list[list[list[float]]]) -> tuple[int, float]:
    """(smallest top-5 overlap over the rows, mean |delta logprob| of llama.cpp's top 5)."""
    overlaps, deltas = [], []
    for row, ref in zip(rows, refs, strict=True):
        row = row.astype(mx.float32)
        logprobs = row - mx.logsumexp(row)
        ours = set(mx.argsort(-logprobs)[:5].tolist())
        overlaps.append(len(ours & {tok for tok, _ in ref}))
        deltas += [abs(logprobs[tok].item() - lp) for tok, lp in ref]
    return min(overlaps), sum(deltas) / len(deltas)


def agreement(model, case: dict, prompts: list[list[int]] | None = None) -> tuple[int, float]:
    """All prompts go in one batch, padded at the end: a causal model's logits at a prompt's last
    token do not see the padding after it."""
    prompts = prompts or REFERENCE["prompts"]
    width = max(map(len, prompts))
    logits = model(mx.array([ids + [ids[-1]] * (width - len(ids)) for ids in prompts]))
    return compare([logits[i, len(ids) - 1] for i, ids in enumerate(prompts)], case["top5"])


def load_case(arch: str, quant: str, ref: dict, tmp_path: Path, n_ctx: int):
    gguf = ggufmodels.write(tmp_path / f"{arch}-{quant}.gguf", arch, quant, seed=REFERENCE["seed"])
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == ref["sha256"], (
        "ggufmodels writes other bytes than the reference was made from: run tests/engine/make_llamacpp_reference.py"
    )
    lm = load_path(mlxserve_path(gguf, tmp_path))
    patches.fit_context(lm.model, n_ctx)  # the context llama-server ran with
    return lm


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_top5_logprobs_agree_with_llamacpp(case, tmp_path):
    arch, quant = case.split("/")
    ref = REFERENCE["cases"][case]
    lm = load_case(arch, quant, ref, tmp_path, REFERENCE["n_ctx"])
    overlap, delta = agreement(lm.model, ref)
    assert overlap >= MIN_OVERLAP and delta <= MAX_MEAN_DELTA, (case, overlap, delta)


def test_phi3_longrope_past_the_original_context(tmp_path):
    """A context past the original one (512 > 256) runs the long factors, on prompts of 260-440."""
    ref = REFERENCE["context_cases"]["long phi3/Q8_0"]
    lm = load_case(ref["arch"], ref["quant"], ref, tmp_path, ref["n_ctx"])
    overlap, delta = agreement(lm.model, ref, ref["prompts"])
    assert overlap >= MIN_OVERLAP and delta <= MAX_MEAN_DELTA, (overlap, delta)


class Forced:
    """A sampler that takes llama.cpp's greedy choices, so each step's logprobs compare."""

    def __init__(self, tokens: list[int]):
        self.tokens = iter(tokens)

    def __call__(self, logprobs: mx.array) -> mx.array:
        return mx.array([next(self.tokens, 0)])  # one step runs ahead of the last one asked for


@pytest.mark.parametrize("case", sorted(c for c in REFERENCE["context_cases"] if c.startswith("decode ")))
def test_decoding_past_the_sliding_window(case, tmp_path):
    """Prompts shorter and longer than the 8-token window, prefilled and decoded together in one
    batch (left-padded, mlx-lm's batched KV caches); every step's top 5 agrees with llama.cpp."""
    ref = REFERENCE["context_cases"][case]
    lm = load_case(ref["arch"], ref["quant"], ref, tmp_path, ref["n_ctx"])
    steps = ref["n_predict"]
    # prompts prefilled 4 tokens a step: the window crosses the chunks too
    gen = BatchGenerator(lm.model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=4, prefill_step_size=4)
    uids = gen.insert(
        ref["prompts"],
        max_tokens=[steps] * len(ref["prompts"]),
        samplers=[Forced([tok for tok, _ in seq]) for seq in ref["top5"]],
    )
    rows: dict[int, list[mx.array]] = {u: [] for u in uids}
    while any(len(r) < steps for r in rows.values()):
        for r in gen.next_generated():
            rows[r.uid].append(r.logprobs)
    gen.close()
    for uid, seq in zip(uids, ref["top5"]):
        overlap, delta = compare(rows[uid], [top for _, top in seq])
        assert overlap >= MIN_OVERLAP and delta <= MAX_MEAN_DELTA, (case, uid, overlap, delta)
