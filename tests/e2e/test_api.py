"""End to end: a real daemon (Hypercorn on 127.0.0.1) serving the tiny model."""

from __future__ import annotations

import gc
import json
import weakref

import httpx
import pytest
import trio

GREEDY = {"temperature": 0, "num_predict": 12}


async def _lines(resp: httpx.Response) -> list[dict]:
    return [json.loads(line) async for line in resp.aiter_lines() if line.strip()]


async def test_root_version_and_health(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url) as c:
            r = await c.get("/")
            assert r.status_code == 200 and "mlxserve" in r.text
            assert (await c.head("/")).status_code == 200
            assert "version" in (await c.get("/api/version")).json()
            assert (await c.get("/api/health")).json()["status"] == "ok"
            tags = (await c.get("/api/tags")).json()["models"]
            assert {m["name"] for m in tags} >= {"tiny:latest", "tiny-mlx:latest"}


async def test_generate_streams_ndjson_with_final_stats(daemon):
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            async with c.stream(
                "POST", "/api/generate", json={"model": "tiny", "prompt": "Hello", "options": GREEDY}
            ) as r:
                assert r.headers["content-type"].startswith("application/x-ndjson")
                lines = await _lines(r)
    assert all(not line["done"] for line in lines[:-1])
    assert {line["model"] for line in lines} == {"tiny"}  # as the request named it, every line
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["eval_count"] == 12
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int), key
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert isinstance(final["context"], list) and len(final["context"]) == final["prompt_eval_count"] + 12


async def test_chat_non_stream_matches_stream(daemon):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "The capital of France"}], "options": GREEDY}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            whole = (await c.post("/api/chat", json={**body, "stream": False})).json()
            async with c.stream("POST", "/api/chat", json=body) as r:
                lines = await _lines(r)
    streamed = "".join(line["message"]["content"] for line in lines)
    assert whole["message"]["role"] == "assistant"
    assert whole["message"]["content"] == streamed and streamed
    assert whole["done_reason"] == lines[-1]["done_reason"] == "length"


async def test_gguf_and_mlx_dir_give_the_same_greedy_text(daemon):
    body = {"prompt": "Once upon a time", "options": GREEDY, "stream": False}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            a = (await c.post("/api/generate", json={"model": "tiny", **body})).json()
            b = (await c.post("/api/generate", json={"model": "tiny-mlx", **body})).json()
    assert a["response"] == b["response"] and a["context"] == b["context"]


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model 'nope' not found"),
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}, 400, "temperature"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "system": "s"}, 400, "raw"),
        ("/api/chat", {"model": "tiny", "messages": "hi"}, 400, "messages"),
        ("/api/generate", {"model": "../../etc/passwd", "prompt": "x"}, 400, ""),
    ],
)
async def test_bad_requests_get_clear_errors(daemon, path, body, status, message):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url) as c:
            r = await c.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


