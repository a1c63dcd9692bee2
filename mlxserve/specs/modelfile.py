"""Ollama's Modelfile syntax: parse it, and write one back for ``/api/show``.

    FROM <gguf file | model directory | model name>
    PARAMETER <name> <value>        (``stop`` may repeat and accumulates)
    TEMPLATE / SYSTEM / ADAPTER <value>
    LICENSE <value>                 (may repeat)
    MESSAGE <system|user|assistant> <value>

Instructions are case-insensitive, ``#`` starts a comment line, and a value is either the rest
of the line, a ``"..."`` string (``\\"`` and ``\\\\`` escapes) or a ``\"\"\"`` string that may
span lines. Every error names its line.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import BadRequest, ModelfileError
from .modelspec import ModelSpec
from .options import parse_option_text

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")
MESSAGE_ROLES = ("system", "user", "assistant")
_TRIPLE = '"""'


@attrs.define
class Modelfile:
    from_: str
    from_line: int = 1
    parameters: dict[str, Any] = attrs.field(factory=dict)
    template: str | None = None
    system: str | None = None
    adapter: str | None = None
    license: list[str] = attrs.field(factory=list)
    messages: list[dict[str, str]] = attrs.field(factory=list)


def _quoted(text: str, lineno: int) -> str:
    """A ``"..."`` value; ``text`` starts with the opening quote."""
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            if text[i + 1 :].strip():
                raise ModelfileError("unexpected text after the closing quote", lineno)
            return "".join(out)
        out.append(c)
        i += 1
    raise ModelfileError("unterminated quoted string", lineno)


def _read_value(text: str, lines: list[str], i: int, what: str) -> tuple[str, int]:
    """The value starting in ``text`` (on line index ``i``); returns it and the last line used."""
    text = text.strip()
    lineno = i + 1
    if text.startswith(_TRIPLE):
        body = text[3:]
        end = body.find(_TRIPLE)
        if end >= 0:
            if body[end + 3 :].strip():
                raise ModelfileError(f"unexpected text after the closing {_TRIPLE}", lineno)
            return body[:end], i
        parts = [body]
        j = i + 1
        while j < len(lines):
            end = lines[j].find(_TRIPLE)
            if end >= 0:
                if lines[j][end + 3 :].strip():
                    raise ModelfileError(f"unexpected text after the closing {_TRIPLE}", j + 1)
                parts.append(lines[j][:end])
                value = "\n".join(parts)
                # `"""` then a newline, and a newline before the closing `"""`, are layout.
                if value.startswith("\n"):
                    value = value[1:]
                if value.endswith("\n"):
                    value = value[:-1]
                return value, j
            parts.append(lines[j])
            j += 1
        raise ModelfileError(f"unterminated {_TRIPLE} string for {what}", lineno)
    if text.startswith('"'):
        return _quoted(text, lineno), i
    if not text:
        raise ModelfileError(f"missing value for {what}", lineno)
    return text, i


def _split(text: str) -> tuple[str, str]:
    parts = text.split(None, 1)
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")


def parse_modelfile(text: str) -> Modelfile:
    lines = text.splitlines()
    fields: dict[str, Any] = {"parameters": {}, "license": [], "messages": []}
    from_: tuple[str, int] | None = None
    first_line: int | None = None
    i = 0
    while i < len(lines):
        lineno = i + 1
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        first_line = first_line or lineno
        word, rest = _split(stripped)
        instruction = word.upper()
        if instruction not in INSTRUCTIONS:
            raise ModelfileError(f"unknown instruction '{word}' (expected one of {', '.join(INSTRUCTIONS)})", lineno)
        if instruction == "PARAMETER":
            name, value_text = _split(rest)
            name = name.lower()
            if not name:
                raise ModelfileError("PARAMETER needs a name and a value", lineno)
            value, i = _read_value(value_text, lines, i, f"PARAMETER {name}")
            try:
                typed = parse_option_text(name, value)
            except BadRequest as exc:
                raise ModelfileError(str(exc), lineno) from None
            if name == "stop":
                fields["parameters"].setdefault("stop", []).append(typed)
            else:
                fields["parameters"][name] = typed
        elif instruction == "MESSAGE":
            role, value_text = _split(rest)
            if role.lower() not in MESSAGE_ROLES:
                raise ModelfileError(f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)} (got '{role}')", lineno)
            value, i = _read_value(value_text, lines, i, "MESSAGE")
            fields["messages"].append({"role": role.lower(), "content": value})
        else:
            value, i = _read_value(rest, lines, i, instruction)
            if instruction == "FROM":
                if from_ is not None:
                    raise ModelfileError(f"second FROM (the first is on line {from_[1]})", lineno)
                from_ = (value, lineno)
            elif instruction == "LICENSE":
                fields["license"].append(value)
            elif instruction == "ADAPTER" and fields.get("adapter") is not None:
                raise ModelfileError("only one ADAPTER is supported", lineno)
            else:
                fields[instruction.lower()] = value
        i += 1
    if from_ is None:
        raise ModelfileError(
            "missing FROM instruction (a Modelfile must say what model it starts from)", first_line or 1
        )
    return Modelfile(from_=from_[0], from_line=from_[1], **fields)


def _quote(value: str) -> str:
    # "..." with escapes can say anything on one line; only multi-line values need """.
    # (A value that contains """ or ends in a quote cannot be written multi-line; Ollama's
    # syntax has the same limit.)
    if "\n" in value:
        return f"{_TRIPLE}{value}{_TRIPLE}"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    return repr(value)


def render_modelfile(name: Any, spec: ModelSpec) -> str:
    """A Modelfile that re-creates ``spec`` on top of the model ``name`` (a str or ModelName)."""
    display = name.display() if hasattr(name, "display") else str(name)
    out = [
        '# Modelfile generated by "mlxctl show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {display}",
        "",
        f"FROM {display}",
    ]
    if spec.template is not None:
        out.append(f"TEMPLATE {_quote(spec.template)}")
    if spec.system is not None:
        out.append(f"SYSTEM {_quote(spec.system)}")
    for key, value in spec.parameters.to_dict().items():
        for v in value if key == "stop" else [value]:
            out.append(f"PARAMETER {key} {_param_text(v)}")
    if spec.license:
        out.append(f"LICENSE {_quote(spec.license)}")
    for m in spec.messages:
        out.append(f"MESSAGE {m.get('role', 'user')} {_quote(m.get('content', ''))}")
    return "\n".join(out) + "\n"
