"""Chat templates: Jinja, rendered the way Hugging Face's ``apply_chat_template`` renders them.

Templates come from tokenizer_config.json, GGUF ``tokenizer.chat_template`` or a Modelfile
``TEMPLATE``. Ollama's Go templates are a different language: the part of it that Ollama's
library templates use is translated into Jinja (specs/gotemplate.py) and rendered here with
Ollama's values; a template using more of it is refused with a message that says what.
"""

from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Callable, Iterable

import attrs
import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

from ..errors import BadRequest

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] or '') | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


# `{{ .Prompt }}`, `{{- if .System }}`, `{{ range .Messages }}`, `{{ end }}`, `{{ $.Tools }}`:
# Jinja never has a dot or `$` right after `{{`, and its control flow lives in `{% %}`.
_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:\.[A-Za-z_]|\$|(?:if|else|end|range|with|template|block|define)\b(?!\.|\s*[\(\[|=+~]))"
)


def is_go_template(text: str) -> bool:
    return bool(_GO_ACTION.search(text))


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


# ---- limits ----
# A template is user code (a request's `template`, a Modelfile TEMPLATE, a downloaded model's
# chat_template), so every render runs under a deadline and a size cap: `'x' * 10**9` or nested
# loops end in a 400 instead of an OOM kill or a frozen daemon.

RENDER_SECONDS = 5.0
DEFAULT_MAX_CHARS = 1 << 22  # renders that name no cap
COMPILE_MAX_CHARS = 1 << 16  # a longer constant is not folded at compile time (no deadline there)
MAX_RANGE = 100_000  # items in one range(), as Jinja's own sandbox allows
OUTPUT_FACTOR = 4  # all {{ }} values together (captured blocks, macros) may reach 4x the cap


class TemplateLimit(BadRequest):
    """A render went over its size cap or its deadline."""


class RenderTooLong(TemplateLimit):
    """The prompt, or a value the template builds, is longer than the render's cap."""


class RenderTimeout(TemplateLimit):
    """The template ran past its deadline."""


@attrs.define
class _Limits:
    max_chars: int
    deadline: float
    seconds: float = RENDER_SECONDS
    emitted: int = 0  # characters of every {{ }} value so far, captured or not


_LIMITS: ContextVar[_Limits | None] = ContextVar("template_limits", default=None)
_COMPILE_LIMITS = _Limits(COMPILE_MAX_CHARS, float("inf"))


def _limits() -> _Limits:
    return _LIMITS.get() or _COMPILE_LIMITS


def _tick() -> None:
    lim = _LIMITS.get()
    if lim is not None and time.monotonic() > lim.deadline:
        raise RenderTimeout(f"chat template took longer than {lim.seconds:g} s to render")


def _size(x: Any) -> int:
    """Characters or items in ``x``, counting strings one level down (a list holding one long
    string many times is long)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple)):
        return len(x) + sum(len(e) for e in x if isinstance(e, str))
    if isinstance(x, dict):
        return len(x) + sum(len(e) for e in x.values() if isinstance(e, str))
    return 0


def _too_long(n: int, what: str = "a value") -> RenderTooLong:
    return RenderTooLong(
        f"chat template builds {what} of {n} characters, over the limit of "
        f"{_limits().max_chars} for this context window"
    )


def _check(n: int, what: str = "a value") -> None:
    if n > _limits().max_chars:
        raise _too_long(n, what)


def _check_number(x: Any) -> None:
    """A count or width above the cap can only build something over it."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > _limits().max_chars:
        raise _too_long(abs(x), "a count or width")


_DIGITS = re.compile(r"\d+")


def _check_format(fmt: Any) -> None:
    """Widths and precisions written in a format string (``%9999999d``, ``{:>9999999}``)."""
    if isinstance(fmt, str):
        for digits in _DIGITS.findall(fmt):
            if len(digits) > 12 or int(digits) > _limits().max_chars:
                raise _too_long(int(digits[:13]), "a format width")


