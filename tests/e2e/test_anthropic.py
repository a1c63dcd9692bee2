"""Anthropic's Messages API, driven by the official ``anthropic`` SDK against a real daemon.

The SDK is synchronous: each test's calls run in a worker thread while the daemon runs on the
test's trio loop.
"""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest
import trio
from support import leave_when, start_daemon

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "description": "Time in a timezone",
    "input_schema": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]},
}


def _client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


async def test_create_and_stream_agree_with_usage_and_stop_reason(daemon):
    def calls():
        with _client(daemon.url) as client:
            kw = dict(
                model="tiny",
                max_tokens=8,
                extra_body={"temperature": 0},
                system=[{"type": "text", "text": "Be brief."}],
                messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                metadata={"user_id": "u1"},
                thinking={"type": "enabled", "budget_tokens": 1024},
            )
            whole = client.messages.create(**kw)
            with client.messages.stream(**kw) as stream:
                pieces = list(stream.text_stream)
                final = stream.get_final_message()
            raw = httpx.post(f"{daemon.url}/v1/messages", json={**kw.pop("extra_body"), **kw, "stream": True})
            names = [line.removeprefix("event: ") for line in raw.text.splitlines() if line.startswith("event: ")]
            return whole, pieces, final, names

    with trio.fail_after(60):
        whole, pieces, final, names = await trio.to_thread.run_sync(calls)
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert [b.type for b in whole.content] == ["text"]  # thinking accepted, no thinking block
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8 and whole.usage.input_tokens > 0
    assert "".join(pieces) == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]


async def test_stop_sequence_is_reported(daemon):
    def calls():
        with _client(daemon.url) as client:
            kw = dict(
                model="tiny",
                max_tokens=12,
                extra_body={"temperature": 0},
                messages=[{"role": "user", "content": "Hello"}],
            )
            free = client.messages.create(**kw)
            text = free.content[0].text
            # A stop sequence the greedy answer is bound to meet: a piece of its own text.
            stop = text[3:6]
            stopped = client.messages.create(**kw, stop_sequences=["\x00never", stop])
            return text, stop, stopped

    with trio.fail_after(60):
        text, stop, stopped = await trio.to_thread.run_sync(calls)
    assert len(text) >= 6 and stop.strip()
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]


async def test_errors_are_anthropic_shaped(daemon):
    def calls():
        with _client(daemon.url) as client:
            out = {}
            for key, kw in {
                "missing": dict(model="missing", max_tokens=4, messages=[{"role": "user", "content": "x"}]),
                "role": dict(model="tiny", max_tokens=4, messages=[{"role": "system", "content": "x"}]),
                "image": dict(
                    model="tiny",
                    max_tokens=4,
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image",
                                    "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                                }
                            ],
                        }
                    ],
                ),
                "server_tool": dict(
                    model="tiny",
                    max_tokens=4,
                    messages=[{"role": "user", "content": "x"}],
                    tools=[{"type": "web_search_20250305", "name": "web_search"}],
                ),
            }.items():
                try:
                    client.messages.create(**kw)
                except anthropic.APIStatusError as exc:
                    out[key] = exc
            raw = httpx.post(
                f"{daemon.url}/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
            )
            no_max = httpx.post(
                f"{daemon.url}/v1/messages",  # the SDK would not send it
                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
            )
            return out, raw, no_max

    with trio.fail_after(60):
        errors, raw, no_max = await trio.to_thread.run_sync(calls)
    assert isinstance(errors["missing"], anthropic.NotFoundError)
    assert errors["missing"].body["error"]["type"] == "not_found_error"
    assert "missing" in errors["missing"].body["error"]["message"]
    for key in ("role", "image", "server_tool"):
        assert isinstance(errors[key], anthropic.BadRequestError), key
        assert errors[key].body["type"] == "error"
        assert errors[key].body["error"]["type"] == "invalid_request_error", key
    assert "images are not supported" in errors["image"].body["error"]["message"]
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert raw.json()["type"] == "error"
    assert no_max.status_code == 400 and no_max.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens is required",
    }


