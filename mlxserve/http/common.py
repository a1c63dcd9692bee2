"""Request parsing, error bodies and streaming bodies shared by both API dialects."""

from __future__ import annotations

import json
import math
import operator
import re
import weakref
from itertools import accumulate
from typing import Any, AsyncIterator, Callable

from quart import Response, current_app, request

from ..config import parse_duration
from ..errors import BadRequest, MlxserveError, PayloadTooLarge, Unauthorized


def runtime():
    return current_app.config["MLXSERVE_RUNTIME"]


async def json_body() -> dict:
    try:
        raw = await request.get_data(cache=False)
    except Exception as exc:  # werkzeug's RequestEntityTooLarge and friends
        if getattr(exc, "code", None) == 413:
            raise PayloadTooLarge("request body too large") from exc
        raise BadRequest(f"cannot read request body: {exc}") from exc
    if not raw:
        raise BadRequest("missing request body")
    if nested_deeper_than(raw, MAX_JSON_DEPTH):
        raise BadRequest(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # U+FFFD, as Ollama's Go decoder: text cut mid-pair still serves
        body = _replace_lone_surrogates(body)
    return body


# Far beyond any real request or JSON schema, far below what json.loads and the code that walks
# a body (schemas, templates) can recurse through.
MAX_JSON_DEPTH = 128
# A JSON string, up to its closing quote or the end of the input: an unterminated one is still
# consumed in one linear match, never retried from each quote inside it.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_CURLY_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_STEP = {ord("["): 1, ord("]"): -1}


def nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the brackets outside strings nest deeper than ``limit``, found without recursion.

    A pass that deletes every adjacent ``[]`` takes one level off balanced brackets, so
    ``limit`` passes empty any body within the limit; only a deeper or unbalanced one is
    measured bracket by bracket.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(_CURLY_AS_SQUARE, _NOT_BRACKET)
    left = brackets
    for _ in range(limit):
        left = left.replace(b"[]", b"")
        if not left:
            return False
    return max(accumulate(map(_STEP.__getitem__, brackets), operator.add), default=0) > limit


# A \uD800-\uDFFF escape: json.loads keeps a lone one as a surrogate that no codec can encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(obj: Any) -> Any:
    """Each lone surrogate in keys and strings becomes U+FFFD, as Go's JSON decoder (Ollama) does."""

    def fix(s: str) -> str:
        return _LONE_SURROGATE.sub("\ufffd", s)

    root = [obj]
    stack: list = [(root, 0)]
    while stack:  # iterative: the depth was bounded above, but there is no need to recurse
        holder, key = stack.pop()
        value = holder[key]
        if isinstance(value, str):
            holder[key] = fix(value)
        elif isinstance(value, list):
            stack.extend((value, i) for i in range(len(value)))
        elif isinstance(value, dict):
            if any(_LONE_SURROGATE.search(k) for k in value):
                fixed = {fix(k): v for k, v in value.items()}
                value.clear()
                value.update(fixed)
            stack.extend((value, k) for k in value)
    return root[0]


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def field(body: dict, name: str, kind: type | tuple, *, required: bool = False, default: Any = None) -> Any:
    value = body.get(name, None)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(f"{name} must be of type {names}")
    return value


def keep_alive_of(body: dict) -> float:
    default = runtime().settings.keep_alive
    try:
        return parse_duration(body.get("keep_alive"), default=default)
    except (BadRequest, ValueError) as exc:
        raise BadRequest(f"invalid keep_alive: {exc}") from None


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, default=_default), status=status, mimetype="application/json", headers=headers)


def _default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return None
    return str(o)


def error_headers(exc: MlxserveError) -> dict:
    if isinstance(exc, Unauthorized):  # RFC 9110: a 401 names the scheme that would do
        return {"WWW-Authenticate": 'Bearer realm="mlxserve"'}
    retry = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry)} if retry is not None else {}


class StreamBody:
    """An async-iterable response body whose cleanup always runs.

    Quart closes a body it started; but a client can leave after the handler returned and before
    the body was entered, and then an async generator's ``finally`` never runs. ``cleanup`` is
    therefore also bound to this object's lifetime, and it must be idempotent and synchronous.
    """

    def __init__(self, agen: AsyncIterator[bytes], cleanup: Callable[[], None]):
        self._agen = agen
        self._cleanup = cleanup
        self._finalizer = weakref.finalize(self, cleanup)

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._agen.aclose()
        finally:
            self._finalizer()


def stream_response(agen: AsyncIterator[bytes], cleanup: Callable[[], None], mimetype: str) -> Response:
    resp = Response(StreamBody(agen, cleanup), mimetype=mimetype)
    resp.timeout = None  # Quart's RESPONSE_TIMEOUT would silently cut long streams
    if mimetype == "text/event-stream":
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"
    return resp


def ndjson(obj: Any) -> bytes:
    return (json.dumps(obj, default=_default, ensure_ascii=False) + "\n").encode()
