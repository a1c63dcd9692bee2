"""Responses API streaming: each function call goes out as its own output item the moment its
text completes (as chat completions streams calls), read with the official openai SDK.

The tiny random model writes what a JSON-schema grammar (text.format) leaves it: an array of
two calls, the second with a long argument, and max_output_tokens ends the answer inside that
second call. The first call was complete long before: it is streamed and kept; the old
behaviour (calls parsed from the whole text at the end) found no call in the cut-off text."""

from __future__ import annotations

import json

import openai
import trio

PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
LONG = {"name": "get_weather", "arguments": {"city": "x" * 300}}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def _two_calls(max_tokens: int, long: dict = LONG):
    schema = {
        "type": "array",
        "prefixItems": [{"const": PARIS}, {"const": long}],
        "items": False,
        "minItems": 2,
        "maxItems": 2,
    }
    return dict(
        model="tiny",
        input="Weather in Paris, then somewhere else?",
        tools=[WEATHER],
        text={"format": {"type": "json_schema", "name": "calls", "schema": schema}},
        max_output_tokens=max_tokens,
        temperature=0,
    )


async def test_a_call_streams_when_it_completes(daemon):
    def calls():
        with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0) as client:
            # (the SDK's stream helper wants response.completed: an incomplete one is read raw)
            events = list(client.responses.create(stream=True, **_two_calls(60)))
            whole_cut = client.responses.create(**_two_calls(60))  # the same items without streaming
            cut = [(e.type, getattr(e, "item", None)) for e in events]
            cut_final = events[-1].response
            short = {"name": "get_weather", "arguments": {"city": "Rome"}}
            with client.responses.stream(**_two_calls(200, short)) as stream:
                whole = [(e.type, getattr(e, "item", None)) for e in stream]
                whole_final = stream.get_final_response()
        return cut, cut_final, whole, whole_final, whole_cut

    with trio.fail_after(120):
        cut, cut_final, whole, whole_final, whole_cut = await trio.to_thread.run_sync(calls)
    # Cut off inside the second call: the first went out whole and is the answer's only item.
    assert cut[-1][0] == "response.incomplete" and cut_final.status == "incomplete"
    assert [o.type for o in cut_final.output] == ["function_call"]
    assert (cut_final.output[0].name, json.loads(cut_final.output[0].arguments)) == ("get_weather", {"city": "Paris"})
    assert [(o.type, o.arguments) for o in whole_cut.output] == [(o.type, o.arguments) for o in cut_final.output]
    assert whole_cut.status == "incomplete"
    done = [item for kind, item in cut if kind == "response.output_item.done"]
    assert [i.id for i in done] == [o.id for o in cut_final.output]
    # Both complete: one item each, in order, each added, given its arguments and done in turn.
    kinds = [k for k, _ in whole if k.startswith(("response.output_item", "response.function_call_arguments"))]
    per_call = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert kinds == per_call * 2
    assert [json.loads(o.arguments)["city"] for o in whole_final.output] == ["Paris", "Rome"]
    assert whole_final.status == "completed"
