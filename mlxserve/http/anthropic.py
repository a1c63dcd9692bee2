"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens.

The request becomes a chat-completions conversation (system, text, tool_use and tool_result
blocks) and runs through the same rendering, constrained decoding and batch as /v1/chat/completions.
"""

from __future__ import annotations

import functools
import json
import uuid

import trio
from quart import Blueprint

from ..actors.sequence import grammar_for_schema
from ..errors import BadRequest
from ..specs.tools import CallStream, as_template_tools, call_schema
from . import generation as g, relay
from .common import field, json_body, json_response, runtime

bp = Blueprint("anthropic", __name__)

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def _text_of(blocks, where: str) -> str:
    """A string, or text blocks joined (system, tool_result content)."""
    return relay.parts_text(blocks, where, {"text": "text"}, ("image",))


def _conversation(body: dict) -> list[dict]:
    """system + messages -> chat messages. A tool_result becomes a "tool" message (before the
    user's text of that turn, as the results answer the previous turn's calls)."""
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_of(body["system"], "system")})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty array")
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or an array of content blocks")
        text, calls, extra = [], [], {}
        images: list[str] = []
        for k, b in enumerate(content):
            where = f"messages[{i}].content[{k}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text":
                text.append(str(b.get("text", "")))
            elif kind == "image" and role == "user":
                images.append(_image_source(b.get("source"), where))
            elif kind == "thinking" and role == "assistant":
                thought = b.get("thinking")
                if isinstance(thought, str) and thought:  # replayed as templates name it
                    extra = {"thinking": thought, "reasoning_content": thought}
            elif kind == "redacted_thinking":
                continue  # opaque to any model here
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise BadRequest(f"{where} needs a name and an input object")
                calls.append(
                    {
                        "id": b.get("id"),
                        "type": "function",
                        "function": {"name": b["name"], "arguments": b.get("input") or {}},
                    }
                )
            elif kind == "tool_result" and role == "user":
                result = _text_of(b.get("content") or "", f"{where}.content")
                if b.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "content": result, "tool_call_id": b.get("tool_use_id")})
            else:
                raise BadRequest(f"{where}.type '{kind}' is not supported in a {role} message")
        if text or calls or not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            msg = {"role": role, "content": "".join(text), **extra}
            if calls:
                msg["tool_calls"] = calls
            if images:
                msg["images"] = images
            out.append(msg)
    return out


def _image_source(source, where: str) -> str:
    """An image block's base64 source as a data URL (decoded in generation.start)."""
    if not isinstance(source, dict) or source.get("type") != "base64" or not isinstance(source.get("data"), str):
        raise BadRequest(f"{where}.source must be {{type: base64, media_type, data}} (image URLs are not fetched)")
    return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"


