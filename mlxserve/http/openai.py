"""OpenAI-compatible API: /v1/*."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from contextlib import aclosing, suppress
from typing import AsyncIterator, Callable

import trio
from quart import Blueprint, Response

from ..actors.sequence import ANY_JSON_OBJECT, grammar_for_schema
from ..errors import BadRequest, EngineError, MlxserveError, ShuttingDown
from ..specs.thinking import think_from_effort
from ..specs.tools import CallStream, as_template_tools, call_schema, normalize_tools, parse_tool_calls
from . import generation as g
from .common import field, json_body, json_response, runtime, stream_response

bp = Blueprint("openai", __name__)
log = logging.getLogger("mlxserve.http")
MAX_N = 128  # OpenAI's own cap on choices per request

_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _sse_error(exc: MlxserveError) -> bytes:
    return _sse({"error": {"message": str(exc), "type": exc.kind, "param": None, "code": None}})


def sse_response(
    merge: Merge,
    events: AsyncIterator[bytes],
    error_event: Callable[[MlxserveError], bytes] = _sse_error,
    done: bytes = b"data: [DONE]\n\n",
) -> Response:
    """An SSE body for every dialect (relay.py's too): the events, then ``done``; a failure after
    streaming began becomes a final ``error_event``. Each choice is recorded once, with the
    status the client effectively got; the leases and sequences go with the body."""

    def record(status: int, error: str | None = None) -> None:
        for x in merge.gens:
            x.record(status, error)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
            if done:
                yield done
            record(200)
        except MlxserveError as exc:
            record(exc.status, str(exc))
            yield error_event(exc)
        except trio.Cancelled:
            record(499)
            raise

    return stream_response(body(), merge.close, "text/event-stream")


class Merge:
    """A stream's choices as one async iterator of (index, chunk), each chunk as it comes; the
    iteration ends when every choice has finished, and a choice's failure is raised.

    Each choice is read by its own task in the runtime's nursery (an async generator must not
    hold a nursery open across a yield); ``close`` (synchronous: the body's cleanup) stops them
    and releases every choice's lease and sequence.
    """

    def __init__(self, nursery: trio.Nursery, gens: list[g.Generation]):
        self.gens = gens
        self._nursery = nursery
        self._send, self._recv = trio.open_memory_channel(math.inf)  # bounded by the budgets
        self._scope: trio.CancelScope | None = None
        self._left = len(gens)

    def close(self) -> None:
        self._recv.close()
        if self._scope is not None:
            self._scope.cancel()
        for x in self.gens:
            x.release()

    def __aiter__(self) -> Merge:
        return self

    async def __anext__(self) -> tuple[int, g.Chunk]:
        if self._scope is None:
            try:
                self._scope = await self._nursery.start(self._pump)
            except RuntimeError:  # the runtime's nursery is closing
                raise ShuttingDown() from None
        try:
            i, item = await self._recv.receive()
        except trio.EndOfChannel:
            if self._left:
                raise EngineError("the model stopped before finishing this request") from None
            raise StopAsyncIteration from None
        if isinstance(item, MlxserveError):
            raise item
        if item.finish is not None:
            self._left -= 1
        return i, item

    async def _pump(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with self._send, trio.open_nursery() as nursery:
                for i, x in enumerate(self.gens):
                    nursery.start_soon(self._forward, i, x)

    async def _forward(self, i: int, gen: g.Generation) -> None:
        try:
            async with aclosing(g.chunks(gen)) as chunks:
                async for c in chunks:
                    self._send.send_nowait((i, c))
            return
        except trio.BrokenResourceError:
            return  # the client is gone
        except MlxserveError as exc:
            failure = exc
        except Exception as exc:  # a bug here must fail the request, not the runtime
            log.exception("streaming choice %d failed", i)
            failure = EngineError(f"streaming failed: {exc}")
        with suppress(trio.BrokenResourceError):
            self._send.send_nowait((i, failure))


def _content_text(content, i: int, images: list[str] | None = None) -> str:
    """Text parts joined; ``image_url`` parts (data URLs) go to ``images`` where given."""
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
            elif part["type"] == "image_url" and images is not None:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(f"messages[{i}].content: image_url.url must be a string")
                images.append(url)
            elif part["type"] in ("image_url", "input_image", "input_audio"):
                raise BadRequest(
                    g.IMAGES_UNSUPPORTED if part["type"] != "input_audio" else "audio input is not supported"
                )
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
        images: list[str] = []
        msg = {"role": role, "content": _content_text(m.get("content"), i, images if role == "user" else None)}
        if images:
            msg["images"] = images
        reasoning = m.get("reasoning_content") or m.get("reasoning")
        if role == "assistant" and isinstance(reasoning, str) and reasoning:  # as templates name it
            msg["reasoning_content"] = msg["thinking"] = reasoning
        if m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest(f"messages[{i}].tool_calls must be an array")
            msg["tool_calls"] = [template_call(c, i) for c in calls]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def template_call(call, i: int) -> dict:
    """OpenAI's call (arguments as a JSON string) -> what chat templates render (an object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"messages[{i}].tool_calls entries need function.name")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            raise BadRequest(f"messages[{i}].tool_calls arguments must be JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def request_options(body: dict) -> dict:
    opts: dict = {}
    for src, kind in (
        ("temperature", float),
        ("top_p", float),
        ("seed", int),
        ("presence_penalty", float),
        ("frequency_penalty", float),
    ):
        v = field(body, src, kind)
        if v is not None:
            opts[src] = v
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or an array of strings")
        opts["stop"] = stop
    # OpenAI's default is plain sampling: no repeat penalty, no top-k, temperature 1.
    opts.setdefault("repeat_penalty", 1.0)
    opts.setdefault("top_k", 0)
    opts.setdefault("temperature", 1.0)
    opts.setdefault("top_p", 1.0)
    return opts


def _max_tokens(body: dict) -> int | None:
    n = field(body, "max_completion_tokens", int)
    if n is None:
        n = field(body, "max_tokens", int)
    if n is not None and n <= 0:
        raise BadRequest("max_tokens must be positive")
    return n


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = field(body, "logit_bias", dict)
    if not bias:
        return None
    try:
        return {int(k): max(-100.0, min(100.0, float(v))) for k, v in bias.items()}
    except (TypeError, ValueError):
        raise BadRequest("logit_bias must map token ids to numbers") from None


def _n(body: dict) -> int:
    n = field(body, "n", int, default=1)
    if not 1 <= n <= MAX_N:
        raise BadRequest(f"n must be between 1 and {MAX_N}")
    return n


def _include_usage(body: dict) -> bool:
    return bool((field(body, "stream_options", dict) or {}).get("include_usage"))


def _top_logprobs(body: dict, legacy: bool = False) -> int | None:
    if legacy:  # /v1/completions: logprobs is the number of alternatives
        v = body.get("logprobs")
        return None if v is None else g.check_top_logprobs(v)
    if not field(body, "logprobs", bool, default=False):
        return None
    return g.check_top_logprobs(body.get("top_logprobs") or 0)


def _grammar(body: dict, tools: list[dict]) -> tuple[str | None, bool]:
    """(grammar, forced_call) from response_format and tool_choice."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    if tools and choice == "required":
        return grammar_for_schema(call_schema(tools)), True
    if tools and isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise BadRequest("tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}")
        return grammar_for_schema(call_schema(tools, name)), True
    if choice not in ("auto", "none", "required") and not isinstance(choice, dict):
        raise BadRequest("tool_choice must be 'none', 'auto', 'required' or a named function")
    rf = body.get("response_format")
    if rf is None:
        return None, False
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("response_format.type must be text, json_object or json_schema")
    if rf["type"] == "json_object":
        return grammar_for_schema(ANY_JSON_OBJECT), False
    if rf["type"] == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
        return grammar_for_schema(spec.get("schema") or ANY_JSON_OBJECT), False
    return None, False


def reasoning_think(body: dict):
    """``reasoning_effort`` (or ``reasoning.effort``) as a think value; None: the model's default."""
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    return think_from_effort(effort)


def _usage(gens: list[g.Generation], n: int) -> dict:
    """Counts for the whole request: each prompt once (gens holds n choices per prompt)."""
    prompt = sum(x.durations()["prompt_eval_count"] for x in gens[::n])
    completion = sum(x.durations()["eval_count"] for x in gens)
    cached = max((x.final.stats.cached_tokens for x in gens if x.final and x.final.stats), default=0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _lp_entry(tok, t: int, lp: float, alts) -> dict:
    text = g.token_text(tok, t)
    return {
        "token": text,
        "logprob": lp,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": g.token_text(tok, a), "logprob": alp, "bytes": list(g.token_text(tok, a).encode())}
            for a, alp in alts
        ],
    }


def _tool_calls(text: str, tools: list[dict], forced: bool, choice) -> list[dict] | None:
    if not tools or choice == "none":
        return None
    calls = parse_tool_calls(text, tools)
    if calls is None:
        return None
    return [_call_out(c) for c in calls]


def _call_out(call: dict) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
    }


