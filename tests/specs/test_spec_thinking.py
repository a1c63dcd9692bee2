"""Thinking: the request's think values, which templates think, and the splitter on crafted
token streams (tags split across pieces, no closing tag, whitespace, a prompt that opens it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs import templates, thinking
from mlxserve.specs.modelspec import ModelSpec
from mlxserve.specs.thinking import Splitter

DATA = Path(__file__).parent / "data" / "templates"


def _template(name: str) -> str:
    return (DATA / name).read_text()


def _run(pieces: list[str], **kw) -> tuple[str, str, list[tuple[str, str]]]:
    s = Splitter(**kw)
    steps = [s.feed(p) for p in pieces]
    end = s.finish()
    steps.append(end)
    return "".join(t for t, _ in steps), "".join(c for _, c in steps), steps


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>", "Let me see.", "</think>", "Paris."],
        ["<th", "ink>\n", "Let me", " see.</th", "ink>\n\n", "Paris."],
        ["  <think>Let me see.</think>Paris."],
        list("<think>\nLet me see.\n</think>\n\nParis."),
    ],
)
def test_reasoning_and_answer_come_apart_however_the_tags_are_cut(pieces):
    thought, said, _ = _run(pieces)
    assert thought.strip() == "Let me see." and said == "Paris."


def test_text_that_might_be_a_tag_is_held_until_decided():
    s = Splitter()
    assert s.feed("<thi") == ("", "")  # could still be <think>
    assert s.feed("ng>") == ("", "<thing>")  # it was not: all answer from here on
    s = Splitter(thinking=True)
    assert s.feed("so </thi") == ("so ", "")  # the end may be a closing tag: held
    assert s.feed("s is it") == ("</this is it", "")


def test_an_answer_without_tags_is_all_answer():
    thought, said, steps = _run(["Paris", " is the", " capital."])
    assert (thought, said) == ("", "Paris is the capital.")
    assert steps[0] == ("", "Paris")  # streamed as it comes, nothing held


def test_a_prompt_that_opens_the_reasoning_makes_the_answer_start_inside_it():
    thought, said, _ = _run(["Hmm, ", "two.", "</think>", "\n2"], thinking=True)
    assert (thought, said) == ("Hmm, two.", "2")


def test_no_closing_tag_leaves_everything_as_reasoning_even_a_partial_tag():
    thought, said, _ = _run(["still thinking", " </thi"], thinking=True)
    assert (thought, said) == ("still thinking </thi", "")


def test_a_later_think_tag_in_the_answer_is_answer_text():
    thought, said, _ = _run(["<think>a</think>b <think>c"])
    assert (thought, said) == ("a", "b <think>c")


@pytest.mark.parametrize(
    "value, expected", [(None, None), (True, True), (False, False), ("low", "low"), ("high", "high"), ("max", "high")]
)
def test_think_values(value, expected):
    assert thinking.parse_think(value) == expected


@pytest.mark.parametrize("value", ["yes", 1, "Medium", {"x": 1}])
def test_bad_think_values_are_400s(value):
    with pytest.raises(BadRequest, match="think must be"):
        thinking.parse_think(value)


@pytest.mark.parametrize(
    "effort, expected", [("none", False), ("minimal", "low"), ("medium", "medium"), ("xhigh", "high"), (None, None)]
)
def test_reasoning_effort_maps_onto_think(effort, expected):
    assert thinking.think_from_effort(effort) == expected
    with pytest.raises(BadRequest, match="reasoning_effort"):
        thinking.think_from_effort("extreme")


@pytest.mark.parametrize(
    "name, switch",
    [
        ("Qwen-Qwen3-0.6B.jinja", "enable_thinking"),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "enable_thinking"),
    ],
)
def test_templates_that_think(name, switch):
    assert thinking.style_of(_template(name)).switch == switch


@pytest.mark.parametrize(
    "name",
    [
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    ],
)
def test_templates_that_do_not_think(name):
    assert thinking.style_of(_template(name)) is None
    with pytest.raises(BadRequest, match='"m" does not support thinking'):
        thinking.plan(_template(name), True, "m")
    assert thinking.plan(_template(name), False, "m").splitter("x") is None


def _prompt(name: str, think) -> str:
    p = thinking.plan(_template(name), think, "m")
    return templates.render_chat(
        _template(name), [{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>", **p.template_vars
    )


def test_qwen3_thinks_unless_asked_not_to():
    assert _prompt("Qwen-Qwen3-0.6B.jinja", None).endswith("<|im_start|>assistant\n")
    assert _prompt("Qwen-Qwen3-0.6B.jinja", True).endswith("<|im_start|>assistant\n")
    assert _prompt("Qwen-Qwen3-0.6B.jinja", False).endswith("<think>\n\n</think>\n\n")
    plan = thinking.plan(_template("Qwen-Qwen3-0.6B.jinja"), None, "m")
    assert plan.show and not plan.splitter(_prompt("Qwen-Qwen3-0.6B.jinja", None)).thinking


def test_deepseek_r1_prompt_opens_the_reasoning():
    name = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
    prompt = _prompt(name, True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert thinking.plan(_template(name), True, "m").splitter(prompt).thinking
    # think: false closes it in the prompt (this template's enable_thinking switch)
    closed = _prompt(name, False)
    assert closed.endswith("</think>") and not thinking.plan(_template(name), False, "m").splitter(closed).thinking


def test_the_thinking_capability_follows_the_template():
    think = ModelSpec(format="gguf", template=_template("Qwen-Qwen3-0.6B.jinja"))
    plain = ModelSpec(format="gguf", template=_template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    embed = ModelSpec(format="gguf", capabilities=["embedding"], template=_template("Qwen-Qwen3-0.6B.jinja"))
    assert think.reported_capabilities() == ["completion", "tools", "thinking"]
    assert plain.reported_capabilities() == ["completion", "tools"]
    assert "thinking" not in embed.reported_capabilities()


HARMONY = [
    "<|channel|>",
    "analysis",
    "<|message|>",
    "The user greets.",
    " Reply",
    " kindly.<|e",
    "nd|>",
    "<|start|>",
    "assistant",
    "<|channel|>",
    "final",
    "<|message|>",
    "Hello",
    "!",
]


def test_gpt_oss_harmony_channels_come_apart():
    style = thinking.style_of(_template("openai-gpt-oss-120b.jinja"))
    assert style.harmony and style.switch == "reasoning_effort"
    p = thinking.plan(_template("openai-gpt-oss-120b.jinja"), "high", "m")
    assert p.template_vars == {"reasoning_effort": "high"}
    prompt = templates.render_chat(
        _template("openai-gpt-oss-120b.jinja"), [{"role": "user", "content": "hi"}], **p.template_vars
    )
    assert "Reasoning: high" in prompt
    s = p.splitter(prompt)
    steps = [s.feed(x) for x in HARMONY] + [s.finish()]
    assert "".join(t for t, _ in steps) == "The user greets. Reply kindly."
    assert "".join(c for _, c in steps) == "Hello!"
    assert steps[3] == ("The user greets.", "")  # streamed as it comes


def test_a_harmony_tool_call_stays_whole_for_the_tool_reader():
    from mlxserve.specs.tools import parse_tool_calls

    s = thinking.HarmonySplitter()
    pieces = [
        "<|channel|>analysis<|message|>Need weather.<|end|>",
        "<|start|>assistant",
        "<|channel|>commentary to=functions.get_weather <|constrain|>json",
        "<|message|>",
        '{"city": "Paris"}',
    ]
    steps = [s.feed(x) for x in pieces] + [s.finish()]
    thought, said = "".join(t for t, _ in steps), "".join(c for _, c in steps)
    assert thought == "Need weather."
    assert parse_tool_calls(said, [{"name": "get_weather"}]) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]
