"""Chat templates: Jinja, rendered the way Hugging Face's ``apply_chat_template`` renders them.

Templates come from tokenizer_config.json, GGUF ``tokenizer.chat_template`` or a Modelfile
``TEMPLATE``. Ollama's Go templates are a different language; they are recognised and refused
with a message that says so, because a partial translation would silently change prompts.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any, Iterable

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

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

GO_TEMPLATE_MESSAGE = "Ollama Go templates are not supported; use a Jinja chat template"

# `{{ .Prompt }}`, `{{- if .System }}`, `{{ range .Messages }}`, `{{ end }}`, `{{ $.Tools }}`:
# Jinja never has a dot or `$` right after `{{`, and its control flow lives in `{% %}`.
_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:\.[A-Za-z_]|\$|(?:if|else|end|range|with|template|block|define)\b(?!\s*[\(\[\.|=+~]))"
)


def is_go_template(text: str) -> bool:
    return bool(_GO_ACTION.search(text))


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def check_template(text: str) -> None:
    """Raise BadRequest unless ``text`` is a Jinja template that compiles."""
    if is_go_template(text):
        raise BadRequest(GO_TEMPLATE_MESSAGE)
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(f"template syntax error on line {exc.lineno}: {exc.message}") from None


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
    **extra: Any,
) -> str:
    """Render ``messages`` as a prompt; template errors become BadRequest."""
    if is_go_template(template):
        raise BadRequest(GO_TEMPLATE_MESSAGE)
    context: dict[str, Any] = {"messages": messages, "add_generation_prompt": add_generation_prompt}
    # Left undefined rather than None: Jinja renders None as the text "None".
    if bos_token is not None:
        context["bos_token"] = bos_token
    if eos_token is not None:
        context["eos_token"] = eos_token
    if tools is not None:
        context["tools"] = tools
    context.update(extra)
    try:
        return _compile(template).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(f"template syntax error on line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise BadRequest(f"chat template error: {exc.message or exc}") from None
    except Exception as exc:  # a template is user code: whatever it raises is the request's fault
        raise BadRequest(f"chat template error: {exc.__class__.__name__}: {exc}") from None
