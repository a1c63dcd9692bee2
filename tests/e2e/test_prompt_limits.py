"""Prompts that used to freeze or kill the daemon, and tools a template does not render, through a
real daemon on 127.0.0.1: template bombs, thousands of turns, a prompt of megabytes."""

from __future__ import annotations

import resource

import httpx
import pytest
import trio
from support import TINY, start_daemon

from mlxserve.specs import templates
from mlxserve.specs.tools import as_template_tools, normalize_tools, with_tool_prompt
from mlxserve.testing.tinymodel import CHATML

SHORT = {"temperature": 0, "num_predict": 2}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def _stays_live(c: httpx.AsyncClient, done: trio.Event) -> int:
    """Answers /api/version again and again until ``done``: each within 5 s, or the event loop
    was blocked. Returns how many answered."""
    n = 0
    while not done.is_set():
        with trio.fail_after(5):
            assert (await c.get("/api/version")).status_code == 200
        n += 1
        await trio.sleep(0)
    return n


async def _while_live(c: httpx.AsyncClient, request) -> tuple[httpx.Response, int]:
    """``request`` (a coroutine function) while another client keeps asking for /api/version."""
    done = trio.Event()
    out: dict = {}

    async def run():
        try:
            out["r"] = await request()
        finally:
            done.set()

    async def probe():
        out["n"] = await _stays_live(c, done)

    async with trio.open_nursery() as n:
        n.start_soon(run)
        n.start_soon(probe)
    return out["r"], out["n"]


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ 'x' * 10**8 }}", "chat template builds a value"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer than"),
        (
            "{% for a in messages * 500 %}{% for b in messages * 500 %}{% for c in messages * 500 %}"
            "{% endfor %}{% endfor %}{% endfor %}",
            "took longer than",
        ),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "chat template builds a value",
        ),
    ],
)
async def test_template_bombs_are_400_and_the_daemon_stays_responsive(daemon, template, message, monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 1.0)
    body = {"model": "tiny", "prompt": "hi", "template": template, "stream": False, "options": SHORT}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            r, _ = await _while_live(c, lambda: c.post("/api/generate", json=body))
            assert r.status_code == 400, r.text
            assert message in r.json()["error"]
            ok = await c.post("/api/generate", json={**body, "template": CHATML})
            assert ok.status_code == 200, ok.text


async def test_two_thousand_turns_are_trimmed_in_a_few_renders_off_the_event_loop(daemon):
    turns = []
    for i in range(1000):
        turns += [
            {"role": "user", "content": f"question {i}: what is the capital of France?"},
            {"role": "assistant", "content": f"answer {i}: the capital of France is Paris."},
        ]
    msgs = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "last one"}]
    body = {"model": "tiny", "messages": msgs, "stream": False, "options": {**SHORT, "num_ctx": 256}}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            r, answered = await _while_live(c, lambda: c.post("/api/chat", json=body))
            assert r.status_code == 200, r.text
            assert 200 < r.json()["prompt_eval_count"] < 256  # most of the window, the oldest turns gone
            assert answered >= 1


async def test_megabytes_of_prompt_are_refused_or_cut_before_tokenizing(daemon):
    big = "The capital of France is Paris. " * 250_000  # 8 MB: tokenizing it all took ~1.3 GB
    opts = {**SHORT, "num_ctx": 256}
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            assert (
                await c.post(
                    "/api/generate", json={"model": "tiny", "prompt": "warm", "stream": False, "options": opts}
                )
            ).status_code == 200
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for body in (
                {"model": "tiny", "prompt": big, "raw": True},
                {"model": "tiny", "prompt": big},
                {"model": "tiny", "messages": [{"role": "user", "content": big}]},
            ):
                path = "/api/chat" if "messages" in body else "/api/generate"
                r = await c.post(path, json={**body, "stream": False, "options": opts})
                assert r.status_code == 422, r.text
                assert "characters, more than the context window of 256 tokens" in r.json()["error"]
            for raw in (True, False):  # Ollama's truncate keeps the end of the prompt
                r = await c.post(
                    "/api/generate",
                    json={
                        "model": "tiny",
                        "prompt": big,
                        "raw": raw,
                        "truncate": True,
                        "stream": False,
                        "options": opts,
                    },
                )
                assert r.status_code == 200, r.text
                assert 200 < r.json()["prompt_eval_count"] < 256
            grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            assert grown_mb < 300, f"peak RSS grew {grown_mb:.0f} MB"


async def test_lone_surrogates_never_reach_the_tokenizer_as_an_error(daemon):
    raw = b'{"model": "tiny", "prompt": "a\\ud800b", "raw": true, "stream": false, "options": {"num_predict": 1}}'
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
            for path, body in (
                ("/api/generate", raw),
                (
                    "/api/chat",
                    raw.replace(
                        b'"prompt": "a\\ud800b", "raw": true', b'"messages": [{"role": "user", "content": "\\udfff"}]'
                    ),
                ),
            ):
                r = await c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code in (200, 400), (path, r.status_code, r.text)


@pytest.fixture
async def tools_daemon(models_dir, tiny_gguf):
    """The tiny model twice: its own ChatML template (which ignores tools) and one that renders them."""
    from mlxserve.store.store import Store

    native = CHATML.replace(
        "{% for message", "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for message", 1
    )
    Store(models_dir).create("tiny-native", f'FROM {tiny_gguf}\nTEMPLATE """{native}"""\n', base_dir=models_dir)
    async with trio.open_nursery() as nursery:
        d = await start_daemon(nursery, models_dir)
        yield d, native
        d.shutdown.set()


async def test_tools_reach_the_prompt_through_the_generic_fallback(tools_daemon):
    d, native = tools_daemon
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = as_template_tools(normalize_tools([WEATHER]))

    async def count(c, model: str, **extra) -> int:
        r = await c.post(
            "/api/chat", json={"model": model, "messages": msgs, "stream": False, "options": SHORT, **extra}
        )
        assert r.status_code == 200, r.text
        return r.json()["prompt_eval_count"]

    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
            plain, with_tools = await count(c, "tiny"), await count(c, "tiny", tools=[WEATHER])
            native_plain, native_tools = await count(c, "tiny-native"), await count(c, "tiny-native", tools=[WEATHER])
            oa = await c.post(
                "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "tools": [WEATHER], "max_tokens": 2}
            )
            assert oa.status_code == 200, oa.text
            tok = (await d.runner(TINY)).tokenizer
    # ChatML ignores tools: the fallback system message carries them, every word of it counted.
    assert with_tools > plain
    fallback = templates.render_chat(CHATML, with_tool_prompt(msgs, tools))
    assert "get_weather" in fallback and "Weather for a city" in fallback and '"city"' in fallback
    assert plain == len(tok.encode(templates.render_chat(CHATML, msgs), add_bos=False))
    assert with_tools == len(tok.encode(fallback, add_bos=False))
    assert oa.json()["usage"]["prompt_tokens"] == with_tools
    # A template that renders tools itself is left alone: no fallback message on top.
    assert native_plain == plain
    assert native_tools == len(tok.encode(templates.render_chat(native, msgs, tools=tools), add_bos=False))
    assert native_tools > native_plain