async def _start_all(rt, resolved, opts, n: int, **kw) -> list[g.Generation]:
    """n copies of one request, each its own sequence in the running batch."""
    gens: list[g.Generation] = []
    try:
        for _ in range(n):
            gens.append(await g.start(rt, resolved, opts, rt.settings.keep_alive, **kw))
    except BaseException:
        for x in gens:
            x.release()
        raise
    return gens


async def drain_all(gens: list[g.Generation]) -> None:
    """Non-streaming: collect every copy; a client leaving cancels them at any await."""
    try:
        async with trio.open_nursery() as nursery:
            for x in gens:
                nursery.start_soon(_drain, x)
    except BaseExceptionGroup as group:  # surface the first domain error as itself (status code)
        first = next((e for e in _leaves(group) if isinstance(e, MlxserveError)), None)
        if first is not None:
            raise first from None
        raise


def _leaves(group: BaseExceptionGroup):
    for e in group.exceptions:
        yield from (_leaves(e) if isinstance(e, BaseExceptionGroup) else (e,))


async def _drain(gen: g.Generation) -> None:
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


@bp.post("/v1/chat/completions")
async def chat_completions():
    body = await json_body()
    name = field(body, "model", str, required=True)
    messages = _messages(body)
    stream = field(body, "stream", bool, default=False)
    include_usage = _include_usage(body)
    n = _n(body)
    tools = normalize_tools(body.get("tools"))
    choice = body.get("tool_choice", "auto" if tools else "none")
    grammar, forced = _grammar(body, tools)
    top = _top_logprobs(body)
    think = reasoning_think(body)
    rt = runtime()
    resolved = await rt.store.resolve(name)
    opts = g.merge_options(resolved.spec.parameters, request_options(body))
    gens = await _start_all(
        rt,
        resolved,
        opts,
        n,
        messages=messages,
        max_tokens=_max_tokens(body),
        tools=as_template_tools(tools) if tools and choice != "none" else None,
        grammar=grammar,
        logprobs=top,
        logit_bias=_logit_bias(body),
        split_thinking=True,
        think=think,
    )
    tok = gens[0].tokenizer
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": name,
        "system_fingerprint": "mlxserve",
    }

    def choice_of(i: int, x: g.Generation) -> dict:
        text = "".join(x.text)
        calls = _tool_calls(text, tools, forced, choice)
        message = {"role": "assistant", "content": None if calls else text}
        if "".join(x.thinking):
            message["reasoning_content"] = "".join(x.thinking)
        if calls:
            message["tool_calls"] = calls
        lp = {"content": [_lp_entry(tok, *e) for e in x.logprob_entries]} if top is not None else None
        return {
            "index": i,
            "message": message,
            "logprobs": lp,
            "finish_reason": "tool_calls" if calls else _FINISH[x.done_reason],
        }

    if not stream:
        await drain_all(gens)
        return json_response(
            {
                **base,
                "object": "chat.completion",
                "choices": [choice_of(i, x) for i, x in enumerate(gens)],
                "usage": _usage(gens, n),
            }
        )

    hold = bool(tools) and choice != "none"
    merge = Merge(rt.nursery, gens)

    async def body_iter():
        # With include_usage every chunk carries "usage": null but the last, as OpenAI's do.
        chunk_base = {**base, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}

        def delta(i: int, d: dict, finish=None, lp=None) -> bytes:
            return _sse({**chunk_base, "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}]})

        # With tools, text that may become a call is held; each call goes out as it completes.
        streams = [CallStream(tools) for _ in gens] if hold else []

        def text_and_calls(i: int, text: str, calls: list[dict]) -> list[bytes]:
            first = streams[i].sent - len(calls)
            return ([delta(i, {"content": text})] if text else []) + (
                [delta(i, {"tool_calls": [{"index": first + k, **_call_out(c)} for k, c in enumerate(calls)]})]
                if calls
                else []
            )

        def ending(i: int, x: g.Generation) -> list[bytes]:
            finish, out = _FINISH[x.done_reason], []
            if hold:
                out = text_and_calls(i, *streams[i].finish())
                if streams[i].sent:
                    finish = "tool_calls"
            return [*out, delta(i, {}, finish)]

        for i in range(n):
            yield delta(i, {"role": "assistant", "content": ""})
        async for i, c in merge:
            if getattr(c, "thinking", ""):  # reasoning streams as it comes, even while a call is held
                yield delta(i, {"reasoning_content": c.thinking})
            if hold and c.text:
                for event in text_and_calls(i, *streams[i].feed(c.text)):
                    yield event
            elif not hold:
                lp = {"content": [_lp_entry(tok, *e) for e in c.logprobs]} if top is not None and c.logprobs else None
                if c.text or lp:
                    yield delta(i, {"content": c.text}, lp=lp)
            if c.finish is not None:
                for event in ending(i, gens[i]):
                    yield event
        if include_usage:
            yield _sse({**chunk_base, "choices": [], "usage": _usage(gens, n)})

    return sse_response(merge, body_iter())


def _prompts(body: dict) -> list[str | list[int]]:
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [p]  # one prompt given as token ids
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return p
    if isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        return p
    raise BadRequest("prompt must be a string, an array of strings, or token ids")


@bp.post("/v1/completions")
async def completions():
    body = await json_body()
    name = field(body, "model", str, required=True)
    prompts = _prompts(body)
    stream = field(body, "stream", bool, default=False)
    include_usage = _include_usage(body)
    echo = field(body, "echo", bool, default=False)
    if field(body, "suffix", str):
        raise BadRequest(f'"{name}" does not support insert (suffix)')
    n = _n(body)
    if len(prompts) * n > MAX_N:
        raise BadRequest(f"prompts times n must be at most {MAX_N}")
    top = _top_logprobs(body, legacy=True)
    rt = runtime()
    resolved = await rt.store.resolve(name)
    opts = g.merge_options(resolved.spec.parameters, request_options(body))
    max_tokens = _max_tokens(body) or 16  # OpenAI's documented default for completions
    gens: list[g.Generation] = []
    try:
        for p in prompts:
            kw = {"prompt_ids": p} if isinstance(p, list) else {"prompt_text": p}
            gens += await _start_all(
                rt, resolved, opts, n, max_tokens=max_tokens, logprobs=top, logit_bias=_logit_bias(body), **kw
            )
    except BaseException:
        for x in gens:
            x.release()
        raise
    base = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
    }
    tok = gens[0].tokenizer

    def legacy_lp(entries, at: int) -> dict:
        """OpenAI's legacy logprobs; text_offset counts from the start of the choice's text
        (``at``: where these tokens begin)."""
        tokens = [g.token_text(tok, t) for t, _, _ in entries]
        offsets = []
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{g.token_text(tok, a): alp for a, alp in alts} for _, _, alts in entries],
            "text_offset": offsets,
        }

    def prefix(x: g.Generation) -> str:
        return tok.decode(x.prompt_ids) if echo else ""

    if not stream:
        await drain_all(gens)
        return json_response(
            {
                **base,
                "choices": [
                    {
                        "index": i,
                        "text": prefix(x) + "".join(x.text),
                        "logprobs": legacy_lp(x.logprob_entries, len(prefix(x))) if top is not None else None,
                        "finish_reason": _FINISH[x.done_reason],
                    }
                    for i, x in enumerate(gens)
                ],
                "usage": _usage(gens, n),
            }
        )

    merge = Merge(rt.nursery, gens)

    async def body_iter():
        chunk_base = {**base, **({"usage": None} if include_usage else {})}

        def piece(i: int, text: str, lp=None, finish=None) -> bytes:
            return _sse(
                {**chunk_base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
            )

        offsets = [0] * len(gens)  # where each choice's next logprob token begins in its text
        for i, x in enumerate(gens):
            if echo:
                offsets[i] = len(prefix(x))
                yield piece(i, prefix(x))
        async for i, c in merge:
            lp = None
            if top is not None and c.logprobs:
                lp = legacy_lp(c.logprobs, offsets[i])
                offsets[i] += sum(len(t) for t in lp["tokens"])
            if c.text or lp:
                yield piece(i, c.text, lp)
            if c.finish is not None:
                yield piece(i, "", finish=_FINISH[gens[i].done_reason])
        if include_usage:
            yield _sse({**chunk_base, "choices": [], "usage": _usage(gens, n)})

    return sse_response(merge, body_iter())


def _model_obj(m) -> dict:
    return {"id": m.display, "object": "model", "created": int(m.modified_at.timestamp()), "owned_by": "library"}


@bp.get("/v1/models")
async def models():
    ms = await runtime().store.list()
    return json_response({"object": "list", "data": [_model_obj(m) for m in ms]})


@bp.get("/v1/models/<path:model_id>")
async def model(model_id: str):
    return json_response(_model_obj(await runtime().store.resolve(model_id)))