async def test_malformed_json_is_400_on_both_dialects(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url) as c:
            r = await c.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "invalid JSON" in r.json()["error"]
            r = await c.post("/v1/chat/completions", content=b"[", headers={"content-type": "application/json"})
            assert r.status_code == 400
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            r = await c.post(
                "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code == 404 and r.json()["error"]["message"] == "model 'nope' not found"


async def test_foreign_host_header_is_refused(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url) as c:
            r = await c.get("/api/version", headers={"Host": "evil.example:11434"})
            assert r.status_code == 403
            assert (await c.get("/api/version", headers={"Host": "localhost:11434"})).status_code == 200


async def test_openai_chat_completions_non_stream_and_stream(daemon):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "temperature": 0,
        "max_tokens": 10,
    }
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            whole = (await c.post("/v1/chat/completions", json=body)).json()
            events = []
            async with c.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
            ) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            models = (await c.get("/v1/models")).json()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["usage"]["completion_tokens"] == 10
    assert whole["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert "tiny:latest" in {m["id"] for m in models["data"]}


async def test_concurrent_requests_match_solo_runs(daemon):
    prompts = ["Hello world", "The capital of Italy", "def add(a, b):", "Once upon a time"]

    async def one(c, p):
        r = await c.post("/api/generate", json={"model": "tiny", "prompt": p, "options": GREEDY, "stream": False})
        return r.json()["response"]

    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            solo = [await one(c, p) for p in prompts]
            together: dict[int, str] = {}

            async def run(i):
                together[i] = await one(c, prompts[i])

            async with trio.open_nursery() as n:
                for i in range(len(prompts)):
                    n.start_soon(run, i)
    assert [together[i] for i in range(len(prompts))] == solo


async def test_stream_disconnect_stops_generation(daemon):
    body = {"model": "tiny", "prompt": "Hello", "options": {"temperature": 0, "num_predict": 1500}}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            async with c.stream("POST", "/api/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.strip():
                        break  # first token arrived: leave mid-stream
        runner = await daemon.runner()
        await runner.wait_until(lambda s: s.running == 0)
    seq_id, finish, stats = runner.finished()[-1]
    assert finish == "cancelled"
    assert stats.generated_tokens < 1500 // 2


async def test_non_stream_disconnect_stops_generation(daemon):
    body = {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"temperature": 0, "num_predict": 1500}}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            await c.post("/api/generate", json={"model": "tiny"})  # preload, so the runner exists
            runner = await daemon.runner()
            async with trio.open_nursery() as n:
                scope = trio.CancelScope()

                async def request():
                    with scope:
                        await c.post("/api/generate", json=body)

                n.start_soon(request)
                await runner.wait_until(lambda s: s.running == 1)
                scope.cancel()  # the client goes away while the answer is being generated
        await runner.wait_until(lambda s: s.running == 0)
    _, finish, stats = runner.finished()[-1]
    assert finish == "cancelled" and stats.generated_tokens < 1500 // 2


async def test_preload_and_unload(daemon):
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            r = (await c.post("/api/generate", json={"model": "tiny"})).json()
            assert r["done"] and r["done_reason"] == "load"
            runner = await daemon.runner()
            model = weakref.ref(runner._runner.loaded)
            assert gc.get_freeze_count() > 0  # the loaded model's objects are out of the collector's way
            ps = (await c.get("/api/ps")).json()["models"]
            assert [m["name"] for m in ps] == ["tiny:latest"]
            r = (await c.post("/api/chat", json={"model": "tiny", "messages": [], "keep_alive": 0})).json()
            assert r["done_reason"] == "unload"
            await runner.wait_exited()
            assert (await c.get("/api/ps")).json()["models"] == []
            # Nothing that outlives the runner (this handle, the Loader's last reply, the idle
            # engine host thread, the frozen heap) keeps the unloaded model's weights alive.
            assert model() is None


async def test_context_window_chat_drops_old_turns_generate_refuses(daemon):
    filler = "Once upon a time there was a small model that answered questions. " * 6
    history = []
    for i in range(8):
        history += [{"role": "user", "content": f"{i} {filler}"}, {"role": "assistant", "content": filler}]
    msgs = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "last question"}]
    opts = {"temperature": 0, "num_predict": 4, "num_ctx": 256}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            r = await c.post("/api/chat", json={"model": "tiny", "messages": msgs, "options": opts, "stream": False})
            assert r.status_code == 200, r.text
            assert r.json()["prompt_eval_count"] < 256
            long_prompt = {"model": "tiny", "prompt": filler * 4, "options": opts, "stream": False}
            r = await c.post("/api/generate", json=long_prompt)
            assert r.status_code == 422 and "context window" in r.json()["error"]
            r = await c.post("/api/generate", json={**long_prompt, "truncate": True})
            assert r.status_code == 200 and r.json()["prompt_eval_count"] < 256
            ps = (await c.get("/api/ps")).json()["models"]
            assert {m["context_length"] for m in ps} >= {256}  # num_ctx is a load-time option
