"""Thinking end to end: the tiny random model with thinking templates attached, driven by the
official clients. Its generation prompt ends in ``<think>\\n``, so the random answer, which never
writes ``</think>``, is all reasoning; with ``think: false`` the template closes the block in the
prompt and the answer is all content."""

from __future__ import annotations

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
        return (
            {m["name"]: m["capabilities"] for m in tags},
            client.show("thinker").capabilities,
            client.show("tiny").capabilities,
        )

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
        return (
            client.chat(model="always", messages=USER, think=False, options=OPTS),
            client.generate(model="always", prompt="Why?", think=True, options=OPTS),
        )

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
            ok = await c.post(
                "/api/chat", json={"model": "tiny", "messages": USER, "think": False, "stream": False, "options": OPTS}
            )
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


async def test_anthropic_thinking_blocks_streamed_and_capped_by_budget(thinker):
    def calls():
        with anthropic.Anthropic(base_url=thinker.url, api_key="unused", max_retries=0) as client:
            kw = dict(
                model="thinker",
                max_tokens=10,
                messages=USER,
                extra_body={"temperature": 0},
                thinking={"type": "enabled", "budget_tokens": 1024},
            )
            whole = client.messages.create(**kw)
            with client.messages.stream(**kw) as stream:
                events = list(stream)
                final = stream.get_final_message()
            capped = client.messages.create(**{**kw, "thinking": {"type": "enabled", "budget_tokens": 3}})
            plain = client.messages.create(
                model="tiny", max_tokens=4, messages=USER, thinking={"type": "enabled", "budget_tokens": 1024}
            )
            return whole, events, final, capped, plain

    with trio.fail_after(90):
        whole, events, final, capped, plain = await _in_thread(calls)
    assert [b.type for b in whole.content] == ["thinking"] and whole.content[0].thinking
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 10
    deltas = [e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.content[0].thinking == final.content[0].thinking
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens <= 4  # the budget ended it
    assert whole.content[0].thinking.startswith(capped.content[0].thinking)
    assert [b.type for b in plain.content] == ["text"]  # a model that cannot think just answers


async def test_responses_reasoning_item_streamed(thinker):
    def calls():
        client = openai.OpenAI(base_url=f"{thinker.url}/v1", api_key="unused", max_retries=0)
        kw = dict(model="thinker", input="Why is the sky blue?", max_output_tokens=10, temperature=0)
        whole = client.responses.create(**kw)
        events = list(client.responses.create(**kw, stream=True))
        off = client.responses.create(**kw, reasoning={"effort": "none"})
        return whole, events, off

    with trio.fail_after(90):
        whole, events, off = await _in_thread(calls)
    reasoning = whole.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    assert [o.type for o in whole.output] == ["reasoning", "message"]
    assert whole.usage.output_tokens_details.reasoning_tokens > 0
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == reasoning.content[0].text
    assert events[-1].response.output[0].content[0].text == reasoning.content[0].text
    assert [o.type for o in off.output] == ["message"] and off.output_text


async def test_mlxctl_run_think_and_hidethinking(thinker):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")}
    env["MLXSERVE_HOST"] = thinker.url.removeprefix("http://")

    def mlxctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "from mlxserve.cli.main import main; main()", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def calls():
        # A Modelfile's num_predict: random weights seldom end an answer on their own.
        httpx.post(
            f"{thinker.url}/api/create",
            json={
                "model": "brief",
                "from": "always",
                "stream": False,
                "parameters": {"num_predict": 6, "temperature": 0},
            },
            timeout=60,
        ).raise_for_status()
        return (
            mlxctl("run", "brief", "hi", "--think"),
            mlxctl("run", "brief", "hi", "--hidethinking"),
            mlxctl("run", "tiny", "hi", "--think=high"),
        )

    with trio.fail_after(300):
        shown, hidden, refused = await _in_thread(calls)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("Thinking...\n") and "\n...done thinking.\n\n" in shown.stdout
    thought = shown.stdout.removeprefix("Thinking...\n").split("\n...done thinking.")[0]
    assert thought.strip()
    assert hidden.returncode == 0 and "Thinking..." not in hidden.stdout and thought not in hidden.stdout
    assert refused.returncode != 0 and "does not support thinking" in refused.stderr


async def test_repl_set_think_and_nothink(thinker):
    from mlxserve.cli.repl import repl

    lines = iter(["/set nothink", "hi", "/set think", "hi"])
    shown: list[str] = []

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=thinker.url, timeout=60) as client:
            await repl(client, "always", options={"num_predict": 6, "temperature": 0}, input_fn=read, out=shown.append)
    text = "".join(shown)
    first, second = text.split("Set 'think' mode.")
    assert "Set 'nothink' mode." in first and "Thinking..." not in first
    assert second.count("Thinking...\n") == 1 and "...done thinking." in second
