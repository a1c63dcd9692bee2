"""The official ollama and openai Python clients, run verbatim against a real daemon.

They are synchronous clients, so each call runs in a worker thread while the daemon runs on
this test's trio loop.
"""

from __future__ import annotations

import ollama
import openai
import trio

OPTS = {"temperature": 0, "num_predict": 8}


async def test_ollama_client_chat_and_generate(daemon):
    client = ollama.Client(host=daemon.url)

    def calls():
        msgs = [{"role": "user", "content": "Hello"}]
        whole = client.chat(model="tiny", messages=msgs, options=OPTS)
        parts = [p.message.content for p in client.chat(model="tiny", messages=msgs, options=OPTS, stream=True)]
        gen = client.generate(model="tiny", prompt="Hello", options=OPTS)
        listed = client.list()
        client._client.close()  # an idle keep-alive connection would hold the daemon's graceful stop
        return whole, parts, gen, listed

    with trio.fail_after(60):
        whole, parts, gen, listed = await trio.to_thread.run_sync(calls)
    assert whole.message.role == "assistant" and whole.message.content
    assert "".join(parts) == whole.message.content
    assert whole.done_reason == "length" and whole.eval_count == 8
    assert gen.response and gen.done and len(gen.context) == gen.prompt_eval_count + 8
    assert "tiny:latest" in {m.model for m in listed.models}


async def test_ollama_client_reports_missing_model(daemon):
    client = ollama.Client(host=daemon.url)

    def call():
        try:
            client.chat(model="missing", messages=[{"role": "user", "content": "x"}])
        except ollama.ResponseError as exc:
            return exc
        finally:
            client._client.close()
        return None

    with trio.fail_after(30):
        exc = await trio.to_thread.run_sync(call)
    assert exc is not None and exc.status_code == 404 and "not found" in exc.error


async def test_openai_client_chat_streaming_and_not(daemon):
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")

    def calls():
        msgs = [{"role": "user", "content": "Hello"}]
        whole = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8)
        stream = client.chat.completions.create(
            model="tiny",
            messages=msgs,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        models = client.models.list()
        client.close()
        return whole, chunks, models

    with trio.fail_after(60):
        whole, chunks, models = await trio.to_thread.run_sync(calls)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == text and text
    assert whole.usage.completion_tokens == 8 and chunks[-1].usage.completion_tokens == 8
    assert whole.choices[0].finish_reason == "length"
    assert "tiny:latest" in {m.id for m in models.data}


async def test_openai_client_errors(daemon):
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)

    def call():
        try:
            client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError as exc:
            return exc
        finally:
            client.close()
        return None

    with trio.fail_after(30):
        exc = await trio.to_thread.run_sync(call)
    assert exc is not None and exc.status_code == 404
