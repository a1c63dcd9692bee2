"""OpenAI's Responses API, driven by the official ``openai`` client against a real daemon."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import trio
from support import start_daemon

from mlxserve.http.responses import ResponseStore

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def test_create_stream_and_items_agree(daemon):
    def calls():
        with _client(daemon.url) as client:
            kw = dict(model="tiny", max_output_tokens=8, temperature=0, reasoning={"effort": "low"})
            plain = client.responses.create(input="Hello", **kw)
            items = client.responses.create(
                instructions="Be brief.",
                input=[
                    {"role": "developer", "content": "Answer in English."},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                ],
                **kw,
            )
            events = list(client.responses.create(input="Hello", stream=True, **kw))
            return plain, items, events

    with trio.fail_after(60):
        plain, items, events = await trio.to_thread.run_sync(calls)
    assert plain.object == "response" and plain.id.startswith("resp_") and plain.output_text
    # The tiny model never ends on its own: every answer is cut at max_output_tokens.
    assert plain.status == "incomplete" and plain.incomplete_details.reason == "max_output_tokens"
    assert plain.usage.output_tokens == 8 and plain.usage.input_tokens > 0
    assert items.output_text and items.usage.input_tokens > plain.usage.input_tokens  # instructions count
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == events[-1].response.output_text


async def test_previous_response_id_retrieve_and_delete(daemon):
    def calls():
        with _client(daemon.url) as client:
            first = client.responses.create(model="tiny", input="Hello", max_output_tokens=4, temperature=0)
            second = client.responses.create(
                model="tiny", input="And again", max_output_tokens=4, temperature=0, previous_response_id=first.id
            )
            alone = client.responses.create(
                model="tiny", input="And again", max_output_tokens=4, temperature=0, store=False
            )
            got = client.responses.retrieve(second.id)
            client.responses.delete(second.id)
            out = {}
            for key, call in {
                "gone": lambda: client.responses.retrieve(second.id),
                "unstored": lambda: client.responses.retrieve(alone.id),
                "previous": lambda: client.responses.create(model="tiny", input="x", previous_response_id="resp_no"),
                "model": lambda: client.responses.create(model="missing", input="x"),
                "image": lambda: client.responses.create(
                    model="tiny",
                    input=[
                        {
                            "role": "user",
                            "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}],
                        }
                    ],
                ),
                "tool": lambda: client.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}]),
            }.items():
                try:
                    call()
                except openai.APIStatusError as exc:
                    out[key] = exc
            bad = httpx.post(f"{daemon.url}/v1/responses", json={"model": "tiny", "input": 3})
            return first, second, alone, got, out, bad

    with trio.fail_after(60):
        first, second, alone, got, errors, bad = await trio.to_thread.run_sync(calls)
    # The earlier turn (its input and output) is part of the prompt.
    prior = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens >= alone.usage.input_tokens + prior
    assert second.previous_response_id == first.id
    assert got.id == second.id and got.output_text == second.output_text
    for key in ("gone", "unstored", "previous", "model"):
        assert isinstance(errors[key], openai.NotFoundError), key
    for key in ("image", "tool"):
        assert isinstance(errors[key], openai.BadRequestError), key
        assert errors[key].body["type"] == "invalid_request_error"
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


async def test_input_items_list_with_order_limit_and_after(daemon):
    def calls():
        with _client(daemon.url) as client:
            r = client.responses.create(
                model="tiny",
                max_output_tokens=2,
                temperature=0,
                input=[
                    {"role": "developer", "content": "Answer in English."},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                    {"role": "user", "content": "And again"},
                ],
            )
            plain = client.responses.create(model="tiny", max_output_tokens=2, temperature=0, input="Hi")
            desc = client.responses.input_items.list(r.id)
            asc = client.responses.input_items.list(r.id, order="asc", limit=2)
            rest = client.responses.input_items.list(r.id, order="asc", limit=2, after=asc.last_id)
            one = client.responses.input_items.list(plain.id)
            errors = {}
            for key, call in {
                "missing": lambda: client.responses.input_items.list("resp_no"),
                "limit": lambda: client.responses.input_items.list(r.id, limit=0),
                "after": lambda: client.responses.input_items.list(r.id, after="msg_no"),
            }.items():
                try:
                    call()
                except openai.APIStatusError as exc:
                    errors[key] = exc
            raw = httpx.get(f"{daemon.url}/v1/responses/{r.id}/input_items", params={"order": "up"})
            return desc, asc, rest, one, errors, raw

    with trio.fail_after(60):
        desc, asc, rest, one, errors, raw = await trio.to_thread.run_sync(calls)
    texts = [item.content[0].text for item in desc.data]
    assert texts == ["And again", "Hello", "Answer in English."]  # newest first by default
    assert [i.role for i in desc.data] == ["user", "user", "developer"]
    assert all(i.type == "message" and i.id.startswith("msg_") for i in desc.data)
    assert len({i.id for i in desc.data}) == 3 and desc.has_more is False
    assert desc.first_id == desc.data[0].id and desc.last_id == desc.data[-1].id
    assert [i.id for i in asc.data] == [i.id for i in desc.data[::-1][:2]] and asc.has_more is True
    assert [i.id for i in rest.data] == [desc.data[0].id] and rest.has_more is False
    assert [(i.role, i.content[0].text) for i in one.data] == [("user", "Hi")]
    assert isinstance(errors["missing"], openai.NotFoundError)
    assert isinstance(errors["limit"], openai.BadRequestError) and isinstance(errors["after"], openai.BadRequestError)
    assert raw.status_code == 400 and "order" in raw.json()["error"]["message"]


def test_store_is_bounded_and_expires():
    now = [0.0]
    store = ResponseStore(max_items=2, ttl=10.0, clock=lambda: now[0])
    for rid in ("a", "b", "c"):
        store.put({"id": rid}, [])
    assert [r for r in ("a", "b", "c") if _has(store, r)] == ["b", "c"]
    now[0] = 10.0
    assert not _has(store, "c") and not store._items


def _has(store: ResponseStore, rid: str) -> bool:
    try:
        store.get(rid)
        return True
    except Exception:
        return False


class Capital(pydantic.BaseModel):
    country: str
    capital: str


async def test_parse_stream_and_tools_with_smollm2(smol_models_dir):
    with trio.fail_after(300):
        async with trio.open_nursery() as n:
            d = await start_daemon(n, smol_models_dir)

            def calls():
                with _client(d.url) as client:
                    parsed = client.responses.parse(
                        model="smol",
                        input="What is the capital of France?",
                        text_format=Capital,
                        max_output_tokens=60,
                        temperature=0,
                    )
                    with client.responses.stream(
                        model="smol", input="Say hello.", max_output_tokens=40, temperature=0
                    ) as stream:
                        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                        streamed = stream.get_final_response()
                    call = client.responses.create(
                        model="smol",
                        input="What is the weather in Paris?",
                        tools=[WEATHER],
                        tool_choice="required",
                        max_output_tokens=60,
                    )
                    fc = call.output[0]
                    answer = client.responses.create(
                        model="smol",
                        previous_response_id=call.id,
                        tools=[WEATHER],
                        tool_choice="none",
                        max_output_tokens=30,
                        temperature=0,
                        input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "22 degrees"}],
                    )
                    with client.responses.stream(
                        model="smol",
                        input="What is the weather in Paris?",
                        tools=[WEATHER],
                        tool_choice={"type": "function", "name": "get_weather"},
                        max_output_tokens=60,
                    ) as stream:
                        args = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
                        streamed_call = stream.get_final_response()
                    # The same conversation given as items instead of previous_response_id.
                    as_items = client.responses.create(
                        model="smol",
                        tools=[WEATHER],
                        max_output_tokens=30,
                        temperature=0,
                        tool_choice="none",
                        input=[
                            {"role": "user", "content": "What is the weather in Paris?"},
                            {
                                "type": "function_call",
                                "call_id": fc.call_id,
                                "name": fc.name,
                                "arguments": fc.arguments,
                            },
                            {"type": "function_call_output", "call_id": fc.call_id, "output": "22 degrees"},
                        ],
                    )
                    return parsed, deltas, streamed, call, answer, args, streamed_call, as_items

            parsed, deltas, streamed, call, answer, args, streamed_call, as_items = await trio.to_thread.run_sync(calls)
            d.shutdown.set()
    assert isinstance(parsed.output_parsed, Capital) and parsed.output_parsed.capital
    assert streamed.status == "completed" and "".join(deltas) == streamed.output_text
    fc = call.output[0]
    assert fc.type == "function_call" and fc.name == "get_weather" and fc.call_id.startswith("call_")
    jsonschema.validate(json.loads(fc.arguments), WEATHER["parameters"])
    assert answer.output[0].type == "message" and answer.output_text
    assert answer.usage.input_tokens == as_items.usage.input_tokens  # the same prompt both ways
    assert answer.output_text == as_items.output_text
    sc = streamed_call.output[0]
    assert sc.type == "function_call" and sc.name == "get_weather" and "".join(args) == sc.arguments
    jsonschema.validate(json.loads(sc.arguments), WEATHER["parameters"])
