"""Thinking end to end: the tiny random model with thinking templates attached, driven by the
official clients. Its generation prompt ends in ``<think>\\n``, so the random answer, which never
writes ``</think>``, is all reasoning; with ``think: false`` the template closes the block in the
prompt and the answer is all content."""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

# ChatML whose answer opens in <think> unless enable_thinking is false (Qwen 3's switch).
SWITCHED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].split('</think>')[-1]"
    " + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
# DeepSeek-R1's shape: no switch, the answer always opens in <think>.
ALWAYS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].split('</think>')[-1]"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
OPTS = {"temperature": 0, "num_predict": 10}
USER = [{"role": "user", "content": "Why is the sky blue?"}]


async def _create(url: str, name: str, template: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/api/create", json={"model": name, "from": "tiny", "template": template, "stream": False})
        assert r.status_code == 200, r.text


@pytest.fixture
async def thinker(daemon):
    with trio.fail_after(60):
        await _create(daemon.url, "thinker", SWITCHED)
        await _create(daemon.url, "always", ALWAYS)
    return daemon


def _in_thread(fn):
    return trio.to_thread.run_sync(fn)


async def test_capability_is_listed_only_for_templates_that_think(thinker):
    def calls():
        client = ollama.Client(host=thinker.url)
        tags = httpx.get(f"{thinker.url}/api/tags").json()["models"]  # the client drops capabilities
        return ({m["name"]: m["capabilities"] for m in tags},
                client.show("thinker").capabilities, client.show("tiny").capabilities)

    with trio.fail_after(60):
        listed, thinker_caps, tiny_caps = await _in_thread(calls)
    assert "thinking" in thinker_caps and "thinking" not in tiny_caps
    assert "thinking" in listed["always:latest"] and "thinking" not in listed["tiny:latest"]


async def test_ollama_chat_returns_thinking_apart_and_streams_it(thinker):
    def calls():
        client = ollama.Client(host=thinker.url)
        whole = client.chat(model="thinker", messages=USER, think=True, options=OPTS)
        default = client.chat(model="thinker", messages=USER, options=OPTS)
        pieces = list(client.chat(model="thinker", messages=USER, think=True, options=OPTS, stream=True))
        off = client.chat(model="thinker", messages=USER, think=False, options=OPTS)
        return whole, default, pieces, off

    with trio.fail_after(90):
        whole, default, pieces, off = await _in_thread(calls)
    assert whole.message.thinking and whole.message.content == ""
    assert default.message.thinking == whole.message.thinking  # a thinking model thinks by default
    streamed = [p.message.thinking for p in pieces if p.message.thinking]
    assert len(streamed) > 1 and "".join(streamed) == whole.message.thinking  # as it comes
    assert not any(p.message.content for p in pieces)
    assert off.message.thinking is None and off.message.content  # closed in the prompt: all answer


async def test_think_false_hides_the_reasoning_of_a_model_that_always_thinks(thinker):
    def calls():
        client = ollama.Client(host=thinker.url)
        return (client.chat(model="always", messages=USER, think=False, options=OPTS),
                client.generate(model="always", prompt="Why?", think=True, options=OPTS))

    with trio.fail_after(60):
        off, gen = await _in_thread(calls)
    assert off.message.thinking is None and off.message.content == ""
    assert gen.thinking and gen.response == ""


async def test_think_on_a_model_that_cannot_is_a_400(thinker):
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=thinker.url, timeout=60) as c:
            r = await c.post("/api/chat", json={"model": "tiny", "messages": USER, "think": True})
            bad = await c.post("/api/chat", json={"model": "thinker", "messages": USER, "think": "lots"})
            gen = await c.post("/api/generate", json={"model": "tiny", "prompt": "x", "think": "high"})
            ok = await c.post("/api/chat", json={"model": "tiny", "messages": USER, "think": False,
                                                 "stream": False, "options": OPTS})
    assert r.status_code == 400 and r.json() == {"error": '"tiny:latest" does not support thinking'}
    assert bad.status_code == 400 and "think must be" in bad.json()["error"]
    assert gen.status_code == 400 and "does not support thinking" in gen.json()["error"]
    assert ok.status_code == 200 and "thinking" not in ok.json()["message"]


async def test_openai_reasoning_content_and_reasoning_effort(thinker):
    def calls():
        client = openai.OpenAI(base_url=f"{thinker.url}/v1", api_key="unused", max_retries=0)
        kw = dict(model="thinker", messages=USER, max_tokens=10, temperature=0)
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True))
        off = client.chat.completions.create(**kw, reasoning_effort="none")
        return whole, chunks, off

    with trio.fail_after(90):
        whole, chunks, off = await _in_thread(calls)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content == ""
    deltas = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1 and "".join(d for d in deltas if d) == reasoning
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert off.choices[0].message.content
