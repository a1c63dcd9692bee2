"""Client disconnects in every phase free the slot: queued, prefilling, decoding; both dialects."""

from __future__ import annotations

import httpx
import pytest
import trio
from support import leave_when, start_daemon

LONG = {"temperature": 0, "num_predict": 1500}


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "options": LONG}),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hi"}],
                "temperature": 0,
                "max_tokens": 1500,
                "stream": True,
            },
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 1500},
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "Hi", "temperature": 0, "max_tokens": 1500, "stream": True}),
    ],
)
async def test_disconnect_while_decoding(daemon, path, body):
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            await c.post("/api/generate", json={"model": "tiny"})
            runner = await daemon.runner()
            await leave_when(c, runner, (path, body), lambda s: s.running == 1)
            await runner.wait_until(lambda s: s.running == 0)
    _, finish, stats = runner.finished()[-1]
    assert finish == "cancelled" and stats.generated_tokens < 750


async def test_disconnect_while_queued_behind_a_busy_slot(models_dir):
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, models_dir, num_parallel=1)
            async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
                await c.post("/api/generate", json={"model": "tiny"})
                runner = await d.runner()
                first = {
                    "model": "tiny",
                    "prompt": "Hello",
                    "stream": False,
                    "options": {"temperature": 0, "num_predict": 300},
                }
                async with trio.open_nursery() as inner:
                    done = []

                    async def keep():
                        done.append((await c.post("/api/generate", json=first)).json())

                    inner.start_soon(keep)
                    await runner.wait_until(lambda s: s.running == 1)
                    queued = ("/api/generate", {"model": "tiny", "prompt": "Bye", "options": LONG})
                    await leave_when(c, runner, queued, lambda s: s.running == 2)
                    await runner.wait_until(lambda s: s.running == 1)  # the queued one is gone
                    assert (await d.runtime.scheduler.statistics()).queued == 0
                assert done[0]["eval_count"] == 300  # the survivor was not disturbed
                await runner.wait_until(lambda s: s.running == 0)
                cancelled = [f for f in runner.finished() if f[1] == "cancelled"]
                assert len(cancelled) == 1 and cancelled[0][2].generated_tokens == 0
            d.shutdown.set()


async def test_disconnect_during_prefill(models_dir):
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, models_dir, prefill_chunk=8)
            async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
                await c.post("/api/generate", json={"model": "tiny"})
                runner = await d.runner()
                prompt = "Once upon a time there was a small model. " * 60  # ~600 tokens, 75 chunks
                req = ("/api/generate", {"model": "tiny", "prompt": prompt, "options": LONG})
                await leave_when(c, runner, req, lambda s: s.running == 1)
                await runner.wait_until(lambda s: s.running == 0)
            _, finish, stats = runner.finished()[-1]
            assert finish == "cancelled" and stats.generated_tokens == 0
            d.shutdown.set()
