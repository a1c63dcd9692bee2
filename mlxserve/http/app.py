"""The Quart-Trio application: routes, error mapping, Host and Origin checks, and the Hypercorn server."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from typing import Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Updated
from hypercorn.trio import run as hypercorn_run, serve as hypercorn_serve, tcp_server as hypercorn_tcp
from quart import Response, request
from quart.asgi import ASGIHTTPConnection
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..actors.runtime import Runtime
from ..errors import MlxserveError, ModelNotFound, ShuttingDown, Unauthorized
from . import anthropic, blobs, embeddings, ollama, openai, responses
from .common import error_headers, json_response
from .drain import READ_METHODS, Drain

log = logging.getLogger("mlxserve.http")
# After a refused body the rest of it may still be in flight: end the connection rather than
# read the next request out of the middle of it.
_CLOSE = {"Connection": "close"}


# An early answer (404, 405, 403, 400...) may come before the request body is all in. Up to this
# much of it is read and dropped so that the connection stays usable; a larger or slower body
# gets ``Connection: close`` instead (as Go's net/http, hence Ollama, does past 256 KiB).
DRAIN_BYTES = 256 * 1024
DRAIN_S = 1.0


def _error_body(status: int, message: str, kind: str, code: str | None = None):
    # Routing errors (404/405) never reach a blueprint's hooks: pick the dialect by path here.
    if request.path == "/v1/messages" or request.path.startswith("/v1/messages/"):
        return anthropic.error_body(status, message)
    if request.path.startswith("/v1/"):
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": message}


def _openai_code(exc: MlxserveError) -> str | None:
    # Only a missing model is model_not_found: clients report that code as a missing model.
    if isinstance(exc, ModelNotFound):
        return "model_not_found"
    if isinstance(exc, Unauthorized):
        return "invalid_api_key"
    return {503: "server_busy", 413: "payload_too_large"}.get(exc.status)


# What answers without a key: liveness, readiness and version probes (load balancers, clients' checks).
PUBLIC_PATHS = frozenset({"/", "/api/version", "/api/health", "/api/ready"})


def key_checker(keys: tuple[str, ...]) -> Callable[[list[str]], bool]:
    """Whether any presented credential is one of ``keys``; every key is compared, each in
    constant time, so the time taken tells nothing about which key came close."""
    wanted = [k.encode() for k in keys]

    def accepts(presented: list[str]) -> bool:
        ok = False
        for p in presented:
            given = p.encode("utf-8", "replace")
            for k in wanted:
                ok |= hmac.compare_digest(given, k)
        return ok

    return accepts


def _presented_keys(headers) -> list[str]:
    """``Authorization: Bearer KEY`` (OpenAI's and Ollama's clients), ``x-api-key: KEY`` (Anthropic's)."""
    out = []
    scheme, _, token = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        out.append(token.strip())
    if key := (headers.get("x-api-key") or "").strip():
        out.append(key)
    return out


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host of a Host header, lower-cased (DNS names are case-insensitive), without port."""
    host = header.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).removesuffix(".")


# Ollama's default OLLAMA_ORIGINS (plus [::1]): pages served from this machine, and app shells.
DEFAULT_ORIGINS = tuple(
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
    for scheme in ("http", "https")
    for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
# What a preflight may ask to send: Ollama's list, the Anthropic SDK's, and whatever else an
# allowed origin asks for (after the origin check, a header list protects nothing more).
ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "User-Agent",
    "Accept",
    "X-Requested-With",
    "OpenAI-Beta",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
)
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


def origin_policy(extra: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a browser page of an ``Origin`` may use the API: ``DEFAULT_ORIGINS`` plus
    ``extra`` (MLXSERVE_ORIGINS), where ``*`` matches any run of characters."""
    patterns = DEFAULT_ORIGINS + tuple(extra)
    rx = re.compile("|".join(".*".join(map(re.escape, p.strip().lower().split("*"))) for p in patterns))
    return lambda origin: rx.fullmatch(origin.strip().lower()) is not None


class _Connection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, letting Hypercorn finish a response it has fully sent.

    Quart-Trio cancels the request's nursery when Hypercorn reports the stream closed; but
    Hypercorn reports that from inside the send of the response's last chunk, and then closes the
    socket (``Connection: close``, HTTP/1.0, an unread body) or recycles it for the next request
    in that same call. Cancelled there, it did neither: the connection hung, half open.
    """

    async def __call__(self, receive, send) -> None:
        self._answered = False

        async def send_marking_the_end(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._answered = True
            await send(message)

        drain = self.app.config["MLXSERVE_DRAIN"]
        self.scope["mlxserve.late"] = drain.draining  # what came before a drain is served
        with drain.request():  # and the drain waits for it to finish
            await super().__call__(receive, send_marking_the_end)

    async def handle_messages(self, nursery: trio.Nursery, request, receive) -> None:  # type: ignore[override]
        await ASGIHTTPConnection.handle_messages(self, request, receive)
        if not self._answered:  # the client left mid-request: stop the handler
            nursery.cancel_scope.cancel()


class _App(QuartTrio):
    asgi_http_class = _Connection


class _TCPServer(hypercorn_tcp.TCPServer):
    """Hypercorn's connection, closed as soon as the client has closed its side.

    Once a response recycles a keep-alive connection, Hypercorn arms its idle timer; when the
    client then closes, the read loop ends but the connection's task group still waits for that
    timer (``keep_alive_timeout``), leaving the socket in CLOSE-WAIT and its tasks alive.
    """

    _reading_done = False

    async def _read_data(self) -> None:
        await super()._read_data()
        self._reading_done = True
        await self.idle_task.stop()

    async def protocol_send(self, event) -> None:
        if isinstance(event, Updated) and event.idle and self._reading_done:
            return  # nothing more can arrive: no idle timer to wait for
        await super().protocol_send(event)


def create_app(rt: Runtime, drain: Drain | None = None) -> QuartTrio:
    app = _App("mlxserve")
    app.config["MLXSERVE_RUNTIME"] = rt
    app.config["MLXSERVE_DRAIN"] = Drain() if drain is None else drain
    app.config["MAX_CONTENT_LENGTH"] = rt.settings.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # generation may take longer than any fixed limit
    app.config["BODY_TIMEOUT"] = 60
    app.register_blueprint(ollama.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(blobs.bp)
    app.register_blueprint(embeddings.bp)
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(responses.bp)
    guard_host = _loopback(rt.settings.host)
    allow_any_origin = "*" in rt.settings.origins
    origin_allowed = origin_policy(tuple(o for o in rt.settings.origins if o != "*"))

    @app.before_request
    async def lift_limit_for_blobs():
        # A model blob is gigabytes: /api/blobs streams it to disk, hashing as it goes, so the
        # JSON body limit does not apply there. Quart fixes the limit when the request is built,
        # hence the reach into its Body.
        if request.path.startswith("/api/blobs/"):
            body = request.body
            body._max_content_length = None
            if isinstance(body._must_raise, RequestEntityTooLarge):
                body._must_raise = None
        return None

    @app.before_request
    async def check_host():
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not drive the API.
        if not guard_host:
            return None
        host = _host_name(request.headers.get("Host") or "")
        if host and not _loopback(host):
            return json_response(_error_body(403, "forbidden host", "permission_error"), 403)
        return None

    def cross_origin() -> str | None:
        """The Origin of a cross-origin browser request, or None (no Origin, or same origin)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        host = (request.headers.get("Host") or "").strip().lower()
        if host and origin.strip().lower() in (f"http://{host}", f"https://{host}"):
            return None
        return origin

    @app.before_request
    async def check_origin():
        # Any web page can make a browser POST here (a "simple" text/plain request needs no
        # preflight): only the origins allowed, as Ollama's OLLAMA_ORIGINS, may drive the API.
        origin = cross_origin()
        if origin is None:
            return None
        if not (allow_any_origin or origin_allowed(origin)):
            return json_response(_error_body(403, f"origin not allowed: {origin}", "permission_error"), 403)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            asked = request.headers.get("Access-Control-Request-Headers", "")
            names = dict.fromkeys([*ALLOW_HEADERS, *(h.strip() for h in asked.split(",") if h.strip())])
            return Response(
                "",
                status=204,
                headers={
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ", ".join(names),
                    "Access-Control-Max-Age": "43200",
                },
            )
        return None

    if rt.settings.api_keys:
        accepts = key_checker(rt.settings.api_keys)

        @app.before_request
        async def check_key():
            # After the origin check, so that a CORS preflight (which carries no key) is answered.
            if request.path in PUBLIC_PATHS or request.method == "OPTIONS":
                return None
            presented = _presented_keys(request.headers)
            if not presented:
                raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
            if not accepts(presented):
                raise Unauthorized("invalid API key")
            return None

    @app.before_request
    async def refuse_while_draining():
        # Another daemon takes new work (a balancer retries a 503 there); reads still answer.
        if request.scope.get("mlxserve.late") and request.method not in READ_METHODS:
            raise ShuttingDown("server is draining: send new requests to another server")
        return None

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        if (origin := cross_origin()) is not None and response.status_code != 403:
            response.headers["Access-Control-Allow-Origin"] = "*" if allow_any_origin else origin
            response.vary.add("Origin")
        return response

    @app.after_request
    async def finish_body(response: Response) -> Response:
        # Hypercorn can take the next request off a connection only once this one's body is all
        # read; a response that leaves part of it unread must close the connection.
        if response.headers.get("Connection", "").lower() == "close" or await _drained(request):
            return response
        response.headers["Connection"] = "close"
        return response

    @app.errorhandler(MlxserveError)
    async def on_domain_error(exc: MlxserveError):
        if exc.status >= 500 and exc.status != 503:
            log.error("request failed: %s", exc)
        if not getattr(exc, "recorded", False):
            rt.metrics.record_nowait(
                "request", route=request.path, status=exc.status, error=str(exc), client=request.remote_addr or ""
            )
        headers = error_headers(exc)
        if exc.status == 413 or isinstance(exc, ShuttingDown):  # no more requests down this one
            headers = {**headers, **_CLOSE}
        return json_response(_error_body(exc.status, str(exc), exc.kind, _openai_code(exc)), exc.status, headers)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException):
        status = exc.code or 500
        message = {
            404: f"not found: {request.method} {request.path}",
            405: "method not allowed",
            413: "request body too large",
        }.get(status, exc.description or exc.name)
        # An unknown route has no error code: "model_not_found" would send clients looking
        # for a model.
        code = "payload_too_large" if status == 413 else None
        return json_response(
            _error_body(status, message, "invalid_request_error", code), status, _CLOSE if status == 413 else None
        )

    @app.errorhandler(RecursionError)
    async def on_too_deep(exc: RecursionError):
        # json_body bounds a body's nesting; this is the net for whatever recurses further
        # (a self-referencing schema, say): too deep a request is the client's error.
        return json_response(_error_body(400, "request is nested too deeply to process", "invalid_request_error"), 400)

    @app.errorhandler(Exception)
    async def on_bug(exc: Exception):
        log.exception("unhandled error")
        return json_response(_error_body(500, f"internal error: {exc.__class__.__name__}", "server_error"), 500)

    return app


async def _drained(req) -> bool:
    """Read and drop what is left of the request body, if that is little and quick."""
    length = req.content_length
    if length is not None and length > DRAIN_BYTES:
        return False
    seen = 0
    with trio.move_on_after(DRAIN_S):
        try:
            async for chunk in req.body:  # iterating drops each chunk: no buffering
                seen += len(chunk)
                if seen > DRAIN_BYTES:
                    return False
        except HTTPException:  # over the body limit, or timed out
            return False
        return True
    return False


async def serve(
    rt: Runtime, shutdown: trio.Event, drain: Drain | None = None, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Run Hypercorn on the runtime's settings until ``shutdown`` is set; started() gets the URLs."""
    config = HypercornConfig()
    host = rt.settings.host
    config.bind = [f"[{host}]:{rt.settings.port}" if ":" in host else f"{host}:{rt.settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 5.0
    config.keep_alive_timeout = 75
    app = create_app(rt, drain)
    # Hypercorn has no seam for its connection class; its run loop looks the name up per call.
    hypercorn_run.TCPServer = _TCPServer
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
