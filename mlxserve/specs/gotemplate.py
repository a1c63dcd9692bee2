"""Ollama's Go chat templates, translated into Jinja for the sandboxed renderer.

Models pulled from an Ollama registry carry Go ``text/template`` templates. The shapes of
Ollama's library (llama3, qwen/chatml, gemma, phi-3, mistral, command-r...) use a small part of
the language: text with ``{{-``/``-}}`` trimming, fields, variables, ``if``/``else if``/``range``/
``with``/``break``/``continue``, and the functions eq, ne, lt, le, gt, ge, and, or, not, len,
index, slice, printf, print, json and currentDate. That part is translated; anything else
(``define``/``template``/``block``, other functions) is refused with a message that says what.

The values are Ollama's: ``.Messages`` (collated as Ollama does: consecutive messages of one
role joined, ``.System`` the system messages joined), ``.Tools``, ``.Think``, ``.IsThinkSet``,
``.ThinkLevel``; a template without ``.Messages`` runs once per turn with ``.System``,
``.Prompt`` and ``.Response``, the last turn cut after ``.Response``, as Ollama runs it. A
message, tool or call prints as Ollama's JSON of it.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import attrs
from jinja2 import Undefined

from ..errors import BadRequest

MAX_NESTING = 64  # blocks inside blocks; library templates nest 4 or 5 deep
FUNCS = {
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "len",
    "index",
    "slice",
    "printf",
    "print",
    "json",
    "currentDate",
    "yesterdayDate",
}
_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


class Untranslatable(BadRequest):
    """A Go template outside the part of the language that is translated."""


def _refuse(what: str) -> Untranslatable:
    return Untranslatable(
        f"this Ollama Go template uses {what}, which mlxserve does not translate; "
        "give the model a Jinja chat template (Modelfile TEMPLATE) instead"
    )


# ---- lexing: text and actions, with Go's trim markers ----

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _lex(src: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    at, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[at : m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            out.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        trim_next, at = bool(m.group(3)), m.end()
    text = src[at:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        out.append(("text", text))
    if "{{" in "".join(t for k, t in out if k == "text"):
        raise _refuse("an action that is never closed")
    return out


# ---- expressions: pipelines into Jinja expressions ----

_TOKEN = re.compile(
    r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<var>\$[A-Za-z_0-9]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z_0-9]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>:=|=|\||\(|\)|,)
)""",
    re.X,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            if text[at:].isspace():
                break
            raise _refuse(f"the expression {text.strip()[:40]!r}")
        kind = m.lastgroup
        value = m.group(kind)
        at = m.end()
        # a field chain right after ) or a variable: (x).A, $x.A
        if (
            kind == "field"
            and out
            and value != "."
            and (out[-1][0] == "var" or out[-1] == ("op", ")"))
            and m.start(kind) == m.start()
        ):
            out.append(("chain", value))
            continue
        if (
            kind == "var"
            and text[at : at + 1] == "."
            and _TOKEN.match(text, at)
            and _TOKEN.match(text, at).lastgroup == "field"
        ):
            f = _TOKEN.match(text, at)
            out.append((kind, value))
            out.append(("chain", f.group("field")))
            at = f.end()
            continue
        out.append((kind, value))
    depth = 0
    for kind, value in out:
        depth += {"(": 1, ")": -1}.get(value, 0) if kind == "op" else 0
        if depth > MAX_NESTING:
            raise _refuse(f"parentheses nested more than {MAX_NESTING} deep")
    return out


@attrs.define
class _Scope:
    dot: str  # the Jinja expression that is Go's "." here


