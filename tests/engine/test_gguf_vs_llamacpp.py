"""Each GGUF architecture and quant type, as mlxserve loads and runs it, against llama.cpp.

The tiny models of mlxserve/testing/ggufmodels.py are written here with the reference's seed;
llama.cpp's top-5 next-token logprobs on the same token ids are in
data/llamacpp_reference.json (regenerate with make_llamacpp_reference.py). Per prompt at least 4
of llama.cpp's top 5 must be mlxserve's top 5, and over all prompts the mean |difference| of the
logprobs of llama.cpp's top-5 tokens must be at most 0.15.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlxserve.engine import convert as engine_convert
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


def agreement(model, case: dict) -> tuple[int, float]:
    """(smallest top-5 overlap over the prompts, mean |delta logprob| of llama.cpp's top 5).
    All prompts go in one batch, padded at the end: a causal model's logits at a prompt's last
    token do not see the padding after it."""
    prompts = REFERENCE["prompts"]
    width = max(map(len, prompts))
    logits = model(mx.array([ids + [ids[-1]] * (width - len(ids)) for ids in prompts]))
    overlaps, deltas = [], []
    for i, (ids, ref) in enumerate(zip(prompts, case["top5"])):
        row = logits[i, len(ids) - 1].astype(mx.float32)
        logprobs = row - mx.logsumexp(row)
        ours = set(mx.argsort(-logprobs)[:5].tolist())
        overlaps.append(len(ours & {tok for tok, _ in ref}))
        deltas += [abs(logprobs[tok].item() - lp) for tok, lp in ref]
    return min(overlaps), sum(deltas) / len(deltas)


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_top5_logprobs_agree_with_llamacpp(case, tmp_path):
    arch, quant = case.split("/")
    ref = REFERENCE["cases"][case]
    gguf = ggufmodels.write(tmp_path / f"{arch}-{quant}.gguf", arch, quant, seed=REFERENCE["seed"])
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == ref["sha256"], (
        "ggufmodels writes other bytes than the reference was made from: run tests/engine/make_llamacpp_reference.py"
    )
    lm = load_path(mlxserve_path(gguf, tmp_path))
    overlap, delta = agreement(lm.model, ref)
    assert overlap >= MIN_OVERLAP and delta <= MAX_MEAN_DELTA, (case, overlap, delta)
