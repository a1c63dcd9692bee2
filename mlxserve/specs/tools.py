"""Tool definitions in, tool calls out: validation, the schema that forces a call, the generic
prompt for templates that do not render tools, and parsing.

Models write calls in a few shapes; we accept the common ones: ``<tool_call>{json}</tool_call>``
blocks (Hermes, Qwen, SmolLM2), a bare JSON object ``{"name": ..., "arguments": ...}`` (also
with "parameters", or wrapped as llama.cpp's ``{"tool_call": {...}}``), or a JSON array of those.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import BadRequest

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
CALL_PREFIXES = ("<tool_call>", "{", "[")


def normalize_tools(tools: Any) -> list[dict]:
    """OpenAI/Ollama tool list -> [{"name", "description", "parameters"}]; 400 on bad shapes."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools must be an array")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}].function.name is required")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"name": name, "description": fn.get("description", ""), "parameters": params})
    return out


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
    listed = [{"name": t.get("name"), "description": t.get("description", ""),
               "parameters": t.get("parameters", {})} for t in plain if isinstance(t, dict)]
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
    variants = [{
        "type": "object",
        "properties": {"name": {"const": t["name"]}, "arguments": _strict(t["parameters"])},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in chosen]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _strict(schema: dict) -> dict:
    """As OpenAI's strict mode: an object schema that does not say otherwise takes no extra keys
    (a forced call then ends when its declared arguments are written)."""
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _as_call(obj: Any, names: set[str]) -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("tool_call"), dict) and len(obj) == 1:
        obj = obj["tool_call"]
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
    """The calls in a model's answer, or None when the answer is plain text."""
    names = {t["name"] for t in tools}
    stripped = text.strip()
    candidates: list[Any] = []
    if "<tool_call>" in stripped:
        for block in _BLOCK.findall(stripped):
            try:
                candidates.append(json.loads(block))
            except ValueError:
                return None
    elif stripped.startswith(("{", "[")):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            return None
        candidates = parsed if isinstance(parsed, list) else [parsed]
    calls = [_as_call(c, names) for c in candidates]
    if not calls or any(c is None for c in calls):
        return None
    return calls


def might_be_call(text_so_far: str) -> bool:
    """While streaming: hold text back when it could still turn into a tool call."""
    s = text_so_far.lstrip()
    return any(p.startswith(s) or s.startswith(p) for p in CALL_PREFIXES) if s else True
