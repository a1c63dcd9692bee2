"""The MLX BERT encoder and the decoder pooling, checked without a server.

Reference vectors (minilm_reference.json) were produced once, offline, with the real
sentence-transformers 6.2.0 on torch 2.13.0 (CPU) from the very same model directory
(`SentenceTransformer(dir).encode(sentences, normalize_embeddings=False)`; the model's own
Normalize module normalises). make_minilm_reference.py beside this file is the script and says
how it was run; neither torch nor sentence-transformers is needed to run these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from support import float_tol

from mlxserve.engine.bert import read_sentence_config
from mlxserve.engine.embed import DecoderEmbedder
from mlxserve.engine.embedinputs import TOO_LONG, reduce_dimensions
from mlxserve.errors import BadRequest

MIN_COSINE = 0.999


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _short(reference, n: int = 4) -> list[str]:
    # Few and short: the suite's process may run MLX on its bundled reference BLAS (mlx is
    # imported before mlxserve.engine.cpu.backend can pick OpenBLAS), where every token is costly.
    return [it["text"] for it in sorted(reference["items"], key=lambda it: it["tokens"])][:n]


def test_sentence_config_from_the_package(minilm_dir, minilm):
    cfg = read_sentence_config(minilm_dir, 512)
    assert cfg.pooling == ("mean",) and cfg.normalize and cfg.max_seq_length == 256
    assert minilm.dimension == 384 and minilm.context_length == 256


def test_matches_sentence_transformers(minilm, reference):
    items = reference["items"]
    assert len(items) >= 5
    texts = [it["text"] for it in items]
    tokenized = minilm.tokenize(texts)
    # Same ids count as the HF tokenizer, and the long text is cut at max_seq_length (256).
    assert [len(t.ids) for t in tokenized] == [it["tokens"] for it in items]
    assert [t.truncated for t in tokenized] == [it["untruncated_tokens"] > 256 for it in items]
    got = minilm.embed(texts)
    want = np.array([it["embedding"] for it in items], dtype=np.float32)
    cos = _cos(got, want)
    print("cosine vs sentence-transformers:", np.round(cos, 7).tolist())
    assert got.shape == (len(items), 384) and got.dtype == np.float32
    assert (cos >= MIN_COSINE).all(), cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.abs(got - want).max() < float_tol(1e-4)


def test_batch_equals_one_by_one(minilm, reference):
    texts = _short(reference)
    batched = minilm.embed(texts)
    single = np.concatenate([minilm.embed([t]) for t in texts])
    assert np.abs(batched - single).max() < float_tol(1e-5)
    # Token-id input is the same as text input (the [CLS]/[SEP] frame is added either way).
    ids = [minilm.tokenizer.encode(t, add_special_tokens=False).ids for t in texts[:2]]
    np.testing.assert_allclose(minilm.embed(ids), batched[:2], atol=float_tol(1e-5))


def test_dimensions_truncate_and_renormalise(minilm, reference):
    texts = _short(reference)[:3]
    full = minilm.embed(texts)
    cut = minilm.embed(texts, dimensions=64)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    want = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, want, atol=1e-6)
    assert reduce_dimensions(full, 384) is full
    for bad in (0, 385):
        with pytest.raises(BadRequest, match="dimensions"):
            reduce_dimensions(full, bad)


def test_truncate_false_refuses_long_input(minilm, reference):
    long_text = reference["items"][-1]["text"]
    with pytest.raises(BadRequest, match=TOO_LONG):
        minilm.tokenize([long_text], truncate=False)
    with pytest.raises(BadRequest, match="token ids"):
        minilm.tokenize([[10**9]])
    # num_ctx below max_seq_length lowers the limit.
    assert len(minilm.tokenize(["a b c d e f"], limit=4)[0].ids) == 4


def test_decoder_mean_pooled_hidden_state(tiny_dir):
    import mlx.core as mx

    emb = DecoderEmbedder.load(tiny_dir)
    texts = ["Hello world!", "The capital of France is Paris.", "a"]
    batched = emb.embed(texts)
    single = np.concatenate([emb.embed([t]) for t in texts])
    atol = float_tol(1e-5)
    np.testing.assert_allclose(batched, single, atol=atol)
    # By hand: mean of model.model(ids) over the tokens, then L2 normalised.
    ids = emb.tokenize([texts[1]])[0].ids
    h = np.array(emb.lm.model.model(mx.array([ids])).astype(mx.float32))[0]
    want = h.mean(0) / np.linalg.norm(h.mean(0))
    np.testing.assert_allclose(batched[1], want, atol=atol)
    assert batched.shape == (3, emb.dimension)
    with pytest.raises(BadRequest, match=TOO_LONG):
        emb.tokenize(["x " * 50], truncate=False, limit=8)


def test_decoder_long_inputs_run_in_chunks(tiny_dir):
    """Inputs wider than ``chunk`` run over a KV cache, chunk by chunk: the vectors are those of
    one whole pass, and ``keep_going`` is asked between chunks and can drop the rest."""
    emb = DecoderEmbedder.load(tiny_dir)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (300, 37, 129, 300, 5)]
    whole = emb.embed_ids(seqs, chunk=4096)
    chunked = emb.embed_ids(seqs, chunk=64)
    np.testing.assert_allclose(chunked, whole, atol=float_tol(1e-5))

    asked: list[list[int]] = []

    def stop_after_two(rows) -> bool:
        asked.append(list(rows))
        return len(asked) < 3  # before the group, after chunk 1: go on; after chunk 2: drop

    dropped = emb.embed_ids([seqs[0]], chunk=64, keep_going=stop_after_two)
    assert asked == [[0], [0], [0]]  # three checkpoints, not one per chunk of all five
    assert not dropped.any()  # a dropped group's rows are never half-computed vectors


def test_bert_asks_before_each_group(minilm, reference):
    texts = _short(reference, 3)
    seqs = [t.ids for t in minilm.tokenize(texts)]
    asked: list[list[int]] = []
    got = minilm.embed_ids(seqs, keep_going=lambda rows: asked.append(sorted(rows)) or False)
    assert sorted(r for rows in asked for r in rows) == [0, 1, 2]  # every group was offered ...
    assert not got.any()  # ... and dropped before it ran


def test_a_long_text_is_tokenized_by_its_head(tiny_dir):
    """Only a head of an over-long text is encoded; its first ``room`` tokens are the text's."""
    from mlxserve.engine.embedinputs import encode_head
    from mlxserve.engine.tokenizer import from_directory

    tok = from_directory(tiny_dir)
    seen: list[int] = []

    def encode(text: str) -> list[int]:
        seen.append(len(text))
        return tok.encode(text, add_bos=False)

    rng = np.random.default_rng(1)
    words = ["the", "quick", "brown", "fox", "jumps", "über", "λόγος", "12345", "\n", "  ", "!?"]
    text = " ".join(rng.choice(words, size=20_000))
    full = tok.encode(text, add_bos=False)
    for room in (1, 50, 333):
        seen.clear()
        head = encode_head(encode, text, room)
        assert head == full[: room + 1] and max(seen) < len(text) // 10
    short = "a few words"
    assert encode_head(encode, short, 333) == tok.encode(short, add_bos=False)
