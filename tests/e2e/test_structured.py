"""Structured outputs and tools, enforced by constrained decoding, through a real daemon.

The schema set runs on SmolLM2 (a real model that closes what it opens); the random-weight tiny
model shows the constraint holds even for a model that has no idea what JSON is.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import trio
from support import start_daemon

S = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -10, "maximum": 10},
                    "y": {"type": "integer", "minimum": -10, "maximum": 10},
                },
                "required": ["x", "y"],
            }
        },
        "required": ["point"],
    },
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {
        "type": "object",
        "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
        "required": ["price"],
    },
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"status": {"const": "done"}}, "required": ["status"]},
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 99},
                    "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
                },
                "required": ["id", "email"],
            }
        },
        "required": ["user"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer", "confidence"],
    },
    {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"],
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                },
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {"name": S, "nickname": {"type": ["string", "null"], "maxLength": 12}},
        "required": ["name", "nickname"],
    },
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
        "required": ["kind", "legs"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": S,
            "pages": {"type": "integer", "minimum": 1, "maximum": 999},
            "authors": {"type": "array", "items": S, "minItems": 1, "maxItems": 2},
        },
        "required": ["title", "pages", "authors"],
    },
    {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}, "required": ["hex"]},
    {
        "type": "object",
        "properties": {"temp_c": {"type": "number", "minimum": -50, "maximum": 60}, "unit": {"const": "C"}},
        "required": ["temp_c", "unit"],
    },
]


async def test_twenty_plus_schemas_all_validate(smol_models_dir):
    assert len(SCHEMAS) >= 20
    results: dict[int, object] = {}
    with trio.fail_after(240):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, smol_models_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=240) as c:

                async def one(i, schema):
                    r = await c.post(
                        "/api/generate",
                        json={
                            "model": "smol",
                            "stream": False,
                            "format": schema,
                            "options": {"num_predict": 160},
                            "prompt": f"Reply with JSON matching this schema: {json.dumps(schema)}",
                        },
                    )
                    assert r.status_code == 200, r.text
                    results[i] = (r.json()["response"], r.json()["done_reason"])

                async with trio.open_nursery() as inner:
                    for i, schema in enumerate(SCHEMAS):
                        inner.start_soon(one, i, schema)
            d.shutdown.set()
    failures = []
    for i, schema in enumerate(SCHEMAS):
        text, reason = results[i]
        try:
            jsonschema.validate(json.loads(text), schema)
        except Exception as exc:  # collect every failure, then report them all
            failures.append((i, reason, text, str(exc)[:100]))
    assert failures == []


async def test_random_model_still_emits_valid_json_and_free_requests_share_the_batch(daemon):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            out = {}

            async def constrained():
                r = await c.post(
                    "/api/chat",
                    json={
                        "model": "tiny",
                        "stream": False,
                        "format": schema,
                        "messages": [{"role": "user", "content": "json"}],
                        "options": {"temperature": 0, "num_predict": 60},
                    },
                )
                out["c"] = r.json()

            async def free():
                r = await c.post(
                    "/api/generate",
                    json={
                        "model": "tiny",
                        "prompt": "Hello",
                        "stream": False,
                        "options": {"temperature": 0, "num_predict": 20},
                    },
                )
                out["f"] = r.json()

            async with trio.open_nursery() as n:
                n.start_soon(constrained)
                n.start_soon(free)
            r = await c.post(
                "/api/generate",
                json={
                    "model": "tiny",
                    "prompt": "Hello",
                    "stream": False,
                    "options": {"temperature": 0, "num_predict": 20},
                },
            )
    jsonschema.validate(json.loads(out["c"]["message"]["content"]), schema)
    assert out["f"]["response"] == r.json()["response"]  # the free one was not disturbed


async def test_bad_format_and_response_format_are_400(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url) as c:
            r = await c.post("/api/generate", json={"model": "tiny", "prompt": "x", "format": "yaml"})
            assert r.status_code == 400
            r = await c.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "xml"},
                },
            )
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
            r = await c.post("/api/generate", json={"model": "tiny", "prompt": "x", "think": True})
            assert r.status_code == 400 and "does not support thinking" in r.json()["error"]
            r = await c.post("/api/generate", json={"model": "tiny", "prompt": "x", "images": ["aGk="]})
            assert r.status_code == 400 and "does not support images" in r.json()["error"]
            r = await c.post(
                "/api/generate", json={"model": "tiny", "prompt": "x", "logprobs": True, "top_logprobs": 50}
            )
            assert r.status_code == 400


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]},
    },
}


async def test_official_clients_format_tools_and_logprobs(smol_models_dir):
    with trio.fail_after(240):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, smol_models_dir)

            def calls():
                oc = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0)
                ol = ollama.Client(host=d.url)
                try:
                    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
                    required = oc.chat.completions.create(
                        model="smol", messages=msgs, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60
                    )
                    named = oc.chat.completions.create(
                        model="smol",
                        messages=msgs,
                        tools=[WEATHER, TIME],
                        max_tokens=60,
                        tool_choice={"type": "function", "function": {"name": "get_time"}},
                        stream=True,
                    )
                    named_chunks = list(named)
                    schema = {
                        "type": "object",
                        "properties": {"capital": {"type": "string", "maxLength": 20}},
                        "required": ["capital"],
                    }
                    rf = oc.chat.completions.create(
                        model="smol",
                        max_tokens=60,
                        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                        response_format={
                            "type": "json_schema",
                            "json_schema": {"name": "a", "schema": schema, "strict": True},
                        },
                    )
                    lp = oc.chat.completions.create(
                        model="smol", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=3
                    )
                    fmt = ol.chat(
                        model="smol",
                        messages=[{"role": "user", "content": "Capital of France as JSON"}],
                        format=schema,
                        options={"num_predict": 60},
                    )
                    tool_followup = ol.chat(
                        model="smol",
                        options={"num_predict": 30},
                        messages=[
                            *msgs,
                            {
                                "role": "assistant",
                                "content": "",
                                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
                            },
                            {"role": "tool", "content": "22 degrees and sunny", "tool_name": "get_weather"},
                        ],
                    )
                    return required, named_chunks, rf, lp, fmt, tool_followup, schema
                finally:
                    oc.close()
                    ol._client.close()

            required, named_chunks, rf, lp, fmt, followup, schema = await trio.to_thread.run_sync(calls)
            d.shutdown.set()
    call = required.choices[0].message.tool_calls[0]
    assert required.choices[0].finish_reason == "tool_calls"
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    streamed_calls = [tc for ch in named_chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(streamed_calls) == 1 and streamed_calls[0].function.name == "get_time"  # whole, in one chunk
    assert json.loads(streamed_calls[0].function.arguments)["tz"] in ("UTC", "CET")
    assert named_chunks[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(rf.choices[0].message.content), schema)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    jsonschema.validate(json.loads(fmt.message.content), schema)
    assert followup.message.content  # the tool result was rendered and answered


async def test_logprobs_under_a_grammar_are_finite_numbers(daemon):
    # Masked tokens have -inf logprobs: they must not leak out as non-JSON or null values.
    body = {
        "model": "tiny",
        "stream": False,
        "format": {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]},
        "messages": [{"role": "user", "content": "json"}],
        "logprobs": True,
        "top_logprobs": 8,
        "options": {"temperature": 0, "num_predict": 12},
    }
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            r = await c.post("/api/chat", json=body)
    entries = r.json()["logprobs"]
    assert entries
    for e in entries:
        assert isinstance(e["logprob"], float) and e["logprob"] > -1e308
        assert all(isinstance(a["logprob"], float) for a in e["top_logprobs"])


def _digit_bias() -> dict[str, int]:
    """logit_bias that makes the tiny model want digits above anything else."""
    from mlxserve.testing.tinymodel import build_tokenizer

    return {str(i): 100 for t, i in build_tokenizer().get_vocab().items() if t.isdigit()}


async def test_integers_and_numbers_under_a_schema_close_within_max_tokens(daemon):
    # A model that only wants digits: without a bound on their count it writes them until
    # max_tokens and the object never closes.
    schema = {
        "type": "object",
        "properties": {"population": {"type": "integer"}, "area": {"type": "number"}},
        "required": ["population", "area"],
    }

    def call():
        with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0) as oc:
            return oc.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Paris as JSON"}],
                temperature=0,
                max_tokens=150,
                logit_bias=_digit_bias(),
                response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
            )

    with trio.fail_after(120):
        r = await trio.to_thread.run_sync(call)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    jsonschema.validate(value, schema)
    assert len(str(value["population"]).lstrip("-")) <= 16
    assert len(repr(float(value["area"])).split(".")[0].lstrip("-")) <= 16


async def test_unusable_response_format_schemas_are_openai_400s(daemon):
    bad = [
        {"type": "json_schema", "json_schema": {"name": "a", "schema": "not a schema"}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "integer", "minimum": 10**30}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "oneOf": 3}}},
        {"type": "xml"},
    ]

    def calls():
        errors = []
        with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0) as oc:
            for rf in bad:
                try:
                    oc.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, response_format=rf
                    )
                except openai.BadRequestError as exc:
                    errors.append(exc)
        return errors

    with trio.fail_after(60):
        errors = await trio.to_thread.run_sync(calls)
    assert len(errors) == len(bad)
    for exc in errors:
        assert exc.status_code == 400
        assert set(exc.body) >= {"message", "type", "param", "code"} and exc.body["type"] == "invalid_request_error"
