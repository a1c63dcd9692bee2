"""Embedding routes: Ollama's /api/embed and legacy /api/embeddings, OpenAI's /v1/embeddings.

Models with the "embedding" capability (BERT sentence encoders) and decoder models ("completion":
mean-pooled last hidden state) both embed; every vector is L2-normalised. The Embedder leases
the model from the Scheduler (which loads and keeps it) and batches requests that arrive
together on the model's thread.
"""

from __future__ import annotations

import base64
import time

import numpy as np
import trio
from quart import Blueprint

from ..actors.embedder import EmbedRequest, EmbedResult, model_kind
from ..errors import BadRequest, MlxserveError
from . import generation as g
from .common import field, json_body, json_response, keep_alive_of, runtime

bp = Blueprint("embeddings", __name__)


def _dimensions(body: dict) -> int | None:
    d = body.get("dimensions")
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise BadRequest("dimensions must be a positive integer")
    return d


def _ollama_inputs(value) -> list[str]:
    """Ollama: a string (empty: nothing to embed) or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRequest("invalid input type: input must be a string or a list of strings")


def _is_token_list(value) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _openai_inputs(value) -> list:
    """OpenAI: a string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        items = [value]
    elif _is_token_list(value):
        items = [tuple(value)]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items = list(value)
    elif isinstance(value, list) and value and all(_is_token_list(v) for v in value):
        items = [tuple(v) for v in value]
    else:
        raise BadRequest(
            "input must be a non-empty string, array of strings, array of token ids, or array of token-id arrays"
        )
    if any(isinstance(v, str) and not v for v in items):
        raise BadRequest("input must not contain empty strings")
    return items


async def _model(name: str):
    rt = runtime()
    resolved = await rt.store.resolve(name)
    if model_kind(resolved.spec) is None:
        raise BadRequest(f'"{name}" does not support embeddings')
    return rt, resolved


def _num_ctx(resolved, body: dict) -> int | None:
    opts = g.merge_options(resolved.spec.parameters, field(body, "options", dict))
    return opts.num_ctx


class _Timer:
    """Request timing plus one metrics event per request, success or failure."""

    def __init__(self, route: str, name: str):
        self.route, self.name = route, name
        self.t0 = time.perf_counter_ns()

    def ns(self) -> int:
        return time.perf_counter_ns() - self.t0

    def record(self, status: int, result: EmbedResult | None = None, error: BaseException | None = None):
        if error is not None:
            error.recorded = True  # the app's error handler must not count it again
        runtime().metrics.record_nowait(
            "request",
            route=self.route,
            model=self.name,
            status=status,
            error=str(error) if error is not None else None,
            total_duration=self.ns(),
            load_duration=result.load_ns if result else 0,
            prompt_eval_count=result.prompt_tokens if result else 0,
            done_reason="stop" if status == 200 else ("cancelled" if status == 499 else "error"),
        )


async def _embed(timer: _Timer, rt, resolved, request: EmbedRequest, keep_alive: float) -> EmbedResult:
    try:
        result = await rt.embedder.embed(resolved, request, keep_alive)
    except trio.Cancelled:
        timer.record(499)
        raise
    except MlxserveError as exc:
        timer.record(exc.status, error=exc)
        raise
    timer.record(200, result)
    return result


@bp.post("/api/embed")
async def api_embed():
    body = await json_body()
    name = field(body, "model", str, required=True)
    timer = _Timer("embed", name)
    inputs = _ollama_inputs(body.get("input"))
    truncate = field(body, "truncate", bool, default=True)
    dimensions = _dimensions(body)
    keep_alive = keep_alive_of(body)
    rt, resolved = await _model(name)
    num_ctx = _num_ctx(resolved, body)
    if not inputs:  # Ollama: no input loads the model (or, with keep_alive 0, unloads it)
        load_ns = 0
        if keep_alive == 0:
            await rt.embedder.unload(resolved)
        else:
            load_ns = await rt.embedder.load(resolved, keep_alive)
        return json_response(
            {
                "model": name,
                "embeddings": [],
                "total_duration": timer.ns(),
                "load_duration": load_ns,
                "prompt_eval_count": 0,
            }
        )
    result = await _embed(timer, rt, resolved, EmbedRequest(tuple(inputs), truncate, dimensions, num_ctx), keep_alive)
    return json_response(
        {
            "model": name,
            "embeddings": result.vectors.tolist(),
            "total_duration": timer.ns(),
            "load_duration": result.load_ns,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


@bp.post("/api/embeddings")
async def api_embeddings():
    """The legacy single-prompt route: {"model", "prompt"} -> {"embedding": [...]}."""
    body = await json_body()
    name = field(body, "model", str, required=True)
    timer = _Timer("embeddings", name)
    prompt = field(body, "prompt", str, default="")
    keep_alive = keep_alive_of(body)
    rt, resolved = await _model(name)
    num_ctx = _num_ctx(resolved, body)
    if not prompt:
        if keep_alive == 0:
            await rt.embedder.unload(resolved)
        else:
            await rt.embedder.load(resolved, keep_alive)
        return json_response({"embedding": []})
    result = await _embed(timer, rt, resolved, EmbedRequest((prompt,), True, None, num_ctx), keep_alive)
    return json_response({"embedding": result.vectors[0].tolist()})


@bp.post("/v1/embeddings")
async def v1_embeddings():
    body = await json_body()
    name = field(body, "model", str, required=True)
    timer = _Timer("v1/embeddings", name)
    inputs = _openai_inputs(body.get("input"))
    fmt = field(body, "encoding_format", str, default="float")
    if fmt not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'")
    dimensions = _dimensions(body)
    field(body, "user", str)  # accepted and ignored, as a type check only
    rt, resolved = await _model(name)
    result = await _embed(timer, rt, resolved, EmbedRequest(tuple(inputs), True, dimensions), rt.settings.keep_alive)
    if fmt == "base64":
        # OpenAI's base64: the raw little-endian float32 bytes of each vector.
        data = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in result.vectors]
    else:
        data = result.vectors.tolist()
    n = result.prompt_tokens
    return json_response(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )
