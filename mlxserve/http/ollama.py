"""Ollama's native API: /api/*."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import attrs
import trio
from quart import Blueprint, Response, current_app

from .. import __version__
from ..actors import group as dist_group
from ..actors.mailbox import post_nowait_or_drop
from ..errors import BadRequest, MlxserveError
from ..specs.modelfile import MESSAGE_ROLES, Modelfile
from ..specs.thinking import parse_think
from ..specs.tools import CallStream, as_template_tools, normalize_tools, parse_tool_calls
from ..store.create import ADAPTERS_UNSUPPORTED
from . import generation as g
from .common import (
    field,
    json_body,
    json_response,
    keep_alive_of,
    ndjson,
    runtime,
    stream_response,
)

bp = Blueprint("ollama", __name__)
log = logging.getLogger(__name__)


def _iso(ts: float | datetime | None) -> str | None:
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        try:
            ts = datetime.fromtimestamp(ts, UTC)
        except (OverflowError, ValueError, OSError):  # inf ("forever") or past any calendar
            ts = datetime(2318, 1, 1, tzinfo=UTC)  # what Ollama shows for "forever"
    return ts.isoformat().replace("+00:00", "Z")


@bp.route("/", methods=["GET", "HEAD"])
async def root():
    return Response("mlxserve is running", mimetype="text/plain")


@bp.get("/api/version")
async def version():
    return json_response({"version": __version__})


@bp.route("/api/health", methods=["GET", "HEAD"])
async def health():
    stats = await runtime().scheduler.statistics()
    return json_response({"status": "ok", "loaded": stats.loaded, "running": stats.running, "queued": stats.queued})


@bp.route("/api/ready", methods=["GET", "HEAD"])
async def ready():
    """A load balancer's probe: 200 while this daemon takes new requests, 503 once it drains."""
    if current_app.config["MLXSERVE_DRAIN"].draining:
        return json_response({"status": "draining"}, 503)
    return json_response({"status": "ready"})


@bp.get("/api/tags")
async def tags():
    models = await runtime().store.list()
    return json_response(
        {
            "models": [
                {
                    "name": m.display,
                    "model": m.display,
                    "modified_at": _iso(m.modified_at),
                    "size": m.size,
                    "digest": m.digest.removeprefix("sha256:"),
                    "details": g.details(m.spec),
                    "capabilities": m.spec.reported_capabilities(),
                }
                for m in models
            ]
        }
    )


@bp.get("/api/ps")
async def ps():
    """Loaded models, generating and embedding alike: the Scheduler owns them all."""
    stats = await runtime().scheduler.statistics()
    rows = [
        (m.name, m.size, m.digest, m.details, m.expires_at, m.size_vram, m.context_length)
        for m in stats.models
        if m.loaded
    ]
    group = _groups(stats)
    return json_response(
        {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "size": size,
                    "digest": digest.removeprefix("sha256:"),
                    "details": details,
                    "expires_at": _iso(expires),
                    "size_vram": vram,
                    "context_length": ctx,
                    **group.get(name, {}),
                }
                for name, size, digest, details, expires, vram, ctx in rows
            ]
        }
    )


@bp.get("/api/status")
async def status():
    stats = await runtime().scheduler.statistics()
    group = _groups(stats)
    return json_response(
        {
            "running": stats.running,
            "queued": stats.queued,
            "loaded": stats.loaded,
            "models": [
                {
                    "name": m.name,
                    "loaded": m.loaded,
                    "running": m.running,
                    "queued": m.queued,
                    "expires_at": _iso(m.expires_at) if m.expires_at is not None else None,
                    **group.get(m.name, {}),
                }
                for m in stats.models
            ],
            **({"group": dist_group.describe()} if dist_group.describe() else {}),
        }
    )


def _groups(stats) -> dict[str, dict]:
    """{name: {"group": ...}} for the loaded models an mx.distributed group serves (every
    generation model on a group; engine/distributed.py)."""
    group = dist_group.describe()
    if group is None:
        return {}
    return {m.name: {"group": group} for m in stats.models if m.loaded and getattr(m, "kind", "generate") == "generate"}


@bp.get("/metrics")
async def metrics():
    rt = runtime()
    return Response(rt.metrics.prometheus_text(await rt.scheduler.statistics()), mimetype="text/plain; version=0.0.4")


