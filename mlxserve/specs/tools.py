"""Tool definitions in, tool calls out: validation, the schema that forces a call, the generic
prompt for templates that do not render tools, and parsing.

Models write calls in the shape their chat template shows them, by family:

- Hermes, Qwen 2.5/3, SmolLM: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks;
- Llama 3.x: a bare ``{"name": ..., "parameters": ...}`` object (after ``<|python_tag|>`` when
  the model writes it), several separated by ``;``;
- Mistral: ``[TOOL_CALLS]`` then a JSON array of calls, or (newer templates)
  ``[TOOL_CALLS]name[ARGS]{...}`` for each;
- gpt-oss (harmony): ``to=functions.name ... <|message|>{...}<|call|>``;
- the generic prompt's (``tool_prompt``) bare object or array, also llama.cpp's
  ``{"tool_call": {...}}`` wrapper.

Every shape is read whatever the template (a fine-tune may answer in its base's shape). A
streamed answer's calls are read as each completes (``completed_calls``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from ..errors import BadRequest

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_HARMONY = re.compile(
    r"to=functions\.([\w.\-]+)(?:[^<]|<\|channel\|>|<\|constrain\|>)*?<\|message\|>(.*?)(?:<\|call\|>|$)", re.S
)
PYTHON_TAG, MISTRAL_CALLS, MISTRAL_ARGS = "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]"
CALL_PREFIXES = ("<tool_call>", "{", "[", PYTHON_TAG, "<|channel|>", "to=functions.")
# Tokens that open or shape a call; a tokenizer may hold them as special tokens, which decoding
# drops, so the HTTP layer writes them back into the text (generation.py).
MARKER_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    PYTHON_TAG,
    MISTRAL_CALLS,
    MISTRAL_ARGS,
    "<|channel|>",
    "<|message|>",
    "<|call|>",
    "<|constrain|>",
    "<|start|>",
    "<|end|>",
)
_DECODER = json.JSONDecoder()
_NAME = re.compile(r"([A-Za-z_][\w.\-]*)\s*(?:\[ARGS\])?\s*(?=\{)")


def _tool_list(tools: Any) -> list[Any]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools must be an array")
    return tools


def _function(i: int, fn: dict) -> dict:
    """One tool's function {name, description, parameters}, checked; 400 on bad shapes."""
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"tools[{i}].function.name is required")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object")
    return {"name": name, "description": fn.get("description", ""), "parameters": params}


def normalize_tools(tools: Any) -> list[dict]:
    """OpenAI/Ollama tool list -> [{"name", "description", "parameters"}]; 400 on bad shapes."""
    out = []
    for i, t in enumerate(_tool_list(tools)):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        out.append(_function(i, fn))
    return out


def function_tools(tools: Any, kind: str, default_kind: str | None, as_function: Callable[[dict], dict]) -> list[dict]:
    """Another dialect's tool list (Anthropic's, Responses') -> normalised tools: each tool of
    its client-side ``kind`` through ``as_function`` to {name, description, parameters}; a
    provider's built-in tools (web search...) are a 400."""
    listed = _tool_list(tools)
    for i, t in enumerate(listed):  # every kind first: a built-in tool is the error to name
        found = t.get("type", default_kind) if isinstance(t, dict) else None
        if found != kind:
            raise BadRequest(f"tools[{i}]: only {kind} tools are supported, not '{found}'")
    return [_function(i, as_function(t)) for i, t in enumerate(listed)]


def as_template_tools(tools: list[dict]) -> list[dict]:
    """The shape chat templates expect (HF convention)."""
    return [{"type": "function", "function": t} for t in tools]


TOOL_PROMPT = (
    "You can call the following tools. Each is given with a JSON schema of its arguments.\n\n"
    "{tools}\n\n"
    "To call a tool, answer with only a JSON object of this form and nothing else:\n"
    '{{"name": "<tool name>", "arguments": {{<arguments, as its schema says>}}}}\n'
    "To call several tools, answer with a JSON array of such objects. "
    "Otherwise answer the user in plain text."
)