class _Translator:
    def __init__(self) -> None:
        self.counter = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"go{stem}{self.counter}"

    # pipeline := command ('|' command)*
    def pipeline(self, toks: list[tuple[str, str]], scope: _Scope) -> str:
        commands, cur, depth = [], [], 0
        for t in toks:
            if t == ("op", "("):
                depth += 1
            elif t == ("op", ")"):
                depth -= 1
            if t == ("op", "|") and depth == 0:
                commands.append(cur)
                cur = []
            else:
                cur.append(t)
        commands.append(cur)
        expr = None
        for cmd in commands:
            expr = self.command(cmd, scope, expr)
        return expr

    def command(self, toks: list, scope: _Scope, piped: str | None) -> str:
        args = self.operands(toks, scope)
        if not args:
            raise _refuse("an empty command")
        head, rest = args[0], args[1:]
        if head[0] == "func":
            return self.call(head[1], [a[1] for a in rest] + ([piped] if piped is not None else []))
        if rest or piped is not None:
            raise _refuse("a method call or a value given arguments")
        return head[1]

    def operands(self, toks: list, scope: _Scope) -> list[tuple[str, str]]:
        out, i = [], 0
        while i < len(toks):
            kind, value = toks[i]
            if kind == "op" and value == "(":
                depth, j = 1, i + 1
                while j < len(toks) and depth:
                    depth += {"(": 1, ")": -1}.get(toks[j][1], 0) if toks[j][0] == "op" else 0
                    j += 1
                inner = self.pipeline(toks[i + 1 : j - 1], scope)
                expr = f"({inner})"
                i = j
                if i < len(toks) and toks[i][0] == "chain":
                    expr = _fields(expr, toks[i][1])
                    i += 1
                out.append(("value", expr))
                continue
            if kind == "str":
                text = value[1:-1] if value.startswith("`") else json.loads(value)
                out.append(("value", json.dumps(text)))
            elif kind == "num":
                out.append(("value", value))
            elif kind == "var":
                expr = "goroot" if value == "$" else f"gons.v_{value[1:] or '_'}"
                if i + 1 < len(toks) and toks[i + 1][0] == "chain":
                    expr = _fields(expr, toks[i + 1][1])
                    i += 1
                out.append(("value", expr))
            elif kind == "field":
                out.append(("value", scope.dot if value == "." else _fields(scope.dot, value)))
            elif kind == "ident":
                if value in ("true", "false"):
                    out.append(("value", value.capitalize()))
                elif value == "nil":
                    out.append(("value", "none"))
                elif value in FUNCS:
                    out.append(("func", value))
                else:
                    raise _refuse(f"the function {value!r}")
            else:
                raise _refuse(f"{value!r} where a value belongs")
            i += 1
        return out

    def call(self, name: str, args: list[str]) -> str:
        if name in _CMP:
            if len(args) < 2:
                raise _refuse(f"{name} with fewer than two arguments")
            if name == "eq" and len(args) > 2:
                return "(" + " or ".join(f"({args[0]} == {b})" for b in args[1:]) + ")"
            return f"({args[0]} {_CMP[name]} {args[1]})"
        if name in ("and", "or"):
            return "(" + f" {name} ".join(args) + ")"
        if name == "not":
            return f"(not {args[0]})"
        if name == "len":
            return f"({args[0]} | length)"
        if name == "index":
            return args[0] + "".join(f"[{a}]" for a in args[1:])
        if name == "slice":
            lo = args[1] if len(args) > 1 else ""
            hi = args[2] if len(args) > 2 else ""
            return f"{args[0]}[{lo}:{hi}]"
        if name == "printf":
            fmt = args[0]
            return f"gosprintf({fmt}, {', '.join(args[1:])})" if len(args) > 1 else f"gosprintf({fmt})"
        if name == "print":
            return "(" + " ~ ".join(f"gostr({a})" for a in args) + ")" if args else '""'
        if name == "json":
            return f"gojson({args[0]})"
        if name == "currentDate":
            return 'strftime_now("%Y-%m-%d")'
        if name == "yesterdayDate":
            return "goyesterday()"
        raise _refuse(f"the function {name!r}")


def _fields(expr: str, chain: str) -> str:
    return expr + "".join(f"[{json.dumps(f)}]" for f in chain.strip(".").split("."))


# ---- statements: the action tree into Jinja ----

_KEYWORDS = ("if", "else", "end", "range", "with", "break", "continue", "define", "template", "block")