def _validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role must be one of system, user, assistant, tool")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        msg = {"role": role, "content": content}
        if m.get("images") is not None:
            msg["images"] = _images(m["images"], f"messages[{i}].images")
        if isinstance(m.get("thinking"), str) and m["thinking"]:  # earlier reasoning, as templates name it
            msg["thinking"] = msg["reasoning_content"] = m["thinking"]
        for extra in ("tool_calls", "tool_name", "name"):
            if m.get(extra) is not None:
                msg[extra] = m[extra]
        out.append(msg)
    return out


def _images(value, where: str) -> list[str]:
    """Ollama's ``images``: base64 strings (decoded in generation.start, after the model is
    known to take images)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{where} must be a list of base64 strings")
    return value


async def _preload_or_unload(name: str, resolved, keep_alive: float, kind: str):
    rt = runtime()
    base = {"model": name, "created_at": g.now_iso()}
    empty = {"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""}
    if keep_alive == 0:
        await rt.scheduler.unload(resolved.display)
        return json_response({**base, **empty, "done_reason": "unload", "done": True})
    opts = g.merge_options(resolved.spec.parameters, None)
    lease, _ = await g.acquire(rt, resolved, opts, keep_alive)
    lease.release(keep_alive)
    return json_response({**base, **empty, "done_reason": "load", "done": True})


async def _common(body: dict):
    name = field(body, "model", str, required=True)
    rt = runtime()
    resolved = await rt.store.resolve(name)
    if "completion" not in (resolved.spec.capabilities or ["completion"]):
        raise BadRequest(f'"{name}" does not support generate')
    keep_alive = keep_alive_of(body)
    stream = field(body, "stream", bool, default=True)
    opts = g.merge_options(resolved.spec.parameters, field(body, "options", dict))
    return name, resolved, keep_alive, stream, opts


def _logprobs_request(body: dict) -> int | None:
    if not field(body, "logprobs", bool, default=False):
        return None
    return g.check_top_logprobs(body.get("top_logprobs", 0) or 0)


def _logprobs_out(tok, entries) -> list[dict]:
    return [
        {
            "token": g.token_text(tok, t),
            "logprob": lp,
            "top_logprobs": [{"token": g.token_text(tok, a), "logprob": alp} for a, alp in alts],
        }
        for t, lp, alts in entries
    ]


@bp.post("/api/generate")
async def generate():
    body = await json_body()
    name, resolved, keep_alive, stream, opts = await _common(body)
    prompt = field(body, "prompt", str, default="")
    raw = field(body, "raw", bool, default=False)
    system = field(body, "system", str)
    template = field(body, "template", str)
    context = field(body, "context", list)
    think = parse_think(body.get("think"))
    if raw and (template or system or context):
        raise BadRequest("raw mode does not support template, system, or context")
    images = _images(body.get("images"), "images")
    if field(body, "suffix", str):
        raise BadRequest(f'"{name}" does not support insert')
    grammar = g.grammar_for_format(body.get("format"))
    logprobs = _logprobs_request(body)
    if not prompt and not context:
        return await _preload_or_unload(name, resolved, keep_alive, "generate")
    if context is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise BadRequest("context must be a list of token ids")

    messages = None
    prompt_text = None
    if raw:
        prompt_text = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt, "images": images}
        ]
    if template:
        from ..specs.templates import check_template

        check_template(template)
        resolved = attrs.evolve(resolved, spec=attrs.evolve(resolved.spec, template=template))
    gen = await g.start(
        runtime(),
        resolved,
        opts,
        keep_alive,
        messages=messages,
        prompt_text=prompt_text,
        images=None if messages else images,
        prefix_ids=context,
        truncate=field(body, "truncate", bool, default=False),
        grammar=grammar,
        logprobs=logprobs,
        split_thinking=True,
        think=think,
    )

    def piece(text: str, thinking: str = "") -> dict:
        return {"response": text, **({"thinking": thinking} if thinking else {})}

    def final(text: str, thinking: str = "") -> dict:
        return {
            "model": name,
            "created_at": g.now_iso(),
            **piece(text, thinking),
            "done": True,
            "done_reason": gen.done_reason,
            "context": gen.prompt_ids + gen.token_ids,
            **gen.durations(),
        }

    return await _respond(gen, name, stream, piece, final, logprobs is not None)


@bp.post("/api/chat")
async def chat():
    body = await json_body()
    name, resolved, keep_alive, stream, opts = await _common(body)
    messages = _validate_messages(body.get("messages") or [])
    think = parse_think(body.get("think"))
    tools = normalize_tools(body.get("tools"))
    grammar = g.grammar_for_format(body.get("format"))
    logprobs = _logprobs_request(body)
    if not messages:
        return await _preload_or_unload(name, resolved, keep_alive, "chat")
    gen = await g.start(
        runtime(),
        resolved,
        opts,
        keep_alive,
        messages=messages,
        tools=as_template_tools(tools) or None,
        grammar=grammar,
        logprobs=logprobs,
        split_thinking=True,
        think=think,
    )

    def piece(text: str, thinking: str = "") -> dict:
        return {"message": {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}}

    def final(text: str, thinking: str = "") -> dict:
        out = piece(text, thinking)
        calls = parse_tool_calls(text, tools) if tools and grammar is None else None
        if calls:
            out["message"]["content"] = ""
            out["message"]["tool_calls"] = _calls_out(calls)
        return {
            "model": name,
            "created_at": g.now_iso(),
            **out,
            "done_reason": gen.done_reason,
            "done": True,
            **gen.durations(),
        }

    return await _respond(
        gen, name, stream, piece, final, logprobs is not None, tools=tools if grammar is None else None
    )


def _calls_out(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


async def _respond(
    gen: g.Generation, name: str, stream: bool, piece, final, with_logprobs: bool, tools: list[dict] | None = None
):
    """Non-streaming: one object. Streaming: NDJSON pieces, then the final object.

    With tools, text that may still become a tool call is held back; each call goes out in a
    line of its own as soon as it is complete (as Ollama streams them), and plain text is never
    shown twice. Every line names the model as the request did, as Ollama does.
    """
    tok = gen.tokenizer
    hold_calls = bool(tools)

    if not stream:
        try:
            async for _ in g.chunks(gen):
                pass
        except BaseException as exc:
            gen.record(499 if isinstance(exc, trio.Cancelled) else getattr(exc, "status", 500), exc)
            raise
        finally:
            gen.release()
        gen.record(200)
        out = final("".join(gen.text), "".join(gen.thinking))
        if with_logprobs:
            out["logprobs"] = _logprobs_out(tok, gen.logprob_entries)
        return json_response(out)

    def calls_line(calls: list[dict]) -> bytes:
        message = {**piece("")["message"], "tool_calls": _calls_out(calls)}
        return ndjson({"model": name, "created_at": g.now_iso(), "message": message, "done": False})

    async def body():
        calls_in = CallStream(tools) if hold_calls else None
        try:
            async for chunk in g.chunks(gen):
                thought = getattr(chunk, "thinking", "")  # reasoning streams as it comes
                text, calls = calls_in.feed(chunk.text) if calls_in else (chunk.text, [])
                if text or thought or (with_logprobs and chunk.logprobs):
                    line = {"model": name, "created_at": g.now_iso(), **piece(text, thought), "done": False}
                    if with_logprobs and chunk.logprobs:
                        line["logprobs"] = _logprobs_out(tok, chunk.logprobs)
                    yield ndjson(line)
                if calls:
                    yield calls_line(calls)
            # What was held is either the rest of the calls or text never shown.
            text, calls = calls_in.finish() if calls_in else ("", [])
            if text:
                yield ndjson({"model": name, "created_at": g.now_iso(), **piece(text), "done": False})
            if calls:
                yield calls_line(calls)
            yield ndjson(final(""))
            gen.record(200)
        except MlxserveError as exc:
            gen.record(exc.status, str(exc))
            yield ndjson({"error": str(exc)})
        except BaseException:
            gen.record(499)
            raise

    return stream_response(body(), gen.release, "application/x-ndjson")


# ---- model management ----
@bp.post("/api/show")
async def show():
    body = await json_body()
    name = field(body, "model", str) or field(body, "name", str, required=True)
    m = await runtime().store.resolve(name)
    from ..specs.modelfile import render_modelfile

    spec = m.spec
    params = spec.parameters.to_dict() if spec.parameters else {}
    param_lines = []
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            param_lines.append(f"{k:<30} {item}")
    return json_response(
        {
            "modelfile": render_modelfile(m.display, spec),
            "parameters": "\n".join(param_lines),
            "template": spec.template or "",
            "system": spec.system or "",
            "license": spec.license or "",
            "details": g.details(spec),
            "model_info": spec.model_info
            or {"general.architecture": spec.family, f"{spec.family}.context_length": spec.context_length},
            "capabilities": spec.reported_capabilities(),
            "messages": spec.messages,
            "modified_at": _iso(m.modified_at),
        }
    )


@bp.delete("/api/delete")
async def delete():
    body = await json_body()
    name = field(body, "model", str) or field(body, "name", str, required=True)
    await runtime().store.delete(name)
    return json_response({})


@bp.post("/api/copy")
async def copy():
    body = await json_body()
    src = field(body, "source", str, required=True)
    dst = field(body, "destination", str, required=True)
    await runtime().store.copy(src, dst)
    return json_response({})


@bp.post("/api/create")
async def create():
    body = await json_body()
    name = field(body, "model", str) or field(body, "name", str, required=True)
    modelfile = field(body, "modelfile", str)
    files = field(body, "files", dict)
    if field(body, "adapters", dict):
        raise BadRequest(ADAPTERS_UNSUPPORTED)
    if modelfile is None:
        modelfile = _modelfile_from_fields(body, files is not None)
    elif files is not None:
        raise BadRequest("give either modelfile or files, not both")
    base_dir = Path(field(body, "path", str, default="") or ".").expanduser()
    if base_dir.is_file():
        base_dir = base_dir.parent
    quantize = field(body, "quantize", str)
    stream = field(body, "stream", bool, default=True)
    rt = runtime()
    kwargs = dict(base_dir=base_dir, quantize=quantize, files=files)
    if not stream:
        await rt.store.create(name, modelfile, **kwargs)
        return json_response({"status": "success"})

    send, recv = trio.open_memory_channel(1024)
    validated = trio.Event()

    def progress(event: dict) -> None:
        # Progress is advisory: a full buffer drops it and the create itself goes on.
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(post_nowait_or_drop, send, event)

    failure: list[MlxserveError] = []

    async def run_create(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            await rt.store.create(
                name,
                modelfile,
                progress=progress,
                on_validated=lambda: trio.from_thread.run_sync(validated.set),
                **kwargs,
            )
        except Exception as exc:  # in the runtime's nursery: never let it take the daemon down
            err = exc if isinstance(exc, MlxserveError) else MlxserveError(f"create failed: {exc}")
            if not isinstance(exc, MlxserveError):
                log.exception("create of %s failed", name)
            if validated.is_set():
                post_nowait_or_drop(send, {"error": str(err)})
            else:
                failure.append(err)
        finally:
            validated.set()
            send.close()

    # The create runs in the runtime's nursery: a client leaving mid-create does not leave the
    # store half-written (the store actor finishes or rolls back on its own).
    await rt.nursery.start(run_create)
    # A source refused before anything is written is the request's fault: answered with its
    # status (400...), not as a line of a 200 stream.
    try:
        await validated.wait()
    except BaseException:
        recv.close()
        raise
    if failure:
        recv.close()
        raise failure[0]

    async def body_iter():
        async with recv:
            async for event in recv:
                yield ndjson(event)

    return stream_response(body_iter(), recv.close, "application/x-ndjson")


def _modelfile_from_fields(body: dict, has_files: bool) -> Modelfile:
    """Ollama's newer create API (``ollama create``, the client libraries) sends fields instead
    of a Modelfile; they become one without a round trip through its text syntax."""
    src = field(body, "from", str) or ""
    if not src and not has_files:
        raise BadRequest("either modelfile, from or files is required")
    license_ = body.get("license")
    if isinstance(license_, str):
        license_ = [license_]
    if license_ is not None and not (isinstance(license_, list) and all(isinstance(x, str) for x in license_)):
        raise BadRequest("license must be a string or a list of strings")
    messages = []
    for i, m in enumerate(field(body, "messages", list) or []):
        if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(
                f"messages[{i}] must be an object with a role ({', '.join(MESSAGE_ROLES)}) and a string content"
            )
        messages.append({"role": m["role"], "content": m["content"]})
    return Modelfile(
        from_=src,
        parameters=dict(field(body, "parameters", dict) or {}),
        template=field(body, "template", str) or None,
        system=field(body, "system", str) or None,
        license=[x for x in license_ or [] if x],
        messages=messages,
    )
