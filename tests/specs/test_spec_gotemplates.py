"""Ollama's Go templates, translated into Jinja: every template of ollama/ollama's template/
directory renders exactly what Ollama renders (its own testdata), the library's templates with
tools and calls render Ollama's JSON, the per-turn form without .Messages is cut after .Response
as Ollama cuts it, and anything else is refused with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs import thinking
from mlxserve.specs.gotemplate import translate
from mlxserve.specs.templates import check_template, is_go_template, render_chat
from mlxserve.specs.tools import parse_tool_calls

DATA = Path(__file__).parent / "data" / "gotemplates"
HELLO = {"role": "user", "content": "Hello, how are you?"}
FINE = {"role": "assistant", "content": "I'm doing great. How can I help you today?"}
SHOW = {"role": "user", "content": "I'd like to show off how chat templating works!"}
CASES = {  # Ollama's template_test.go conversations, named as its testdata files are
    "user": [HELLO],
    "user-assistant-user": [HELLO, FINE, SHOW],
    "system-user-assistant-user": [{"role": "system", "content": "You are a helpful assistant."}, HELLO, FINE, SHOW],
}
# Ollama's own test drops one trailing space of these before comparing.
TRAILING_SPACE = {"llama2-chat", "mistral-instruct", "openchat", "vicuna"}


@pytest.mark.parametrize("name", sorted(p.stem for p in DATA.glob("*.gotmpl")))
@pytest.mark.parametrize("case", sorted(CASES))
def test_renders_exactly_what_ollama_renders(name, case):
    text = (DATA / f"{name}.gotmpl").read_text()
    assert is_go_template(text)
    check_template(text)
    out = render_chat(text, CASES[case])
    if name in TRAILING_SPACE and out.endswith(" "):
        out = out[:-1]
    assert out == (DATA / name / case).read_text()


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"description": "the city", "type": "string"}},
        },
    },
}
CALLED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "22 C"},
]


def test_library_qwen25_writes_tools_and_calls_as_ollama_marshals_them():
    out = render_chat((DATA / "library" / "qwen2.5.gotmpl").read_text(), CALLED, tools=[WEATHER])
    # struct field order (type, required, properties), property fields in struct order, compact
    assert (
        '{"type": "function", "function": {"name":"get_weather","description":"Weather for a city",'
        '"parameters":{"type":"object","required":["city"],"properties":{"city":'
        '{"type":"string","description":"the city"}}}}}'
    ) in out
    turn = out.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert turn == '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'
    assert parse_tool_calls(turn, [WEATHER["function"]]) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert out.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_library_llama31_lists_tools_in_the_last_user_turn():
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    out = render_chat((DATA / "library" / "llama3.1.gotmpl").read_text(), msgs, tools=[WEATHER])
    listed = out.split("Do not use variables.\n\n")[1].split("\n\nWeather in Paris?")[0]
    assert json.loads(listed) == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "required": ["city"],
                    "properties": {"city": {"type": "string", "description": "the city"}},
                },
            },
        }
    ]
    assert out.endswith("Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_without_messages_runs_per_turn_and_stops_after_the_response():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]
    out = render_chat((DATA / "library" / "phi4.gotmpl").read_text(), msgs)
    assert out == (
        "<|im_start|><|system|><|im_sep|>Be brief.<|im_end|><|im_start|><|user|><|im_sep|>Hi<|im_end|>"
        "<|im_start|><|assistant|><|im_sep|>Hello!<|im_end|>"
        "<|im_start|><|user|><|im_sep|>Again<|im_end|><|im_start|><|assistant|><|im_sep|>"
    )
    # no .Response at all: Ollama appends one
    assert render_chat("{{ .System }}|{{ .Prompt }}|", msgs) == "Be brief.|Hi|Hello!|Again|"


THINKS = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    "{{ if and .IsThinkSet (not .Think) }}<think>\n\n</think>\n\n{{ end }}"
)


def test_go_templates_think_through_dot_think():
    style = thinking.style_of(THINKS)
    assert style is not None and style.switch == "enable_thinking"
    msgs = [HELLO]
    on = render_chat(THINKS, msgs, **thinking.plan(THINKS, True, "m").template_vars)
    off = render_chat(THINKS, msgs, **thinking.plan(THINKS, False, "m").template_vars)
    assert on.endswith("assistant\n") and off.endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    "text, what",
    [
        ('{{ template "x" . }}', "template"),
        ('{{ define "x" }}a{{ end }}', "define"),
        ("{{ range .Tools }}{{ toTypeScriptType .Function }}{{ end }}{{ .Messages }}", "toTypeScriptType"),
        ("{{ if .System }}never closed", "end"),
        ("{{ .Prompt }} {{ end }}", "unexpected"),
    ],
)
def test_the_rest_is_refused_with_what_it_uses(text, what):
    with pytest.raises(BadRequest, match=f"(?s){what}.*does not translate"):
        check_template(text)
    with pytest.raises(BadRequest, match="does not translate"):
        render_chat(text, [HELLO])


def test_translation_is_cached():
    text = (DATA / "chatml.gotmpl").read_text()
    assert translate(text) is translate(text)


def test_deep_nesting_and_long_actions_are_refused_quickly():
    deep = "{{ if .System }}" * 500 + "x" + "{{ end }}" * 500
    with pytest.raises(BadRequest, match="nested more than"):
        check_template(deep)
    with pytest.raises(BadRequest, match="does not translate"):
        check_template("{{ .Prompt " + "+" * 200_000 + " }}")
    with pytest.raises(BadRequest, match="nested more than"):
        check_template("{{ .System }}{{ " + "(" * 2000 + ".Prompt" + ")" * 2000 + " }}")
    with pytest.raises(BadRequest, match="nests too deeply"):  # the same in Jinja
        check_template("{{ " + "(" * 2000 + "x" + ")" * 2000 + " }}")