def _parse(items: list[tuple[str, str]]) -> list:
    """Nested nodes: ("text", s) | ("print", toks) | ("set", name, toks) | ("if", [(cond, body)],
    else_body) | ("range", keyvars, toks, body, else) | ("with", toks, body, else) | ("break",) |
    ("continue",)."""
    pos, depth = 0, 0

    def block(stop: tuple[str, ...]) -> tuple[list, str]:
        nonlocal pos, depth
        depth += 1
        if depth > MAX_NESTING:
            raise _refuse(f"blocks nested more than {MAX_NESTING} deep")
        nodes = []
        while pos < len(items):
            kind, body = items[pos]
            pos += 1
            if kind == "text":
                nodes.append(("text", body))
                continue
            word = body.split(None, 1)[0] if body else ""
            if word in stop:
                depth -= 1
                return nodes, body
            if word in ("define", "template", "block"):
                raise _refuse(f"{{{{ {word} }}}}")
            if word == "if":
                branches, otherwise = [(_tokens(body[2:]), None)], None
                inner, ended = block(("else", "end"))
                branches[0] = (branches[0][0], inner)
                while ended.startswith("else"):
                    rest = ended[4:].strip()
                    if rest.startswith("if "):
                        inner, ended2 = block(("else", "end"))
                        branches.append((_tokens(rest[3:]), inner))
                        ended = ended2
                    elif rest.startswith("with"):
                        raise _refuse("{{ else with }}")
                    else:
                        otherwise, ended = block(("end",))
                nodes.append(("if", branches, otherwise))
            elif word in ("range", "with"):
                head = body[len(word) :].strip()
                names: list[str] = []
                m = re.match(r"^(\$\w*)\s*(?:,\s*(\$\w*))?\s*:=\s*(.*)$", head, re.S)
                if m:
                    names = [n for n in (m.group(1), m.group(2)) if n]
                    head = m.group(3)
                inner, ended = block(("else", "end"))
                otherwise = None
                if ended.startswith("else"):
                    if ended.strip() != "else":
                        raise _refuse(f"{{{{ {ended} }}}}")
                    otherwise, _ = block(("end",))
                if word == "range":
                    nodes.append(("range", names, _tokens(head), inner, otherwise))
                else:
                    nodes.append(("with", names, _tokens(head), inner, otherwise))
            elif word in ("break", "continue") and body == word:
                nodes.append((word,))
            elif word in ("else", "end"):
                raise _refuse(f"an unexpected {{{{ {word} }}}}")
            else:
                m = re.match(r"^(\$\w*)\s*(:=|=)\s*(.*)$", body, re.S)
                if m:
                    nodes.append(("set", m.group(1), _tokens(m.group(3))))
                else:
                    nodes.append(("print", _tokens(body)))
        if stop:
            raise _refuse("a block without {{ end }}")
        return nodes, ""

    nodes, _ = block(())
    return nodes


def _fields_used(nodes: list) -> set[str]:
    found: set[str] = set()

    def toks(ts):
        for kind, value in ts:
            if kind in ("field", "chain"):
                found.update(f.lower() for f in value.strip(".").split(".") if f)

    def walk(ns):
        for n in ns:
            if n[0] == "print":
                toks(n[1])
            elif n[0] == "set":
                toks(n[2])
            elif n[0] == "if":
                for cond, body in n[1]:
                    toks(cond)
                    walk(body)
                walk(n[2] or [])
            elif n[0] in ("range", "with"):
                toks(n[2])
                walk(n[3])
                walk(n[4] or [])

    walk(nodes)
    return found


def _cut_after_response(nodes: list) -> list:
    """Ollama's last turn of a template without .Messages: everything after .Response goes."""
    cut = False

    def uses_response(ts) -> bool:
        return any(k in ("field", "chain") and "Response" in v.split(".") for k, v in ts)

    def walk(ns: list) -> list:
        nonlocal cut
        out = []
        for n in ns:
            if cut:
                continue
            if n[0] == "print" and uses_response(n[1]):
                cut = True
                out.append(n)
            elif n[0] == "if":
                branches = [(cond, walk(body)) for cond, body in n[1]]
                out.append(("if", branches, walk(n[2]) if n[2] is not None else None))
            elif n[0] in ("range", "with"):
                out.append((n[0], n[1], n[2], walk(n[3]), walk(n[4]) if n[4] is not None else None))
            else:
                out.append(n)
        return out

    return walk(nodes)


def _emit(nodes: list, tr: _Translator, scope: _Scope) -> str:
    out = []
    for n in nodes:
        kind = n[0]
        if kind == "text":
            out.append("{{ " + json.dumps(n[1]) + " }}")
        elif kind == "print":
            out.append("{{ gostr(" + tr.pipeline(n[1], scope) + ") }}")
        elif kind == "set":
            out.append(f"{{% set gons.v_{n[1][1:] or '_'} = {tr.pipeline(n[2], scope)} %}}")
        elif kind in ("break", "continue"):
            out.append(f"{{% {kind} %}}")
        elif kind == "if":
            for k, (cond, body) in enumerate(n[1]):
                out.append(f"{{% {'if' if k == 0 else 'elif'} {tr.pipeline(cond, scope)} %}}")
                out.append(_emit(body, tr, scope))
            if n[2] is not None:
                out.append("{% else %}" + _emit(n[2], tr, scope))
            out.append("{% endif %}")
        elif kind == "range":
            names, head, body, otherwise = n[1], n[2], n[3], n[4]
            key, item = tr.fresh("k"), tr.fresh("it")
            sets = ""
            if len(names) == 1:
                sets = f"{{% set gons.v_{names[0][1:] or '_'} = {item} %}}"
            elif len(names) == 2:
                sets = (
                    f"{{% set gons.v_{names[0][1:] or '_'} = {key} %}}{{% set gons.v_{names[1][1:] or '_'} = {item} %}}"
                )
            out.append(f"{{% for {key}, {item} in gorange({tr.pipeline(head, scope)}) %}}{sets}")
            out.append(_emit(body, tr, _Scope(item)))
            if otherwise is not None:
                out.append("{% else %}" + _emit(otherwise, tr, scope))
            out.append("{% endfor %}")
        elif kind == "with":
            names, head, body, otherwise = n[1], n[2], n[3], n[4]
            var = tr.fresh("w")
            sets = f"{{% set gons.v_{names[0][1:] or '_'} = {var} %}}" if names else ""
            out.append(f"{{% set {var} = {tr.pipeline(head, scope)} %}}{{% if {var} %}}{sets}")
            out.append(_emit(body, tr, _Scope(var)))
            if otherwise is not None:
                out.append("{% else %}" + _emit(otherwise, tr, scope))
            out.append("{% endif %}")
    return "".join(out)


