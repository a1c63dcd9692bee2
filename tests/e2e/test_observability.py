"""/metrics, /api/status, the JSONL request log, and 503s under queue overflow."""

from __future__ import annotations

import json

import httpx
import trio
from support import start_daemon

OPTS = {"temperature": 0, "num_predict": 6}


async def test_metrics_status_and_request_log(models_dir, tmp_path):
    log_dir = tmp_path / "logs"
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, models_dir, log_dir=log_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
                r = await c.post(
                    "/api/generate", json={"model": "tiny", "prompt": "Hi", "options": OPTS, "stream": False}
                )
                assert r.status_code == 200
                assert (await c.post("/api/generate", json={"model": "nope", "prompt": "x"})).status_code == 404
                status = (await c.get("/api/status")).json()
                text = (await c.get("/metrics")).text
            d.shutdown.set()
    assert status["models"][0]["name"] == "tiny:latest" and status["models"][0]["loaded"] is True
    assert status["running"] == 0 and status["queued"] == 0
    assert 'mlxserve_requests_total{route="/api/generate",status="200"} 1.0' in text
    assert 'mlxserve_requests_total{route="/api/generate",status="404"} 1.0' in text
    assert 'mlxserve_generated_tokens_total{model="tiny:latest"} 6.0' in text
    assert "mlxserve_time_to_first_token_seconds_bucket" in text
    assert "mlxserve_loaded_models 1.0" in text
    lines = [json.loads(x) for x in (log_dir / "requests.jsonl").read_text().splitlines()]
    ok = [x for x in lines if x["status"] == 200][0]
    for key in (
        "id",
        "route",
        "model",
        "done_reason",
        "prompt_eval_count",
        "eval_count",
        "eval_duration",
        "queue_wait_ns",
        "client",
    ):
        assert key in ok, key
    assert ok["eval_count"] == 6 and ok["client"] == "127.0.0.1"
    assert any(x["status"] == 404 for x in lines)


async def test_queue_overflow_is_refused_at_once_with_retry_after(models_dir):
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, models_dir, num_parallel=1, max_queue=2)
            async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
                await c.post("/api/generate", json={"model": "tiny"})  # preload
                runner = await d.runner()
                long = {
                    "model": "tiny",
                    "prompt": "Hello",
                    "stream": False,
                    "options": {"temperature": 0, "num_predict": 400},
                }
                results = []
                async with trio.open_nursery() as inner:

                    async def one():
                        results.append((await c.post("/api/generate", json=long)).status_code)

                    for _ in range(3):  # 1 running + 2 queued: the cap
                        inner.start_soon(one)
                    # All three submitted (one decoding, two waiting for the single slot).
                    await runner.wait_until(lambda s: s.running >= 3)
                    assert (await d.runtime.scheduler.statistics()).queued == 2
                    r = await c.post("/api/generate", json=long)
                    assert r.status_code == 503 and r.headers["Retry-After"]
                    assert "busy" in r.json()["error"]
                    r = await c.post(
                        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
                    )
                    assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
                assert results == [200, 200, 200]
            d.shutdown.set()