async def test_count_tokens_counts_what_create_reads(daemon):
    def calls():
        with _client(daemon.url) as client:
            msgs = [{"role": "user", "content": "How many tokens is this?"}]
            counted = client.messages.count_tokens(model="tiny", system="Be brief.", messages=msgs)
            with_tools = client.messages.count_tokens(model="tiny", system="Be brief.", messages=msgs, tools=[WEATHER])
            made = client.messages.create(model="tiny", system="Be brief.", messages=msgs, max_tokens=1)
            return counted, with_tools, made

    with trio.fail_after(60):
        counted, with_tools, made = await trio.to_thread.run_sync(calls)
    assert counted.input_tokens == made.usage.input_tokens > 0
    assert with_tools.input_tokens > counted.input_tokens  # the tools are part of the prompt


async def test_tools_round_trip_with_smollm2(smol_models_dir):
    with trio.fail_after(300):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, smol_models_dir)

            def calls():
                with _client(d.url) as client:
                    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
                    forced = client.messages.create(
                        model="smol", max_tokens=60, messages=msgs, tools=[WEATHER, TIME], tool_choice={"type": "any"}
                    )
                    with client.messages.stream(
                        model="smol",
                        max_tokens=60,
                        messages=msgs,
                        tools=[WEATHER, TIME],
                        tool_choice={"type": "tool", "name": "get_time"},
                    ) as stream:
                        named = stream.get_final_message()
                    use = forced.content[0]
                    answer = client.messages.create(
                        model="smol",
                        max_tokens=30,
                        tools=[WEATHER, TIME],
                        tool_choice={"type": "none"},
                        messages=[
                            *msgs,
                            {"role": "assistant", "content": forced.content},
                            {
                                "role": "user",
                                "content": [
                                    {
                                        "type": "tool_result",
                                        "tool_use_id": use.id,
                                        "content": [{"type": "text", "text": "22 degrees, sunny"}],
                                    }
                                ],
                            },
                        ],
                    )
                    schema = {
                        "type": "object",
                        "properties": {"capital": {"type": "string", "maxLength": 20}},
                        "required": ["capital"],
                    }
                    structured = client.messages.create(
                        model="smol",
                        max_tokens=60,
                        messages=[{"role": "user", "content": "Capital of France?"}],
                        output_config={"format": {"type": "json_schema", "schema": schema}},
                    )
                    return forced, named, answer, structured, schema

            forced, named, answer, structured, schema = await trio.to_thread.run_sync(calls)
            d.shutdown.set()
    assert forced.stop_reason == "tool_use" and len(forced.content) >= 1
    use = forced.content[0]
    assert use.type == "tool_use" and use.id.startswith("toolu_") and use.name in ("get_weather", "get_time")
    jsonschema.validate(use.input, (WEATHER if use.name == "get_weather" else TIME)["input_schema"])
    assert named.stop_reason == "tool_use" and named.content[0].name == "get_time"
    assert named.content[0].input["tz"] in ("UTC", "CET")  # parsed from the streamed input_json_delta
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"
    assert answer.content[0].text
    jsonschema.validate(__import__("json").loads(structured.content[0].text), schema)


@pytest.mark.parametrize(
    "path,body",
    [
        (
            "/v1/messages",
            {
                "model": "tiny",
                "max_tokens": 1500,
                "stream": True,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        ),
        (
            "/v1/messages",
            {"model": "tiny", "max_tokens": 1500, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]},
        ),
        (
            "/v1/responses",
            {"model": "tiny", "max_output_tokens": 1500, "stream": True, "temperature": 0, "input": "Hi"},
        ),
        ("/v1/responses", {"model": "tiny", "max_output_tokens": 1500, "temperature": 0, "input": "Hi"}),
    ],
)
async def test_leaving_mid_answer_cancels_the_sequence(daemon, path, body):
    """Both newer dialects (streamed or not): a client that leaves frees its slot at once."""
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            await c.post("/api/generate", json={"model": "tiny"})
            runner = await daemon.runner()
            await leave_when(c, runner, (path, body), lambda s: s.running == 1)
            await runner.wait_until(lambda s: s.running == 0)
    _, finish, stats = runner.finished()[-1]
    assert finish == "cancelled" and stats.generated_tokens < 750
