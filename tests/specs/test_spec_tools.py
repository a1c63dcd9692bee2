"""Tools: the generic prompt for templates that ignore them, and the call shapes parsed back."""

from __future__ import annotations

import json

import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs.templates import CHATML_TEMPLATE, render_chat
from mlxserve.specs.tools import (
    as_template_tools,
    call_schema,
    function_tools,
    normalize_tools,
    parse_tool_calls,
    tool_prompt,
    with_tool_prompt,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = normalize_tools([WEATHER])


def test_tool_prompt_carries_each_schema_and_the_call_format():
    text = tool_prompt(as_template_tools(TOOLS))
    listed = json.loads(text[text.index("[") : text.index("\n]\n") + 2])
    assert listed == [
        {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER["function"]["parameters"]}
    ]
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
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "22 C"},
    ]
    out = with_tool_prompt(history, TOOLS)
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3] == history[2] and history[1]["content"] == ""  # the caller's list is untouched


def test_llama_cpp_style_calls_are_parsed_too():
    wrapped = '{"tool_call": {"name": "get_weather", "arguments": {"city": "Rome"}}}'
    assert parse_tool_calls(wrapped, TOOLS) == [{"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert parse_tool_calls('{"response": "It is sunny."}', TOOLS) is None


# ---- call shapes by family: what each real template writes for an earlier call is read back ----

from pathlib import Path  # noqa: E402

from mlxserve.specs.tools import completed_calls, might_be_call  # noqa: E402

TEMPLATES = Path(__file__).parent / "data" / "templates"
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "22 C", "tool_call_id": "abcdefghi"},
]


@pytest.mark.parametrize(
    "template, start, end",
    [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_start|>assistant\n", "<|im_end|>"),
        ("Qwen-Qwen3-0.6B.jinja", "<|im_start|>assistant\n", "<|im_end|>"),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", "assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "[/INST]", "</s>"),
        ("openai-gpt-oss-120b.jinja", "<|start|>assistant", "<|start|>functions"),
    ],
)
def test_each_familys_own_call_shape_is_read_back(template, start, end):
    text = render_chat(
        (TEMPLATES / template).read_text(),
        HISTORY,
        tools=as_template_tools(TOOLS),
        add_generation_prompt=False,
        bos_token="<s>",
        eos_token="</s>",
    )
    turn = text[text.index(start, text.index("Weather in Paris?")) + len(start) :]
    turn = turn[: turn.index(end)]
    assert parse_tool_calls(turn, TOOLS) == [PARIS], turn
    assert might_be_call(turn[:5])  # held back while it streams


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
        (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "Rome"}}',
            [PARIS, {"name": "get_weather", "arguments": {"city": "Rome"}}],
        ),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', [PARIS]),
        (
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
            [PARIS, {"name": "get_weather", "arguments": {"city": "Rome"}}],
        ),
        (
            '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
            [PARIS],
        ),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', [PARIS]),
    ],
)
def test_more_shapes(text, expected):
    assert parse_tool_calls(text, TOOLS) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3]",
        '{"name": "unknown_tool", "arguments": {}}',
        'get_weather{"city": "Paris"}',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}] and then some prose',
        "Sure! Here it is.",
    ],
)
def test_text_that_is_not_wholly_calls_is_text(text):
    assert parse_tool_calls(text, TOOLS) is None


@pytest.mark.parametrize(
    "pieces",
    [
        [
            "<tool_call>\n",
            '{"name": "get_weather", ',
            '"arguments": {"city": "Paris"}}',
            "\n</tool_call>",
            "\n<tool_call>",
            '{"name": "get_weather", "arguments": {"city": "Rome"}}',
            "</tool_call>",
        ],
        [
            "[TOOL_CALLS][",
            '{"name": "get_weather", "arguments": {"city": "Paris"}}',
            ", ",
            '{"name": "get_weather", "arguments": {"city": "Rome"}}',
            "]",
        ],
        [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            "; ",
            '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        ],
    ],
)
def test_streamed_calls_are_read_as_each_completes(pieces):
    seen, so_far = [], ""
    for p in pieces:
        so_far += p
        seen.append(len(completed_calls(so_far, TOOLS)))
    assert seen[-1] == 2 and 1 in seen  # the first call was out before the second was written
    assert seen == sorted(seen)
    assert parse_tool_calls(so_far, TOOLS) == [PARIS, {"name": "get_weather", "arguments": {"city": "Rome"}}]


def test_call_stream_shows_text_and_each_call_as_it_completes():
    from mlxserve.specs.tools import CallStream

    s = CallStream(TOOLS)
    steps = [
        s.feed(p)
        for p in [
            "Let me ",
            "check.\n<tool",
            '_call>\n{"name": "get_weather", ',
            '"arguments": {"city": "Paris"}}\n</tool_call>',
            "\n<tool_call>",
            '{"name": "get_weather", "arguments": {"city": "Rome"}}',
        ]
    ]
    steps.append(s.finish())
    assert [t for t, _ in steps] == ["Let me ", "check.\n", "", "", "", "", ""]  # the tag is held
    assert [len(c) for _, c in steps] == [0, 0, 0, 1, 0, 1, 0]  # each call once, when its JSON is whole
    plain = CallStream(TOOLS)
    assert plain.feed("{curly") == ("", []) and plain.finish() == ("{curly", [])  # not a call after all
    assert CallStream(TOOLS).feed("Paris is") == ("Paris is", [])


def test_another_dialects_tools_normalize_as_openais():
    """Anthropic's custom tools come out as OpenAI's function tools do; a built-in tool is a 400
    naming it before any other problem, and the checks of a function are the same."""

    def as_function(t: dict) -> dict:  # as http/anthropic.py reads a tool
        return {"name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("input_schema")}

    schema = WEATHER["function"]["parameters"]
    custom = {"name": "get_weather", "description": WEATHER["function"]["description"], "input_schema": schema}
    assert function_tools([custom], "custom", "custom", as_function) == normalize_tools([WEATHER])
    assert function_tools(None, "custom", "custom", as_function) == []
    with pytest.raises(BadRequest, match=r"tools\[1\]: only custom tools are supported, not 'web_search'"):
        function_tools([{"name": ""}, {"type": "web_search"}], "custom", "custom", as_function)
    with pytest.raises(BadRequest, match=r"tools\[0\].function.name is required"):
        function_tools([{"name": ""}], "custom", "custom", as_function)
    with pytest.raises(BadRequest, match="tools must be an array"):
        function_tools({"name": "x"}, "function", None, lambda t: t)
