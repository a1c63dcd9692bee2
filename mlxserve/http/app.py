"""The Quart-Trio application: routes, error mapping, Host checks, and the Hypercorn server."""

from __future__ import annotations

import ipaddress
import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..actors.runtime import Runtime
from ..errors import MlxserveError
from . import ollama, openai
from . import transfer
from . import embeddings
from .common import error_headers, json_response

log = logging.getLogger("mlxserve.http")
# After a refused body the rest of it may still be in flight: end the connection rather than
# read the next request out of the middle of it.
_CLOSE = {"Connection": "close"}


def _error_body(status: int, message: str, kind: str):
    if request.path.startswith("/v1/"):
        code = {404: "model_not_found", 503: "server_busy", 413: "payload_too_large"}.get(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": message}


def _loopback(host: str) -> bool:
    if host in ("localhost",) or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(rt: Runtime) -> QuartTrio:
    app = QuartTrio("mlxserve")
    app.config["MLXSERVE_RUNTIME"] = rt
    app.config["MAX_CONTENT_LENGTH"] = rt.settings.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # generation may take longer than any fixed limit
    app.config["BODY_TIMEOUT"] = 60
    app.register_blueprint(ollama.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(transfer.bp)
    app.register_blueprint(embeddings.bp)
    guard_host = _loopback(rt.settings.host)

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
        host = (request.headers.get("Host") or "").rsplit(":", 1)[0] if "]" not in (request.headers.get("Host") or "") \
            else request.headers.get("Host", "").split("]")[0] + "]"
        if host and not _loopback(host):
            return json_response(_error_body(403, "forbidden host", "permission_error"), 403)
        return None

    @app.errorhandler(MlxserveError)
    async def on_domain_error(exc: MlxserveError):
        if exc.status >= 500 and exc.status != 503:
            log.error("request failed: %s", exc)
        if not getattr(exc, "recorded", False):
            rt.metrics.record_nowait("request", route=request.path, status=exc.status, error=str(exc),
                                     client=request.remote_addr or "")
        headers = error_headers(exc)
        if exc.status == 413:
            headers = {**headers, **_CLOSE}
        return json_response(_error_body(exc.status, str(exc), exc.kind), exc.status, headers)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException):
        status = exc.code or 500
        message = {404: "not found", 405: "method not allowed", 413: "request body too large"}.get(
            status, exc.description or exc.name)
        return json_response(_error_body(status, message, "invalid_request_error"), status,
                             _CLOSE if status == 413 else None)

    @app.errorhandler(Exception)
    async def on_bug(exc: Exception):
        log.exception("unhandled error")
        return json_response(_error_body(500, f"internal error: {exc.__class__.__name__}", "server_error"), 500)

    return app


async def serve(rt: Runtime, shutdown: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run Hypercorn on the runtime's settings until ``shutdown`` is set; started() gets the URLs."""
    config = HypercornConfig()
    host = rt.settings.host
    config.bind = [f"[{host}]:{rt.settings.port}" if ":" in host else f"{host}:{rt.settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 5.0
    config.keep_alive_timeout = 75
    app = create_app(rt)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