def tool_prompt(tools: list[dict]) -> str:
    """The generic tool description (as llama.cpp's "generic" chat format): the tools' schemas
    and the call format that ``parse_tool_calls`` and a forced call's ``call_schema`` expect."""
    plain = [t.get("function", t) if isinstance(t, dict) else t for t in tools]
    listed = [
        {"name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("parameters", {})}
        for t in plain
        if isinstance(t, dict)
    ]
    return TOOL_PROMPT.format(tools=json.dumps(listed, indent=2, ensure_ascii=False))


def with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """``messages`` for a template that ignores tools: the tool prompt joins the system message
    (or becomes one), and earlier calls are written out as the JSON the model was asked for."""
    text = tool_prompt(tools)
    out = [_call_as_content(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def _call_as_content(message: dict) -> dict:
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not isinstance(calls, list) or not calls or message.get("content"):
        return message
    written = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        fn = fn if isinstance(fn, dict) else {}
        written.append({"name": fn.get("name"), "arguments": fn.get("arguments", {})})
    content = json.dumps(written[0] if len(written) == 1 else written, ensure_ascii=False)
    return {**message, "content": content}


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """A JSON schema whose only instances are calls of the given tool (or of any tool)."""
    chosen = [t for t in tools if name is None or t["name"] == name]
    if not chosen:
        raise BadRequest(f"tool_choice names an unknown function '{name}'")
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": _strict(t["parameters"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _strict(schema: dict) -> dict:
    """As OpenAI's strict mode: an object schema that does not say otherwise takes no extra keys
    (a forced call then ends when its declared arguments are written)."""
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _as_call(obj: Any, names: set[str], name: str | None = None) -> dict | None:
    """``obj`` as a call of one of ``names`` (any name when empty); with ``name`` given, ``obj``
    is its arguments."""
    if name is not None:
        obj = {"name": name, "arguments": obj}
    if isinstance(obj, dict) and isinstance(obj.get("tool_call"), dict) and len(obj) == 1:
        obj = obj["tool_call"]
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]  # OpenAI's own shape, as some fine-tunes write it
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or (names and name not in names) or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """The calls in a model's answer, or None when the answer is plain text (or not wholly calls)."""
    calls, whole = _scan(text, {t["name"] for t in tools})
    return calls if whole and calls else None


def completed_calls(text_so_far: str, tools: list[dict]) -> list[dict]:
    """While streaming: the calls written out in full so far (the last may still be growing)."""
    return _scan(text_so_far, {t["name"] for t in tools})[0] or []


def _scan(text: str, names: set[str]) -> tuple[list[dict] | None, bool]:
    """(the calls read from the start of ``text`` until the first that is not complete, and
    whether they make up all of it). None: not a call at all."""
    s = text.strip()
    if "<tool_call>" in s:
        blocks, calls = _BLOCK.findall(s), []
        for block in blocks:
            try:
                call = _as_call(json.loads(block), names)
            except ValueError:
                return calls, False
            if call is None:
                return None, False
            calls.append(call)
        return calls, True  # text around the blocks (a preamble) is not part of any call
    if "to=functions." in s:
        calls = []
        for name, args in _HARMONY.findall(s):
            call = _as_call(_loads(args), names, name)
            if call is None:
                return calls, False
            calls.append(call)
        return calls, bool(calls)
    mistral = s.startswith(MISTRAL_CALLS)
    s = s.removeprefix(PYTHON_TAG).removeprefix(MISTRAL_CALLS).lstrip()
    if not s.startswith(("{", "[")) and not (mistral and _NAME.match(s)):
        return None, False
    calls, at = [], 0
    while at < len(s):
        if s.startswith(MISTRAL_CALLS, at):
            at = _skip(s, at + len(MISTRAL_CALLS))
            continue
        name = _NAME.match(s, at) if mistral else None
        if name is not None:  # Mistral's name[ARGS]{...}
            try:
                args, at = _DECODER.raw_decode(s, name.end())
            except ValueError:
                return calls, False
            call = _as_call(args, names, name.group(1))
            if call is None:
                return None, False
            calls.append(call)
        elif s.startswith("[", at):
            found, at, done = _array(s, at, names)
            if found is None:
                return (calls or None), False
            calls += found
            if not done:
                return calls, False
        else:
            try:
                obj, at = _DECODER.raw_decode(s, at)
            except ValueError:
                return calls, False
            call = _as_call(obj, names)
            if call is None:
                return (calls or None), False
            calls.append(call)
        at = _skip(s, at)
    return calls, True


def _skip(s: str, at: int) -> int:
    """Past the whitespace and separators (Llama's ``;``, a stray comma) between calls."""
    while at < len(s) and (s[at].isspace() or s[at] in ";,"):
        at += 1
    return at


def _array(s: str, at: int, names: set[str]) -> tuple[list[dict] | None, int, bool]:
    """A JSON array of calls read element by element: (calls, end, whether it was closed)."""
    calls, at = [], _skip(s, at + 1)
    while at < len(s):
        if s[at] == "]":
            return calls, at + 1, True
        try:
            obj, at = _DECODER.raw_decode(s, at)
        except ValueError:
            return calls, at, False
        call = _as_call(obj, names)
        if call is None:
            return None, at, False
        calls.append(call)
        at = _skip(s, at)
    return calls, at, False


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# Tags that open a call even after some text (a model may say what it is about to do first).
_CALL_TAGS = ("<tool_call>", MISTRAL_CALLS, PYTHON_TAG, "<|channel|>")


def _call_start(text: str) -> int:
    """Where a tagged call may begin in ``text`` (a tag, or the start of one at its end); else
    its length."""
    found = [i for i in (text.find(t) for t in _CALL_TAGS) if i >= 0]
    if found:
        return min(found)
    for n in range(min(len(text), max(map(len, _CALL_TAGS)) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in _CALL_TAGS):
            return len(text) - n
    return len(text)


class CallStream:
    """A streamed answer's text in; out, the text that can be shown now and the calls completed
    now. An answer that may be a call from its start is held; later, text is held from where a
    tagged call may begin. ``finish`` gives the rest: the calls not yet out, or the held text."""

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self._held = ""
        self._shown = False  # some text went out: only a tagged call can follow
        self.sent = 0  # calls out so far

    def feed(self, text: str) -> tuple[str, list[dict]]:
        buf, out = self._held + text, ""
        if self._shown or not might_be_call(buf):
            k = _call_start(buf)
            out, buf = buf[:k], buf[k:]
            self._shown = self._shown or bool(out)
        self._held = buf
        return out, self._new(completed_calls(buf, self.tools) if buf else [])

    def finish(self) -> tuple[str, list[dict]]:
        held, self._held = self._held, ""
        calls = parse_tool_calls(held, self.tools) or (completed_calls(held, self.tools) if self.sent else None)
        return ("", self._new(calls)) if calls else (held, [])

    def _new(self, calls: list[dict]) -> list[dict]:
        new = calls[self.sent :]
        self.sent = max(self.sent, len(calls))
        return new


def might_be_call(text_so_far: str) -> bool:
    """While streaming: hold text back when it could still turn into a tool call."""
    s = text_so_far.lstrip()
    return any(p.startswith(s) or s.startswith(p) for p in CALL_PREFIXES) if s else True
