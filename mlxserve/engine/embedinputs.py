"""Embedding inputs and vectors, shared by the decoder (embed.py) and BERT (bert.py) embedders:
tokenizing and cutting inputs, grouping them into padded batches, pooling and normalising."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import attrs
import mlx.core as mx
import numpy as np

from ..errors import BadRequest

EmbedInput = Union[str, Sequence[int]]  # text, or token ids of the model's own vocabulary
# Called with a group's row indices before it starts and after each chunk; False drops the group.
KeepGoing = Callable[[Sequence[int]], bool]

TOO_LONG = "input length exceeds maximum context length"


@attrs.frozen
class Tokenized:
    ids: list[int]
    truncated: bool = False


# Tokens past the context that a text's head must yield before its first ``room`` tokens count as
# the whole text's: cutting the text mid-word changes only the last few tokens of the head.
HEAD_MARGIN = 64


def encode_head(encode: Callable[[str], list[int]], text: str, room: int) -> list[int]:
    """The text's tokens or, for a text longer than ``room`` tokens, its first ``room + 1``:
    a growing head of the text is encoded (8 characters per token of room first), so a
    megabyte of input costs about a context's worth of tokenizing, not a megabyte's."""
    size = 8 * (room + HEAD_MARGIN)
    while size < len(text):
        ids = encode(text[:size])
        if len(ids) > room + HEAD_MARGIN:
            return ids[: room + 1]
        size *= 4
    return encode(text)


def tokenize_all(
    inputs: Sequence[EmbedInput],
    encode: Callable[[str], list[int]],
    prefix: list[int],
    suffix: list[int],
    max_len: int,
    *,
    truncate: bool,
    vocab_size: int,
) -> list[Tokenized]:
    """Encode texts (or check token-id lists), frame them with special tokens, and cut the body
    so the whole fits ``max_len``; with ``truncate`` false an input that does not fit raises."""
    room = max_len - len(prefix) - len(suffix)
    if room < 1:
        raise BadRequest(f"context length {max_len} is too small for any input")
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            body = encode_head(encode, item, room)
        else:
            body = list(item)
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in body):
                raise BadRequest(f"input[{i}]: token ids must be integers in [0, {vocab_size})")
        cut = len(body) > room
        if cut:
            if not truncate:
                raise BadRequest(TOO_LONG)
            body = body[:room]
        ids = prefix + body + suffix
        if not ids:
            raise BadRequest(f"input[{i}] is empty")
        out.append(Tokenized(ids, cut))
    return out


def normalize_rows(v: mx.array) -> mx.array:
    # torch.nn.functional.normalize's eps, so an all-zero vector stays zero instead of NaN.
    return v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def reduce_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first ``dimensions`` components and re-normalise (Matryoshka-style truncation,
    as OpenAI's ``dimensions`` and Ollama's do); None leaves the vectors alone."""
    if dimensions is None:
        return vectors
    full = vectors.shape[-1]
    if not 1 <= dimensions <= full:
        raise BadRequest(f"dimensions must be between 1 and {full} for this model")
    if dimensions == full:
        return vectors
    cut = np.ascontiguousarray(vectors[:, :dimensions], dtype=np.float32)
    norms = np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)
    return (cut / norms).astype(np.float32)


def batch_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Index groups of similar length within a token budget of rows x longest row.

    Sorted by length; a group also ends where padding would exceed the real tokens (a 256-token
    text must not pad eight 10-token ones to 256: on a CPU that is 8x the work). A single
    over-budget row still forms its own group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        width = lengths[i]  # ascending: the newest row is the longest of its group
        padded_size = (len(cur) + 1) * width
        if cur and (padded_size > max_tokens or padded_size - (real + width) > real + width):
            groups.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += width
    if cur:
        groups.append(cur)
    return groups


def padded(seqs: Sequence[Sequence[int]], idx: Sequence[int], pad_id: int = 0) -> tuple[mx.array, mx.array]:
    """Right-padded (B, L) ids and 0/1 mask for the rows ``idx`` of ``seqs``."""
    width = max(len(seqs[i]) for i in idx)
    ids = np.full((len(idx), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(idx), width), dtype=np.int32)
    for row, i in enumerate(idx):
        ids[row, : len(seqs[i])] = seqs[i]
        mask[row, : len(seqs[i])] = 1
    return mx.array(ids), mx.array(mask)


def mean_pool(h: mx.array, mask: mx.array) -> mx.array:
    m = mask.astype(mx.float32)[:, :, None]
    return (h.astype(mx.float32) * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