def _tools(body: dict) -> list[dict]:
    return relay.function_tools(
        body.get("tools"),
        "custom",
        "custom",
        lambda t: {"name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("input_schema")},
    )


def _tool_choice(body: dict, tools: list[dict]) -> tuple[str, str | None]:
    """(auto | any | tool | none, the named tool)."""
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise BadRequest("tool_choice.type must be auto, any, tool or none")
    name = choice.get("name") if kind == "tool" else None
    if kind == "tool" and not isinstance(name, str):
        raise BadRequest("tool_choice of type tool needs a name")
    if kind in ("any", "tool") and not tools:
        raise BadRequest(f"tool_choice '{kind}' needs tools")
    return kind, name


def _grammar(body: dict, tools: list[dict], choice: str, name: str | None) -> str | None:
    if choice in ("any", "tool"):
        return grammar_for_schema(call_schema(tools, name))
    fmt = (field(body, "output_config", dict) or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequest("output_config.format must be {type: json_schema, schema: {...}}")
    return grammar_for_schema(fmt["schema"])


def _thinking(body: dict) -> tuple[bool | None, int | None]:
    """(think, budget): enabled thinks within ``budget_tokens``, disabled does not, adaptive or
    none leaves it to the model (a model that thinks does, as through Ollama's API)."""
    t = field(body, "thinking", dict)
    if t is not None and t.get("type") not in ("enabled", "disabled", "adaptive"):
        raise BadRequest("thinking.type must be enabled, disabled or adaptive")
    if t is not None and t.get("type") == "enabled":
        budget = t.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise BadRequest("thinking.budget_tokens must be a positive integer")
        return True, budget
    return (False if t is not None and t.get("type") == "disabled" else None), None


def _stop_sequences(body: dict) -> list[str] | None:
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise BadRequest("stop_sequences must be an array of strings")
    return stops or None


def _sampling(body: dict, stops: list[str] | None) -> dict:
    """Only what the request sets: Anthropic's SDK no longer sends sampling settings, so the
    model's own parameters (its Modelfile) decide the rest, as they do for Ollama's API."""
    opts = {k: v for k in ("temperature", "top_p") if (v := field(body, k, float)) is not None}
    if (top_k := field(body, "top_k", int)) is not None:
        opts["top_k"] = top_k
    return {**opts, "stop": stops} if stops else opts


@bp.post("/v1/messages")
async def messages():
    body = await json_body()
    name = field(body, "model", str, required=True)
    max_tokens = field(body, "max_tokens", int, required=True)
    if max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1")
    conversation = _conversation(body)
    tools = _tools(body)
    choice, tool_name = _tool_choice(body, tools)
    grammar = _grammar(body, tools, choice, tool_name)
    think, budget = _thinking(body)
    field(body, "metadata", dict)
    stops = _stop_sequences(body)
    opts = _sampling(body, stops)
    stream = field(body, "stream", bool, default=False)
    single = bool((body.get("tool_choice") or {}).get("disable_parallel_tool_use"))
    active = tools if choice != "none" else None
    rt = runtime()
    resolved = await rt.store.resolve(name)
    # Claude Code asks every model to think: one that cannot answers without (as Ollama relaxes it).
    gen = await relay.start(
        rt,
        resolved,
        opts,
        messages=conversation,
        tools=active,
        grammar=grammar,
        max_tokens=max_tokens,
        think=think,
        think_budget=budget,
        think_strict=False,
    )
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"

    def blocks_and_reason() -> tuple[list[dict], str, str | None]:
        text, thought = "".join(gen.text), "".join(gen.thinking)
        head = [_thinking_block(thought)] if thought else []
        calls = relay.tool_calls(text, active)
        if calls:
            calls = calls[:1] if single else calls
            return (
                head
                + [
                    {
                        "type": "tool_use",
                        "id": f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": c["name"],
                        "input": c["arguments"],
                    }
                    for c in calls
                ],
                "tool_use",
                None,
            )
        stop = relay.matched_stop(gen, stops)
        reason = "max_tokens" if gen.done_reason == "length" else "stop_sequence" if stop else "end_turn"
        return head + ([{"type": "text", "text": text}] if text else []), reason, stop

    def usage() -> dict:
        prompt, out, cached = relay.usage_counts(gen)
        return {
            "input_tokens": prompt,
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }

    def message(content: list[dict], reason: str | None, stop: str | None) -> dict:
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": name,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": stop,
            "usage": usage(),
        }

    if not stream:
        await relay.drain_all([gen])
        return json_response(message(*blocks_and_reason()))

    def event(kind: str, **data) -> bytes:
        return relay.sse(kind, {"type": kind, **data})

    async def events(chunks):
        yield event("message_start", message={**message([], None, None), "usage": {**usage(), "output_tokens": 0}})
        yield event("ping")
        # Reasoning, text and each tool call stream as they come, each in its own block (text
        # that may become a call is held). ``at``: the open block's index and type.
        at: list = [-1, None]
        calls_in = CallStream(active) if active else None

        def switch(kind: str, block: dict | None = None) -> list[bytes]:
            out = []
            if at[1] == "thinking":
                out.append(
                    event("content_block_delta", index=at[0], delta={"type": "signature_delta", "signature": ""})
                )
            if at[1] is not None:
                out.append(event("content_block_stop", index=at[0]))
            at[0], at[1] = at[0] + 1, kind
            start = block or {"thinking": _thinking_block(""), "text": {"type": "text", "text": ""}}.get(kind)
            if start is not None:
                out.append(event("content_block_start", index=at[0], content_block=start))
            return out

        def text_and_calls(text: str, calls: list[dict]) -> list[bytes]:
            out = []
            if text:
                out += switch("text") if at[1] != "text" else []
                out.append(event("content_block_delta", index=at[0], delta={"type": "text_delta", "text": text}))
            for c in calls[: max(0, 1 - calls_in.sent + len(calls))] if single else calls:
                out += switch(
                    "tool_use",
                    {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": c["name"], "input": {}},
                )
                out.append(
                    event(
                        "content_block_delta",
                        index=at[0],
                        delta={
                            "type": "input_json_delta",
                            "partial_json": json.dumps(c["arguments"], ensure_ascii=False),
                        },
                    )
                )
            return out

        async for c in chunks:
            if getattr(c, "thinking", ""):
                for e in switch("thinking") if at[1] != "thinking" else ():
                    yield e
                yield event(
                    "content_block_delta", index=at[0], delta={"type": "thinking_delta", "thinking": c.thinking}
                )
            for e in text_and_calls(*calls_in.feed(c.text)) if calls_in else text_and_calls(c.text, []):
                yield e
        for e in text_and_calls(*calls_in.finish()) if calls_in else ():
            yield e
        blocks, reason, stop = blocks_and_reason()
        if at[1] is None:  # an empty answer still has its (empty) text block
            for e in switch("text"):
                yield e
        for e in switch("done"):
            yield e
        yield event(
            "message_delta",
            delta={"stop_reason": reason, "stop_sequence": stop},
            usage={"output_tokens": usage()["output_tokens"]},
        )
        yield event("message_stop")

    return relay.sse_response(rt, gen, events, lambda exc: relay.sse("error", error_body(exc.status, str(exc))))


def _thinking_block(thought: str) -> dict:
    """A thinking block; the signature Anthropic's models attach is empty (nothing to verify)."""
    return {"type": "thinking", "thinking": thought, "signature": ""}


@bp.post("/v1/messages/count_tokens")
async def count_tokens():
    body = await json_body()
    name = field(body, "model", str, required=True)
    conversation = _conversation(body)
    tools = _tools(body)
    choice, _ = _tool_choice(body, tools)
    think, _ = _thinking(body)
    rt = runtime()
    resolved = await rt.store.resolve(name)
    if any(m.get("images") for m in conversation):
        # An image is as many tokens as the vision processor makes of it (a fixed run, or one by
        # the image's size), which only the engine knows: the request is prefilled for one token,
        # as /v1/messages would run it, and the count is what that reads (its input_tokens).
        gen = await relay.start(
            rt,
            resolved,
            {},
            messages=conversation,
            tools=tools if choice != "none" else None,
            grammar=None,
            max_tokens=1,
            think=think,
            think_strict=False,
        )
        await relay.drain_all([gen])
        return json_response({"input_tokens": relay.usage_counts(gen)[0]})
    lease, _ = await g.acquire(rt, resolved, g.merge_options(resolved.spec.parameters, {}), rt.settings.keep_alive)
    try:
        tok = lease.handle.tokenizer
        rendered = tools if choice != "none" else None
        # The whole conversation, however long: a window the size of the body never drops a message.
        window = max(lease.handle.context_length, len(json.dumps(body)))
        work = functools.partial(
            g.fit_chat, resolved, tok, conversation, as_template_tools(rendered) if rendered else None, window
        )
        ids = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    finally:
        lease.release(rt.settings.keep_alive)
    return json_response({"input_tokens": len(ids)})
