"""One generation for the Anthropic Messages and OpenAI Responses routes: start it, collect it or
stream it as server-sent events, and read tool calls and the matched stop sequence off its end.

The request's conversation arrives here already in the chat-completions shape (roles, content
text, ``tool_calls``, ``tool_call_id``), so these routes share the chat route's rendering,
constrained decoding and batching rather than a copy of them.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from ..errors import BadRequest, MlxserveError
from ..specs.tools import (  # noqa: F401  (function_tools re-exported for the dialect modules)
    as_template_tools,
    function_tools,
    parse_tool_calls,
)
from . import generation as g

# Private helpers of the chat route, used as they are (see the lead's report: to be made public).
from .openai import (  # noqa: F401  (drain_all re-exported for the dialect modules)
    Merge,
    drain_all,
    request_options as openai_options,
    sse_response as openai_sse_response,
)


def sse(event: str, obj: dict) -> bytes:
    """One server-sent event, named as both dialects name theirs (the ``type`` of its data)."""
    return f"event: {event}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


IMAGES_UNSUPPORTED = "images are not supported by this model"


def parts_text(content, where: str, texts: dict[str, str], images: tuple[str, ...]) -> str:
    """A string, or content parts joined: ``texts`` maps each text part type to the key of its
    text; an image part is a 400 (no vision model yet); any other part type is a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts")
    out = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in texts:
            out.append(str(part.get(texts[kind], "")))
        elif kind in images:
            raise BadRequest(IMAGES_UNSUPPORTED)
        else:
            raise BadRequest(f"{where}[{i}].type '{kind}' is not supported here")
    return "".join(out)


def sampling_options(temperature, top_p, stop: list[str] | None) -> dict:
    """The chat route's option defaults (plain sampling) for these fields."""
    return openai_options({"temperature": temperature, "top_p": top_p, "stop": stop})


async def start(
    rt,
    resolved,
    request_opts: dict,
    *,
    messages: list[dict],
    tools: list[dict] | None,
    grammar: str | None,
    max_tokens: int | None,
    think=None,
    think_budget: int | None = None,
    think_strict: bool = True,
) -> g.Generation:
    """``tools``: normalised tools to render (None when the request's tool choice is none);
    ``think``: as Ollama's (specs/thinking.py), the reasoning capped at ``think_budget`` tokens."""
    opts = g.merge_options(resolved.spec.parameters, request_opts)
    return await g.start(
        rt,
        resolved,
        opts,
        rt.settings.keep_alive,
        messages=messages,
        max_tokens=max_tokens,
        tools=as_template_tools(tools) if tools else None,
        grammar=grammar,
        split_thinking=True,
        think=think,
        think_budget=think_budget,
        think_strict=think_strict,
    )


def tool_calls(text: str, tools: list[dict] | None) -> list[dict] | None:
    """[{name, arguments (an object)}] when the answer is a call of the given tools, else None."""
    return parse_tool_calls(text, tools) if tools else None


def matched_stop(gen: g.Generation, stops: list[str] | None) -> str | None:
    """The stop sequence that ended ``gen``, if one did. The engine drops the matched text and
    reports "stop" as for an end-of-sequence token; a stop string is the one case where the last
    token was kept (an end token never is), and the decoded tokens then go on with the match."""
    if not stops or gen.final is None or gen.final.finish != "stop" or not gen.final.token_ids:
        return None
    rest = gen.tokenizer.decode(gen.token_ids)[gen.raw_chars :]
    found = [(rest.find(s), s) for s in stops if s and s in rest]
    return min(found)[1] if found else None


def usage_counts(gen: g.Generation) -> tuple[int, int, int]:
    """(prompt tokens, generated tokens, prompt tokens reused from the cache)."""
    d = gen.durations()
    cached = gen.final.stats.cached_tokens if gen.final is not None and gen.final.stats else 0
    return d["prompt_eval_count"], d["eval_count"], cached


def sse_response(
    rt,
    gen: g.Generation,
    events: Callable[[AsyncIterator[g.Chunk]], AsyncIterator[bytes]],
    error_event: Callable[[MlxserveError], bytes],
):
    """A streamed answer: ``events`` turns the generation's chunks into the dialect's events; a
    failure after the stream began becomes ``error_event`` (openai.sse_response, with no
    closing ``[DONE]``)."""
    merge = Merge(rt.nursery, [gen])

    async def chunks():
        async for _, c in merge:
            yield c

    return openai_sse_response(merge, events(chunks()), error_event, done=b"")
