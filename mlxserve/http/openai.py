"""OpenAI-compatible API: /v1/*."""

from __future__ import annotations

import json
import time
import uuid

import trio
from quart import Blueprint

from ..errors import BadRequest, MlxserveError
from . import generation as g
from .common import field, json_body, json_response, runtime, stream_response

bp = Blueprint("openai", __name__)

_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _content_text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content-part arrays: text parts only
        parts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise BadRequest(f"messages[{i}].content parts must be objects with a type")
            if part["type"] == "text":
                parts.append(str(part.get("text", "")))
            elif part["type"] in ("image_url", "input_image", "input_audio"):
                raise BadRequest("model does not support images")
            else:
                raise BadRequest(f"unsupported content part type '{part['type']}'")
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or an array of parts")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty array")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role '{role}' is not supported")
        msg = {"role": role, "content": _content_text(m.get("content"), i)}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _options(body: dict) -> dict:
    opts: dict = {}
    for src, dst, kind in (
        ("temperature", "temperature", float), ("top_p", "top_p", float), ("seed", "seed", int),
        ("presence_penalty", "presence_penalty", float), ("frequency_penalty", "frequency_penalty", float),
    ):
        v = field(body, src, kind)
        if v is not None:
            opts[dst] = v
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or an array of strings")
        opts["stop"] = stop
    # OpenAI's default is plain sampling: no repeat penalty unless asked for.
    opts.setdefault("repeat_penalty", 1.0)
    opts.setdefault("top_k", 0)
    return opts


def _max_tokens(body: dict) -> int | None:
    n = field(body, "max_completion_tokens", int)
    if n is None:
        n = field(body, "max_tokens", int)
    if n is not None and n <= 0:
        raise BadRequest("max_tokens must be positive")
    return n


def _usage(gen: g.Generation) -> dict:
    d = gen.durations()
    return {
        "prompt_tokens": d["prompt_eval_count"],
        "completion_tokens": d["eval_count"],
        "total_tokens": d["prompt_eval_count"] + d["eval_count"],
        "prompt_tokens_details": {"cached_tokens": gen.final.stats.cached_tokens if gen.final and gen.final.stats else 0},
    }


@bp.post("/v1/chat/completions")
async def chat_completions():
    body = await json_body()
    name = field(body, "model", str, required=True)
    messages = _messages(body)
    stream = field(body, "stream", bool, default=False)
    stream_options = field(body, "stream_options", dict) or {}
    if field(body, "n", int, default=1) != 1:
        raise BadRequest("n > 1 is not supported yet")
    rt = runtime()
    resolved = await rt.store.resolve(name)
    opts = g.merge_options(resolved.spec.parameters, _options(body))
    keep_alive = rt.settings.keep_alive
    gen = await g.start(rt, resolved, opts, keep_alive, messages=messages, max_tokens=_max_tokens(body),
                        tools=field(body, "tools", list))
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    base = {"id": cid, "created": created, "model": name, "system_fingerprint": "mlxserve"}

    record = gen.record

    if not stream:
        await _drain(gen)
        return json_response({
            **base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(gen.text)},
                         "logprobs": None, "finish_reason": _FINISH[gen.done_reason]}],
            "usage": _usage(gen),
        })

    async def body_iter():
        chunk_base = {**base, "object": "chat.completion.chunk"}
        try:
            yield _sse({**chunk_base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
            async for c in g.chunks(gen):
                if c.text:
                    yield _sse({**chunk_base, "choices": [{"index": 0, "delta": {"content": c.text},
                                                           "logprobs": None, "finish_reason": None}]})
            yield _sse({**chunk_base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": _FINISH[gen.done_reason]}]})
            if stream_options.get("include_usage"):
                yield _sse({**chunk_base, "choices": [], "usage": _usage(gen)})
            yield b"data: [DONE]\n\n"
            record(200)
        except MlxserveError as exc:
            record(exc.status, str(exc))
            yield _sse({"error": {"message": str(exc), "type": exc.kind, "param": None, "code": None}})
        except trio.Cancelled:
            record(499)
            raise

    return stream_response(body_iter(), gen.release, "text/event-stream")


@bp.post("/v1/completions")
async def completions():
    body = await json_body()
    name = field(body, "model", str, required=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    stream = field(body, "stream", bool, default=False)
    rt = runtime()
    resolved = await rt.store.resolve(name)
    opts = g.merge_options(resolved.spec.parameters, _options(body))
    max_tokens = _max_tokens(body) or 16  # OpenAI's documented default for completions
    gen = await g.start(rt, resolved, opts, rt.settings.keep_alive, prompt_text=prompt, max_tokens=max_tokens)
    base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": name}
    if not stream:
        await _drain(gen)
        return json_response({**base, "choices": [{"index": 0, "text": "".join(gen.text), "logprobs": None,
                                                    "finish_reason": _FINISH[gen.done_reason]}],
                              "usage": _usage(gen)})

    async def body_iter():
        try:
            async for c in g.chunks(gen):
                if c.text:
                    yield _sse({**base, "choices": [{"index": 0, "text": c.text, "logprobs": None,
                                                     "finish_reason": None}]})
            yield _sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": _FINISH[gen.done_reason]}]})
            yield b"data: [DONE]\n\n"
            gen.record(200)
        except MlxserveError as exc:
            gen.record(exc.status, str(exc))
            yield _sse({"error": {"message": str(exc), "type": exc.kind, "param": None, "code": None}})
        except trio.Cancelled:
            gen.record(499)
            raise

    return stream_response(body_iter(), gen.release, "text/event-stream")


async def _drain(gen: g.Generation) -> None:
    """A non-streaming answer: collect every chunk; a client leaving cancels it at any await."""
    try:
        async for _ in g.chunks(gen):
            pass
    except trio.Cancelled:
        gen.record(499)
        raise
    except MlxserveError as exc:
        gen.record(exc.status, exc)
        raise
    finally:
        gen.release()
    gen.record(200)


def _model_obj(m) -> dict:
    return {"id": m.display, "object": "model", "created": int(m.modified_at.timestamp()), "owned_by": "library"}


@bp.get("/v1/models")
async def models():
    ms = await runtime().store.list()
    return json_response({"object": "list", "data": [_model_obj(m) for m in ms]})


@bp.get("/v1/models/<path:model_id>")
async def model(model_id: str):
    return json_response(_model_obj(await runtime().store.resolve(model_id)))
