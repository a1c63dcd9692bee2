"""Thinking: the request's ``think``, what the chat template can do with it, and the splitter that
separates a model's reasoning from its answer as the text streams.

A template thinks when it knows the ``<think>``/``</think>`` pair (Ollama's own test: both tags,
or the ``content.split('</think>')`` that strips earlier reasoning). It may switch thinking on
and off through ``enable_thinking`` (Qwen 3, SmolLM3, llama.cpp's DeepSeek-R1) or set its depth
through ``reasoning_effort`` (gpt-oss); one with neither always thinks. Whether an answer begins
inside the reasoning is read off the rendered prompt: one that ends in ``<think>`` (DeepSeek-R1's
generation prompt) starts the answer as thinking, up to ``</think>``.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import BadRequest

LEVELS = ("low", "medium", "high")
OPEN, CLOSE = "<think>", "</think>"

Think = bool | str | None  # None: the request did not say


def parse_think(value: Any) -> Think:
    """Ollama's ``think``: true/false or "low"/"medium"/"high" ("max" is read as "high")."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in (*LEVELS, "max"):
        return "high" if value == "max" else value
    raise BadRequest('think must be true, false, "low", "medium" or "high"')


def think_from_effort(effort: Any) -> Think:
    """OpenAI's ``reasoning_effort`` as a think value: "none" turns it off, the tiers past either
    end of Ollama's are clamped to the nearest (as Ollama's OpenAI layer does)."""
    if effort is None:
        return None
    mapping = {
        "none": False,
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "xhigh": "high",
        "max": "high",
    }
    if not isinstance(effort, str) or effort not in mapping:
        raise BadRequest('reasoning_effort must be one of "none", "minimal", "low", "medium", "high", "xhigh"')
    return mapping[effort]


@attrs.frozen
class Style:
    """How a template thinks. ``switch`` is the template variable that controls it, if any."""

    switch: str | None = None  # "enable_thinking" | "reasoning_effort" | None (always thinks)
    open: str = OPEN
    close: str = CLOSE
    harmony: bool = False  # gpt-oss: channels instead of tags


def style_of(template: str | None) -> Style | None:
    """The thinking style of a Jinja chat template, or None when it does not think."""
    if not template:
        return None
    if "<|channel|>" in template and "analysis" in template:
        return Style("reasoning_effort", harmony=True)
    tags = OPEN in template and CLOSE in template
    strips = "split('</think>')" in template or 'split("</think>")' in template
    if not (tags or strips):
        return None
    if "enable_thinking" in template or ".Think" in template or ".IsThinkSet" in template:
        return Style("enable_thinking")  # Go templates' .Think comes from enable_thinking
    if "reasoning_effort" in template:
        return Style("reasoning_effort")
    return Style()


@attrs.frozen
class Plan:
    """What one request does about thinking: the template's variables, and whether the
    reasoning is returned (``show``) or only taken out of the answer."""

    style: Style | None
    show: bool
    level: str | None = None

    @property
    def template_vars(self) -> dict[str, Any]:
        if self.style is None or self.style.switch is None:
            return {}
        if self.style.switch == "enable_thinking":
            return {"enable_thinking": self.show}
        return {"reasoning_effort": self.level or ("medium" if self.show else "low")}

    def splitter(self, prompt_tail: str) -> Splitter | None:
        """The splitter for an answer that follows a prompt ending in ``prompt_tail``."""
        if self.style is None:
            return None
        if self.style.harmony:
            return HarmonySplitter()
        return Splitter(self.style.open, self.style.close, thinking=prompt_tail.rstrip().endswith(self.style.open))


def plan(template: str | None, think: Think, model: str, *, strict: bool = True) -> Plan:
    """As Ollama: a model that thinks does so unless asked not to; asking one that cannot is a
    400 (``strict``; else it answers without). ``think: false`` on a model that cannot stop
    thinking keeps its reasoning out of the answer without returning it."""
    style = style_of(template)
    if style is None:
        if strict and think not in (None, False):
            raise BadRequest(f'"{model}" does not support thinking')
        return Plan(None, False)
    show = think is None or think is not False
    return Plan(style, show, think if isinstance(think, str) else None)


