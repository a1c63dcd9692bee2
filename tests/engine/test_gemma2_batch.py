"""Gemma 2 decodes a batch of sequences as it decodes each alone (mlx-lm's grouped-head attention
needs the batch mask's group axis: engine/model.py)."""

from __future__ import annotations

from mlx_lm.generate import BatchGenerator

from mlxserve.engine.model import load_path
from mlxserve.testing import ggufmodels


def _greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=4)
    uids = gen.insert(prompts, max_tokens=[steps] * len(prompts))
    out: dict[int, list[int]] = {u: [] for u in uids}
    while any(len(t) < steps for t in out.values()):
        for r in gen.next_generated():
            out[r.uid].append(r.token)
    gen.close()
    return [out[u] for u in uids]


def test_gemma2_batch_decodes_as_each_alone(tmp_path):
    lm = load_path(ggufmodels.write(tmp_path / "gemma2.gguf", "gemma2", "Q8_0"))
    prompts = [[5, 9, 14, 3, 27, 8], [11, 4, 30]]  # different lengths: the batch is left-padded
    together = _greedy(lm.model, prompts, 6)
    alone = [_greedy(lm.model, [p], 6)[0] for p in prompts]
    assert together == alone