@attrs.frozen
class Translated:
    jinja: str
    uses_messages: bool


@functools.lru_cache(maxsize=64)
def translate(go: str) -> Translated:
    """The Jinja text of a Go template (rendered with ``go_context``'s values); Untranslatable
    (a 400) when it uses more of the language than is translated."""
    nodes = _parse(_lex(go))
    used = _fields_used(nodes)
    uses_messages = "messages" in used
    if not uses_messages and "response" not in used:
        nodes = nodes + [("print", [("field", ".Response")])]  # as Ollama's Parse appends it
    tr = _Translator()
    head = "{% set gons = namespace() %}"
    if uses_messages:
        return Translated(head + _emit(nodes, tr, _Scope("goroot")), True)
    full = _emit(nodes, tr, _Scope("goroot"))
    cut = _emit(_cut_after_response(nodes), tr, _Scope("goroot"))
    # Each earlier turn runs the whole template; the last, cut after .Response.
    jinja = (
        "{% for goroot in goturns %}{% set gons = namespace() %}" + full + "{% endfor %}"
        "{% set goroot = golast %}" + head + cut
    )
    return Translated(jinja, False)


# ---- values ----


class _Shown:
    """Printed as Ollama prints the Go value (its JSON): ``shown``."""

    def __init__(self, value, shown: Any):
        super().__init__(value)
        self.shown = shown

    def __str__(self) -> str:
        return json.dumps(self.shown, ensure_ascii=False, separators=(",", ":"))


class GoObject(_Shown, dict):
    """A struct's fields by their Go names."""


class GoList(_Shown, list):
    """A slice of Go values."""


def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, _Shown):
        return str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    if isinstance(v, Undefined):  # a field the value does not have: Go's zero value
        return ""
    return str(v)


def _json(v: Any) -> str:
    return json.dumps(v.shown if isinstance(v, _Shown) else v, ensure_ascii=False, separators=(",", ":"))


def _sprintf(fmt: str, *args: Any) -> str:
    fmt = re.sub(r"%v|%q", "%s", str(fmt))
    return fmt % tuple(_str(a) if isinstance(a, (bool, _Shown, type(None))) else a for a in args)


def _range(v: Any) -> list[tuple[Any, Any]]:
    """Go's range: a list's (index, item); a map's (key, value) in key order; an int's 0..n-1."""
    if isinstance(v, dict):
        return sorted(v.items(), key=lambda kv: str(kv[0]))
    if isinstance(v, int) and not isinstance(v, bool):
        return [(i, i) for i in range(v)]
    if isinstance(v, (list, tuple)):
        return list(enumerate(v))
    return []


def _yesterday() -> str:
    from datetime import timedelta

    return (datetime.now() - timedelta(days=1)).strftime("%Y-%m-%d")


FUNCTIONS = {"gostr": _str, "gojson": _json, "gosprintf": _sprintf, "gorange": _range, "goyesterday": _yesterday}


def _call(call: dict) -> GoObject:
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = {}
    function = GoObject(
        {"Name": fn.get("name", ""), "Arguments": GoObject(args, args), "Index": 0},
        {"name": fn.get("name", ""), "arguments": args},
    )
    return GoObject({"ID": call.get("id") or "", "Function": function}, {"function": function.shown})