def _growth(name: str, value: Any, args: tuple, kwargs: dict) -> int | None:
    """An upper bound on the length of what the calls that multiply text return, before they run."""
    if not isinstance(value, str):
        return None
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        hits = value.count(old) if old else len(value) + 1
        return len(value) + hits * max(len(new) - len(old), 0)
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * max(w, 0)
    if name == "wordwrap":
        wrap = args[3] if len(args) > 3 else kwargs.get("wrapstring") or "\n"
        return len(value) * (1 + len(str(wrap)))
    if name == "expandtabs":
        return len(value) + value.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return _size(args[0]) + len(value) * len(args[0])
    return None


_NO_VALUE = object()


def _guard(name: str, call: Callable, value: Any, args: tuple, kwargs: dict) -> Any:
    """A filter or method call: deadline, sizes checked before it runs, its result after."""
    _tick()
    for a in (*args, *kwargs.values()):
        _check_number(a)
    if name == "format":
        _check_format(value)
    bound = _growth(name, value, args, kwargs)
    if bound is not None:
        _check(bound)
    out = call(*args, **kwargs)
    _check(_size(out))
    return out


def _guard_filter(name: str, fn: Callable) -> Callable:
    lead = 0 if _PassArg.from_obj(fn) is None else 1  # context / eval context / environment

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        head, value, rest = args[:lead], args[lead] if len(args) > lead else _NO_VALUE, args[lead + 1 :]
        if name == "sum" and not isinstance(kwargs.get("start", rest[1] if len(rest) > 1 else 0), (int, float)):
            raise jinja2.exceptions.TemplateError("sum() adds numbers only")  # lists: quadratic
        return _guard(name, lambda *a, **k: fn(*head, value, *a, **k), value, rest, kwargs)

    return guarded


def _concat(parts: list) -> str:
    """Jinja's ``~``, its length checked before the string is built."""
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    _check(sum(len(t) for t in texts))
    return "".join(texts)


def _ticking(iterable: Any):
    """Every ``{% for %}`` iterates through this: the deadline holds however loops nest."""
    for item in iterable:
        _tick()
        yield item


class _Range:
    """``range`` with Jinja's item cap, checking the deadline at every item."""

    def __init__(self, *args: int):
        self._r = range(*args)
        if len(self._r) > MAX_RANGE:
            raise jinja2.exceptions.TemplateError(f"range() of more than {MAX_RANGE} items")

    def __len__(self) -> int:
        return len(self._r)

    def __iter__(self):
        return _ticking(self._r)

    def __reversed__(self):
        return _ticking(reversed(self._r))

    def __getitem__(self, i):
        return self._r[i]

    def __contains__(self, x) -> bool:
        return x in self._r

    def __repr__(self) -> str:
        return repr(self._r)


def _finalize(value: Any) -> Any:
    """Every ``{{ }}`` value, whether it reaches the output or a captured block: their total is
    bounded, so a loop that captures a long string many times cannot build a huge one."""
    lim = _LIMITS.get()
    if lim is not None:
        n = _size(value)
        lim.emitted += n
        if n > lim.max_chars or lim.emitted > OUTPUT_FACTOR * lim.max_chars:
            raise _too_long(max(n, lim.emitted), "output")
        _tick()
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        ints = all(isinstance(x, int) for x in (left, right))
        if operator == "**" and ints and abs(left) > 1 and right * abs(left).bit_length() > 1 << 16:
            raise jinja2.exceptions.TemplateError("power too large")
        if operator == "*" and ints and left.bit_length() + right.bit_length() > 1 << 16:
            raise jinja2.exceptions.TemplateError("product too large")
        if operator == "*" and not ints:
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                    _check(_size(seq) * max(n, 0))
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check(_size(left) + _size(right))
        if operator == "%" and isinstance(left, str):
            _check_format(left)
            for a in right if isinstance(right, tuple) else (right,):
                _check_number(a)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        if __obj is _Range:  # its own cap is on items, not on the numbers
            _tick()
            return super().call(__context, __obj, *args, **kwargs)
        owner = getattr(__obj, "__self__", None)
        return _guard(
            getattr(__obj, "__name__", ""),
            lambda *a, **k: super(_Sandbox, __self).call(__context, __obj, *a, **k),
            owner if isinstance(owner, str) else _NO_VALUE,
            args,
            kwargs,
        )

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


