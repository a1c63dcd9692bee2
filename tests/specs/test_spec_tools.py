"""Tools: the generic prompt for templates that ignore them, and the call shapes parsed back."""

from __future__ import annotations

import json

from mlxserve.specs.templates import CHATML_TEMPLATE, render_chat
from mlxserve.specs.tools import (
    as_template_tools, call_schema, normalize_tools, parse_tool_calls, tool_prompt, with_tool_prompt,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = normalize_tools([WEATHER])


def test_tool_prompt_carries_each_schema_and_the_call_format():
    text = tool_prompt(as_template_tools(TOOLS))
    listed = json.loads(text[text.index("["):text.index("\n]\n") + 2])
    assert listed == [{"name": "get_weather", "description": "Weather for a city",
                       "parameters": WEATHER["function"]["parameters"]}]
    assert '{"name": "<tool name>", "arguments":' in text
    # The format it asks for is the one parsed back, and the one a forced call's schema allows.
    answer = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_tool_calls(answer, TOOLS) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert set(call_schema(TOOLS)["properties"]) == {"name", "arguments"}


def test_with_tool_prompt_joins_the_system_message_or_becomes_one():
    user = {"role": "user", "content": "Weather in Paris?"}
    alone = with_tool_prompt([user], TOOLS)
    assert alone[0]["role"] == "system" and "get_weather" in alone[0]["content"] and alone[1:] == [user]
    joined = with_tool_prompt([{"role": "system", "content": "Be brief."}, user], TOOLS)
    assert len(joined) == 2 and joined[0]["content"].startswith("Be brief.\n\nYou can call")
    out = render_chat(CHATML_TEMPLATE, joined)
    assert out.count("<|im_start|>system") == 1 and "Weather for a city" in out


def test_earlier_calls_are_written_as_the_json_the_model_was_asked_for():
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22 C"},
    ]
    out = with_tool_prompt(history, TOOLS)
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3] == history[2] and history[1]["content"] == ""  # the caller's list is untouched


def test_llama_cpp_style_calls_are_parsed_too():
    wrapped = '{"tool_call": {"name": "get_weather", "arguments": {"city": "Rome"}}}'
    assert parse_tool_calls(wrapped, TOOLS) == [{"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert parse_tool_calls('{"response": "It is sunny."}', TOOLS) is None