def _message(m: dict) -> GoObject:
    calls = [_call(c) for c in m.get("tool_calls") or []]
    fields = {
        "Role": m.get("role", ""),
        "Content": m.get("content") or "",
        "Thinking": m.get("thinking") or "",
        "Images": m.get("images") or [],
        "ToolCalls": GoList(calls, [c.shown for c in calls]) if calls else None,
        "ToolName": m.get("tool_name") or m.get("name") or "",
        "ToolCallID": m.get("tool_call_id") or "",
    }
    shown = {k: v for k, v in {"role": fields["Role"], "content": fields["Content"]}.items()}
    return GoObject(fields, shown)


def _schema(s: Any) -> Any:
    """A JSON schema with Go's field names on top of its own (Type, Description, Properties...)."""
    if not isinstance(s, dict):
        return s
    fields = {k[:1].upper() + k[1:]: _schema(v) if isinstance(v, dict) else v for k, v in s.items()}
    if isinstance(s.get("properties"), dict):
        props = {k: _schema(v) for k, v in s["properties"].items()}
        fields["Properties"] = GoObject(props, s["properties"])
    return GoObject(fields, s)


_PROPERTY_KEYS = ("anyOf", "type", "items", "description", "enum", "properties", "required")


def _property(p: Any) -> Any:
    """A property as Ollama's ToolProperty marshals it: its fields in struct order, empty ones
    and unknown keys left out, nested properties in key order (a Go map)."""
    if not isinstance(p, dict):
        return p
    out = {}
    for k in _PROPERTY_KEYS:
        v = p.get(k)
        if v in (None, "", [], {}):
            continue
        if k == "anyOf" and isinstance(v, list):
            v = [_property(x) for x in v]
        elif k == "properties" and isinstance(v, dict):
            v = {name: _property(v[name]) for name in sorted(v)}
        out[k] = v
    return out


def _parameters(p: Any) -> dict:
    p = p if isinstance(p, dict) else {}
    out: dict = {"type": p.get("type") or "object"}
    for k in ("$defs", "items", "required"):
        if p.get(k):
            out[k] = p[k]
    props = p.get("properties") if isinstance(p.get("properties"), dict) else {}
    out["properties"] = {name: _property(props[name]) for name in sorted(props)}
    return out


def _tool(t: dict) -> GoObject:
    fn = t.get("function", t) if isinstance(t, dict) else {}
    shown_fn = {
        "name": fn.get("name", ""),
        "description": fn.get("description", ""),
        "parameters": _parameters(fn.get("parameters")),
    }
    function = GoObject(
        {
            "Name": shown_fn["name"],
            "Description": shown_fn["description"],
            "Parameters": _schema(shown_fn["parameters"]),
        },
        shown_fn,
    )
    return GoObject({"Type": "function", "Function": function}, {"type": "function", "function": shown_fn})


def _collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's collate: the system messages joined, consecutive messages of one role (not tool)
    merged into one."""
    system, out = [], []
    for m in messages:
        if m.get("role") == "system":
            system.append(m.get("content") or "")
        if out and out[-1].get("role") == m.get("role") and m.get("role") != "tool":
            out[-1] = {**out[-1], "content": f"{out[-1].get('content') or ''}\n\n{m.get('content') or ''}"}
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


def go_context(
    translated: Translated,
    messages: list[dict],
    tools: list[dict] | None,
    enable_thinking: bool | None = None,
    reasoning_effort: str | None = None,
) -> dict:
    """The values a translated template renders with, as Ollama's Execute builds them."""
    system, msgs = _collate(messages)
    think = {
        "Think": bool(enable_thinking) if enable_thinking is not None else False,
        "ThinkLevel": reasoning_effort or "",
        "IsThinkSet": enable_thinking is not None,
    }
    if translated.uses_messages:
        go_tools = [_tool(t) for t in tools or []]
        root = {
            "System": system,
            "Messages": [_message(m) for m in msgs],
            "Tools": GoList(go_tools, [t.shown for t in go_tools]) if go_tools else None,
            "Response": "",
            "Prompt": "",
            **think,
        }
        return {"goroot": root, **FUNCTIONS}
    turns, system, prompt, response = [], "", "", ""

    def turn() -> dict:
        return {"System": system, "Prompt": prompt, "Response": response, **think}

    for m in msgs:
        role = m.get("role")
        if role == "system":
            if prompt or response:
                turns.append(turn())
                prompt = response = ""
            system = m.get("content") or ""
        elif role == "user":
            if response:
                turns.append(turn())
                system = response = ""
            prompt = m.get("content") or ""
        elif role == "assistant":
            response = m.get("content") or ""
    return {"goturns": turns, "golast": turn(), **FUNCTIONS}
