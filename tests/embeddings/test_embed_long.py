"""Long embedding inputs through a real daemon: truncation, cancellation, shutdown.

A 100k-character input on SmolLM2 (decoder embeddings, 8192-token context) used to run as one
forward pass of minutes: a client that left did not free the model thread, a refusal queued
behind it, and a shutdown waited for it. It now runs in chunks of MLXSERVE_PREFILL_CHUNK tokens
(32 here) over a KV cache, and the thread looks at its callers and at shutdown between chunks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from support import float_tol, start_daemon

from mlxserve.actors.hosts import HOSTS

SMOL = "smol:latest"
LONG_TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 1600)[:100_000]
CHUNK = 32


def _smol(stats):
    return next((m for m in stats.models if m.name == SMOL), None)


def _mid_embedding(stats) -> bool:
    """The thread works on one request and has finished at least one chunk of it."""
    m = _smol(stats)
    return m is not None and m.computing == 1 and m.steps >= 2


@pytest.fixture
def models_dir(smol_models_dir):
    return smol_models_dir


async def test_refusal_and_disconnect_do_not_wait_for_a_long_embedding(models_dir):
    async with trio.open_nursery() as n:
        d = await start_daemon(n, models_dir, prefill_chunk=CHUNK)
        embedder = d.runtime.embedder
        async with httpx.AsyncClient(base_url=d.url, timeout=600) as c:
            with trio.fail_after(120):
                r = await c.post("/api/embed", json={"model": "smol", "input": "warm up"})
                assert r.status_code == 200, r.text
            leaver = trio.CancelScope()

            async def long_request():
                with leaver:  # a client that gives up mid-embedding
                    await c.post("/api/embed", json={"model": "smol", "input": LONG_TEXT})

            n.start_soon(long_request)
            with trio.fail_after(120):
                await embedder.wait_until(_mid_embedding)
            # Refusals are decided before the job queues, not after the long one's batch.
            with trio.fail_after(30):
                r = await c.post("/api/embed", json={"model": "smol", "input": LONG_TEXT, "truncate": False})
                assert r.status_code == 400 and "exceeds maximum context length" in r.json()["error"]
                r = await c.post("/v1/embeddings", json={"model": "smol", "input": [[10**9]]})
                assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
            assert _mid_embedding(embedder.statistics())  # the long one is still running

            leaver.cancel()
            # Freed within a chunk or so (a whole pass is minutes of CPU here).
            with trio.fail_after(30):
                stats = await embedder.wait_until(lambda s: _smol(s).computing == 0)
                r = await c.post("/api/embed", json={"model": "smol", "input": "after"})
            assert _smol(stats).cancelled == 1 and r.status_code == 200
        d.shutdown.set()


async def test_shutdown_stops_a_long_embedding(models_dir):
    answer: list[httpx.Response] = []
    with trio.fail_after(180):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, models_dir, prefill_chunk=CHUNK)

            async def long_request():
                async with httpx.AsyncClient(base_url=d.url, timeout=600) as c:
                    answer.append(await c.post("/api/embed", json={"model": "smol", "input": LONG_TEXT}))

            n.start_soon(long_request)
            await d.runtime.embedder.wait_until(_mid_embedding)
            d.shutdown.set()
            stop_by = trio.current_time() + 30  # a bound against hanging, far above one chunk
    assert trio.current_time() < stop_by
    [r] = answer
    assert r.status_code == 503 and r.json() == {"error": "server is shutting down"}
    assert HOSTS.statistics().busy == 0  # the model thread stopped; it did not run on


async def test_truncate_cuts_to_the_context_or_refuses(models_dir, tiny_dir):
    """The cut input's vector is that of its first num_ctx tokens, computed in one pass."""
    import ollama
    import openai

    from mlxserve.engine.embed import DecoderEmbedder

    ref = DecoderEmbedder.load(tiny_dir)
    tok = ref.lm.tokenizer
    prefix = [tok.bos_token_id] if tok.add_bos and tok.bos_token_id is not None else []
    ctx = 100
    head = tok.encode(LONG_TEXT[:2000], add_bos=False)[: ctx - len(prefix)]
    want = ref.embed_ids([prefix + head], chunk=4096)[0]  # one whole pass, no cache

    async with trio.open_nursery() as n:
        d = await start_daemon(n, models_dir, prefill_chunk=CHUNK)

        def calls():
            oc = ollama.Client(host=d.url, timeout=120)
            ai = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0, timeout=120)
            try:
                cut = oc.embed(model="tiny-mlx", input=LONG_TEXT, options={"num_ctx": ctx})
                try:
                    oc.embed(model="tiny-mlx", input=LONG_TEXT, truncate=False, options={"num_ctx": ctx})
                    refused = None
                except ollama.ResponseError as exc:
                    refused = exc
                # OpenAI's route has no truncate; like Ollama's, it cuts at the model's context.
                v1 = ai.embeddings.create(model="tiny-mlx", input=LONG_TEXT, encoding_format="float")
                ids = ai.embeddings.create(model="tiny-mlx", input=head, encoding_format="float")
                return cut, refused, v1, ids
            finally:
                oc._client.close()
                ai.close()

        with trio.fail_after(120):
            cut, refused, v1, ids = await trio.to_thread.run_sync(calls)
        d.shutdown.set()
    assert cut.prompt_eval_count == ctx
    np.testing.assert_allclose(cut.embeddings[0], want, atol=float_tol(1e-5))
    np.testing.assert_allclose(ids.data[0].embedding, want, atol=float_tol(1e-5))
    assert refused is not None and refused.status_code == 400
    assert "exceeds maximum context length" in str(refused)
    assert v1.usage.prompt_tokens == ref.context_length  # 2048: cut, not refused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sigterm_stops_a_daemon_busy_with_a_long_embedding(models_dir):
    """The process exits soon after SIGTERM, though its model thread was mid-embedding."""
    # No drain: this is about the stop that follows it, with the model thread mid-embedding.
    env = {
        **os.environ,
        "MLXSERVE_MODELS": str(models_dir),
        "MLXSERVE_HOST": f"127.0.0.1:{_free_port()}",
        "MLXSERVE_PREFILL_CHUNK": str(CHUNK),
        "MLXSERVE_DRAIN_SECONDS": "0",
    }
    url = f"http://{env['MLXSERVE_HOST']}"
    proc = subprocess.Popen(
        [Path(sys.executable).parent / "mlxctl", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        with trio.fail_after(120):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert "listening on" in line
            async with httpx.AsyncClient(base_url=url, timeout=600) as c:
                r = await c.post("/api/embed", json={"model": "smol", "input": "warm up"})
                assert r.status_code == 200  # loaded
        answer: list[httpx.Response] = []
        with trio.fail_after(120):
            async with httpx.AsyncClient(base_url=url, timeout=600) as c, trio.open_nursery() as n:

                async def long_request():  # a client that waits for its answer throughout
                    answer.append(await c.post("/api/embed", json={"model": "smol", "input": LONG_TEXT}))

                n.start_soon(long_request)
                # A round trip on another connection lets the daemon take the long request
                # first (it then runs for minutes unless stopped).
                async with httpx.AsyncClient(base_url=url, timeout=60) as other:
                    await other.get("/api/ps")
                proc.send_signal(signal.SIGTERM)
                sent = trio.current_time()
        # It used to wait out Hypercorn's graceful period (5 s) for this request, then the
        # embedder's (10 s) while the thread ran on; now the request is answered at once and one
        # chunk of 32 tokens is all that is left to wait for.
        with trio.fail_at(sent + 10):
            code = await trio.to_thread.run_sync(proc.wait)
        assert answer[0].status_code == 503
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


async def test_embeddings_know_when_a_model_generates(models_dir):
    """Runners report whether they generate; embedding threads give way between chunks then."""
    from mlxserve.actors import activity

    async with trio.open_nursery() as n:
        d = await start_daemon(n, models_dir)
        async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
            with trio.fail_after(60):
                await c.post("/api/generate", json={"model": "tiny"})
                runner = await d.runner()
                assert activity.IDLE.is_set()
                leaver = trio.CancelScope()

                async def generate():
                    with leaver:
                        await c.post(
                            "/api/generate",
                            json={"model": "tiny", "prompt": "Hi", "options": {"temperature": 0, "num_predict": 1500}},
                        )

                n.start_soon(generate)
                await runner.wait_until(lambda s: s.running == 1)
                assert not activity.IDLE.is_set()
                leaver.cancel()
                await runner.wait_until(lambda s: s.running == 0)
                assert activity.IDLE.is_set()
        d.shutdown.set()