_LOOP_FILTER = "mlxserve_loop"
_CONCAT_FILTER = "mlxserve_concat"


def _bounded_ast(ast: nodes.Template) -> nodes.Template:
    """Every loop ticks the deadline and every ``~`` checks its length before it joins."""
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
    for cat in list(ast.find_all(nodes.Concat)):
        # Turned into a filter in place: its parent holds this very object.
        items = nodes.List(cat.nodes, lineno=cat.lineno)
        del cat.nodes
        cat.__class__ = nodes.Filter
        cat.node, cat.name, cat.args, cat.kwargs, cat.dyn_args, cat.dyn_kwargs = (
            items,
            _CONCAT_FILTER,
            [],
            [],
            None,
            None,
        )
    return ast


@functools.cache
def _environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_finalize,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters[_LOOP_FILTER] = _ticking
    env.filters[_CONCAT_FILTER] = _concat
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _Range
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template uses it
    return env


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = _environment()
    return env.from_string(_bounded_ast(env.parse(template)))


def check_template(text: str) -> None:
    """Raise BadRequest unless ``text`` is a Jinja template that compiles, or a Go template
    that translates into one."""
    if is_go_template(text):
        from .gotemplate import translate

        text = translate(text).jinja
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(f"template syntax error on line {exc.lineno}: {exc.message}") from None
    except RecursionError:  # Jinja's parser recurses once per nesting level
        raise BadRequest("template nests too deeply") from None


def default_template(vocab: Iterable[str] = ()) -> str:
    """The built-in template for a model that carries none: Llama 3 if its vocabulary has the
    Llama 3 header tokens, else ChatML (what most small instruct models use)."""
    return LLAMA3_TEMPLATE if "<|start_header_id|>" in set(vocab) else CHATML_TEMPLATE


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    seconds: float | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` as a prompt; template errors become BadRequest.

    The output and every value the template builds stay within ``max_chars`` (else
    RenderTooLong) and the render ends after ``seconds`` (RENDER_SECONDS unless given; else
    RenderTimeout); both are 400s.
    This blocks for up to ``seconds``: servers call it on a worker thread.
    """
    context: dict[str, Any] = {"messages": messages, "add_generation_prompt": add_generation_prompt}
    if is_go_template(template):
        from .gotemplate import go_context, translate

        translated = translate(template)
        template = translated.jinja
        context.update(
            go_context(
                translated, messages, tools, extra.pop("enable_thinking", None), extra.pop("reasoning_effort", None)
            )
        )
    # Left undefined rather than None: Jinja renders None as the text "None".
    if bos_token is not None:
        context["bos_token"] = bos_token
    if eos_token is not None:
        context["eos_token"] = eos_token
    if tools is not None:
        context["tools"] = tools
    context.update(extra)
    seconds = RENDER_SECONDS if seconds is None else seconds
    reset = _LIMITS.set(_Limits(max_chars, time.monotonic() + seconds, seconds))
    try:
        pieces: list[str] = []
        n = 0
        for piece in _compile(template).generate(**context):
            n += len(piece)
            if n > max_chars:
                raise RenderTooLong(f"the rendered prompt is longer than {max_chars} characters")
            _tick()
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimit:
        raise
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(f"template syntax error on line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise BadRequest(f"chat template error: {exc.message or exc}") from None
    except Exception as exc:  # a template is user code: whatever it raises is the request's fault
        raise BadRequest(f"chat template error: {exc.__class__.__name__}: {exc}") from None
    finally:
        _LIMITS.reset(reset)
