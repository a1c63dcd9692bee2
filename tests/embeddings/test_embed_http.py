"""/api/embed, /api/embeddings and /v1/embeddings through a real daemon, with raw HTTP and with
the official ollama and openai clients.

The store holds all-MiniLM-L6-v2 ('all-minilm', a BERT encoder), the tiny decoder models and
'no-caps' (see conftest.py). Expected vectors come from minilm_reference.json: made once with
sentence-transformers on torch, as test_embed_engine.py describes.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import httpx
import numpy as np
import trio
from support import float_tol

MODEL = "all-minilm"


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _items(reference, n: int = 3) -> list[dict]:
    # The shortest few: on MLX's reference BLAS (see test_embed_engine.py) tokens are costly.
    return sorted(reference["items"], key=lambda it: it["tokens"])[:n]


async def test_embed_routes(daemon, reference):
    items = _items(reference)
    texts = [it["text"] for it in items]
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        with trio.fail_after(60):
            r = await c.post("/api/embed", json={"model": MODEL, "input": texts})
            assert r.status_code == 200, r.text
            j = r.json()
            assert set(j) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
            assert j["model"] == MODEL and len(j["embeddings"]) == 3
            for got, it in zip(j["embeddings"], items):
                assert len(got) == 384 and _cos(got, it["embedding"]) >= 0.999
            assert j["prompt_eval_count"] == sum(it["tokens"] for it in items)
            assert j["total_duration"] >= j["load_duration"] > 0  # this request loaded the model
            batched = np.array(j["embeddings"])

            # A string input and dimensions: truncated, then re-normalised.
            r = await c.post("/api/embed", json={"model": MODEL, "input": texts[0], "dimensions": 32})
            [short] = r.json()["embeddings"]
            assert len(short) == 32 and abs(np.linalg.norm(short) - 1) < 1e-5
            assert _cos(short, items[0]["embedding"][:32]) >= 0.999
            assert r.json()["load_duration"] == 0  # already loaded

            # Requests that arrive together are batched; each still gets its own vectors.
            answers: dict[int, list] = {}

            async def one(i: int):
                resp = await c.post("/api/embed", json={"model": MODEL, "input": [texts[i % 3]]})
                answers[i] = resp.json()["embeddings"][0]

            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(one, i)
            for i, vec in answers.items():
                assert np.abs(np.array(vec) - batched[i % 3]).max() < float_tol(1e-5)

            # Legacy route.
            r = await c.post("/api/embeddings", json={"model": MODEL, "prompt": texts[1]})
            assert list(r.json()) == ["embedding"]
            assert np.abs(np.array(r.json()["embedding"]) - batched[1]).max() < float_tol(1e-5)
            r = await c.post("/api/embeddings", json={"model": MODEL, "prompt": ""})
            assert r.json() == {"embedding": []}

            # OpenAI: float, base64 (little-endian float32) and token arrays.
            r = await c.post("/v1/embeddings", json={"model": MODEL, "input": texts[:2]})
            j = r.json()
            assert j["object"] == "list" and j["model"] == MODEL
            assert [(d["object"], d["index"]) for d in j["data"]] == [("embedding", 0), ("embedding", 1)]
            assert j["usage"] == {
                "prompt_tokens": items[0]["tokens"] + items[1]["tokens"],
                "total_tokens": items[0]["tokens"] + items[1]["tokens"],
            }
            assert np.abs(np.array(j["data"][1]["embedding"]) - batched[1]).max() < float_tol(1e-5)
            r = await c.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": texts[0], "encoding_format": "base64", "dimensions": 64},
            )
            raw = base64.b64decode(r.json()["data"][0]["embedding"])
            vec = np.frombuffer(raw, dtype="<f4")
            assert vec.shape == (64,) and np.abs(vec - short_of(batched[0], 64)).max() < float_tol(1e-5)
            r = await c.post("/v1/embeddings", json={"model": MODEL, "input": [[7592, 2088], [7592]]})
            j = r.json()
            assert len(j["data"]) == 2 and j["usage"]["prompt_tokens"] == 4 + 3  # [CLS] ... [SEP]

            # A decoder model embeds too: its mean-pooled last hidden state.
            r = await c.post("/api/embed", json={"model": "tiny", "input": ["Hello", "world"]})
            emb = np.array(r.json()["embeddings"])
            assert r.status_code == 200 and emb.shape == (2, 64)
            assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

            # Empty input loads; with keep_alive 0 it unloads.
            embedder = daemon.runtime.embedder
            assert {m.name for m in embedder.statistics().models} == {"all-minilm:latest", "tiny:latest"}
            r = await c.post("/api/embed", json={"model": MODEL, "input": [], "keep_alive": 0})
            assert r.json()["embeddings"] == []
            assert {m.name for m in embedder.statistics().models} == {"tiny:latest"}
            r = await c.post("/api/embed", json={"model": MODEL, "keep_alive": "1m"})
            assert r.status_code == 200 and r.json()["load_duration"] > 0
            assert MODEL + ":latest" in {m.name for m in embedder.statistics().models}

            # /api/ps shows embedding models as Ollama does, with their keep-alive deadline.
            listed = {m["name"]: m for m in (await c.get("/api/ps")).json()["models"]}
            mini = listed[MODEL + ":latest"]
            assert mini["details"]["format"] and mini["size"] > 80_000_000 and len(mini["digest"]) == 64
            assert mini["context_length"] == 256 and mini["size_vram"] >= 0  # max_seq_length
            left = datetime.fromisoformat(mini["expires_at"].replace("Z", "+00:00")) - datetime.now(UTC)
            assert 0 < left.total_seconds() <= 60


def short_of(v: np.ndarray, d: int) -> np.ndarray:
    return v[:d] / np.linalg.norm(v[:d])


async def test_embed_errors(daemon, reference):
    long_text = reference["items"][-1]["text"]  # 602 tokens; the encoder takes 256
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        with trio.fail_after(60):

            async def status(path: str, body: dict) -> tuple[int, dict]:
                r = await c.post(path, json=body)
                return r.status_code, r.json()

            code, body = await status("/api/embed", {"model": "missing", "input": "x"})
            assert code == 404 and "not found" in body["error"]
            code, body = await status("/v1/embeddings", {"model": "missing", "input": "x"})
            assert code == 404 and set(body["error"]) == {"message", "type", "param", "code"}
            for path, key in (("/api/embed", "input"), ("/api/embeddings", "prompt"), ("/v1/embeddings", "input")):
                code, body = await status(path, {"model": "no-caps", key: "x"})
                assert code == 400, (path, body)
                assert "does not support embeddings" in str(body)
            for path, bad in (
                ("/api/embed", {"input": [1, 2]}),
                ("/api/embed", {"input": {"a": 1}}),
                ("/api/embeddings", {"prompt": 5}),
                ("/v1/embeddings", {"input": [{}]}),
                ("/v1/embeddings", {"input": ""}),
                ("/v1/embeddings", {"input": ["a", 3]}),
            ):
                code, body = await status(path, {"model": MODEL, **bad})
                assert code == 400, (path, bad, body)
            code, body = await status("/v1/embeddings", {"model": MODEL, "input": [1]})
            assert code == 200  # a token array is input too
            code, body = await status("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"})
            assert code == 400 and body["error"]["type"] == "invalid_request_error"
            for dims in (0, 385, "8"):
                code, body = await status("/api/embed", {"model": MODEL, "input": "x", "dimensions": dims})
                assert code == 400 and "dimensions" in body["error"], (dims, body)
            code, body = await status("/api/embed", {"model": MODEL, "input": [long_text, "x"], "truncate": False})
            assert code == 400 and "exceeds maximum context length" in body["error"]
            code, body = await status("/v1/embeddings", {"model": MODEL, "input": [[10**9]]})
            assert code == 400 and "token ids" in body["error"]["message"]


async def test_official_clients(daemon, reference):
    import ollama
    import openai

    items = _items(reference, 2)
    texts = [it["text"] for it in items]

    def calls():
        oc = ollama.Client(host=daemon.url)
        ai = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
        try:
            o = oc.embed(model=MODEL, input=texts)
            legacy = oc.embeddings(model=MODEL, prompt=texts[0])
            a = ai.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
            a_dims = ai.embeddings.create(model=MODEL, input=texts[0], dimensions=16, encoding_format="float")
            try:
                ai.embeddings.create(model="missing", input="x")
                missing = None
            except openai.NotFoundError as exc:
                missing = exc
            return o, legacy, a, a_dims, missing
        finally:
            oc._client.close()  # an idle keep-alive connection would hold the daemon's graceful stop
            ai.close()

    with trio.fail_after(60):
        o, legacy, a, a_dims, missing = await trio.to_thread.run_sync(calls)
    assert o.model == MODEL and len(o.embeddings) == 2
    for got, it in zip(o.embeddings, items):
        assert _cos(got, it["embedding"]) >= 0.999
    assert o.prompt_eval_count == sum(it["tokens"] for it in items)
    assert _cos(legacy.embedding, items[0]["embedding"]) >= 0.999
    assert [d.index for d in a.data] == [0, 1] and a.usage.prompt_tokens == o.prompt_eval_count
    for d, it in zip(a.data, items):
        assert len(d.embedding) == 384 and _cos(d.embedding, it["embedding"]) >= 0.999
    assert len(a_dims.data[0].embedding) == 16
    assert missing is not None and missing.status_code == 404