class Splitter:
    """Reasoning and answer out of a stream of text pieces.

    Leading whitespace before the opening tag is dropped, as is whitespace right after either
    tag (Ollama's parser does the same). Text that might be the start of a tag is held until the
    next piece decides it; ``finish`` releases what is held. An answer that does not begin with
    the opening tag (after whitespace) is all answer, unless the prompt left it thinking.
    """

    def __init__(self, open_tag: str = OPEN, close_tag: str = CLOSE, *, thinking: bool = False):
        self.open, self.close = open_tag, close_tag
        self._held = ""
        # "start": before any text; "think_lead": thinking, eating whitespace; "think";
        # "answer_lead": after the close tag, eating whitespace; "answer".
        self._state = "think_lead" if thinking else "start"

    @property
    def thinking(self) -> bool:
        return self._state in ("think_lead", "think")

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) that can be shown now."""
        self._held += text
        thought, said = [], []
        while self._step(thought, said):
            pass
        return "".join(thought), "".join(said)

    def finish(self) -> tuple[str, str]:
        """Whatever is held: an unfinished tag is taken as text of the part it was in."""
        held, self._held = self._held, ""
        if self._state in ("think_lead", "think"):
            return held, ""
        if self._state == "start":
            return "", held
        return "", held.lstrip() if self._state == "answer_lead" else held

    def _step(self, thought: list[str], said: list[str]) -> bool:
        s = self._held
        if self._state == "start":
            trimmed = s.lstrip()
            if trimmed.startswith(self.open):
                self._held, self._state = trimmed[len(self.open) :], "think_lead"
                return True
            if not trimmed or self.open.startswith(trimmed):
                return False  # whitespace or a partial tag: wait
            self._held, self._state = "", "answer"
            said.append(s)
            return False
        if self._state in ("think_lead", "answer_lead"):  # whitespace after a tag is dropped
            self._held = s.lstrip()
            if not self._held:
                return False
            self._state = self._state.removesuffix("_lead")
            return True
        if self._state == "think":
            at = s.find(self.close)
            if at >= 0:
                thought.append(s[:at])
                self._held, self._state = s[at + len(self.close) :], "answer_lead"
                return True
            keep = _overlap(s, self.close)
            thought.append(s[: len(s) - keep])
            self._held = s[len(s) - keep :]
            return False
        self._held = ""
        said.append(s)
        return False


class HarmonySplitter:
    """gpt-oss's harmony format: each message is ``<|channel|>NAME ...<|message|>TEXT<|end|>``
    (later ones after ``<|start|>assistant``). The analysis channel is the reasoning, the final
    channel the answer; a commentary message (a tool call) stays whole in the answer for the
    tool-call reader. Needs the channel tokens in the text (generation.py writes them back)."""

    _MESSAGE, _END = "<|message|>", "<|end|>"

    def __init__(self) -> None:
        self._held = ""
        self._mode = "header"  # "header" | "analysis" | "final" | "other"

    @property
    def thinking(self) -> bool:
        return self._mode == "analysis"

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        thought, said = [], []
        while True:
            s = self._held
            if self._mode == "header":
                at = s.find(self._MESSAGE)
                if at < 0:
                    if s and not s.lstrip().startswith(("<", "assistant")):
                        self._mode, self._held = "final", ""  # not harmony at all: plain answer
                        said.append(s)
                    return "".join(thought), "".join(said)
                header, self._held = s[:at], s[at + len(self._MESSAGE) :]
                if "analysis" in header:
                    self._mode = "analysis"
                elif "final" in header:
                    self._mode = "final"
                else:  # commentary: a tool call, read later from the text as written
                    self._mode = "other"
                    said.append(header[header.find("<|channel|>") :] if "<|channel|>" in header else header)
                    said.append(self._MESSAGE)
                continue
            at = s.find(self._END)
            out = thought if self._mode == "analysis" else said
            if at >= 0:
                out.append(s[:at])
                self._held, self._mode = s[at + len(self._END) :], "header"
                continue
            keep = _overlap(s, self._END)
            out.append(s[: len(s) - keep])
            self._held = s[len(s) - keep :]
            return "".join(thought), "".join(said)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self._mode == "analysis" else ("", held if self._mode != "header" else "")


def _overlap(s: str, tag: str) -> int:
    """The longest end of ``s`` that begins ``tag``."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0


def strip_thinking(content: str) -> str:
    """An earlier answer's text without its reasoning, for templates that replay answers."""
    if CLOSE in content:
        return content.split(CLOSE)[-1].lstrip()
    return content
