"""Client drivers: one request, driven to a planned end (complete, vanish in a given phase,
stall and resume, or malformed on purpose), with everything observed recorded in a Result.

Routes: Ollama's /api/generate and /api/chat (NDJSON when streaming), OpenAI's
/v1/chat/completions (SSE when streaming). Sampling: greedy (temperature 0) or seeded
temperature sampling; both must give the same text in a busy batch as alone.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable

import attrs
import trio

from . import wire

ROUTES = ("generate", "chat", "openai")
PATHS = {"generate": "/api/generate", "chat": "/api/chat", "openai": "/v1/chat/completions"}

# What a client can get wrong, and the status the daemon must answer with (never a 5xx).
CLIENT_FAULTS = {
    "bad_json": 400,
    "unknown_model": 404,
    "wrong_type": 400,
    "bad_keep_alive": 400,
    "raw_with_system": 400,
    "openai_n": 400,
    "empty_messages_openai": 400,
    "foreign_host": 403,
}


SCHEMA = {  # structured output: every token is constrained by a grammar built from this
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}


@attrs.frozen
class Template:
    """A request's identity: the same template always asks for the same answer."""

    route: str
    model: str
    text: str
    sampling: str  # "greedy" | "seeded"
    num_predict: int
    seed: int = 0
    schema: bool = False  # constrain the answer to SCHEMA (format / response_format)

    @property
    def key(self) -> str:
        return (
            f"{self.route}|{self.model}|{self.sampling}|{self.seed}|{self.num_predict}|"
            f"{'schema' if self.schema else ''}|{self.text}"
        )

    @property
    def path(self) -> str:
        return PATHS[self.route]

    def body(self, stream: bool) -> dict[str, Any]:
        if self.route == "openai":
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "user", "content": self.text}],
                "stream": stream,
                "max_tokens": self.num_predict,
            }
            if self.sampling == "greedy":
                body["temperature"] = 0
            else:
                body.update(temperature=0.9, seed=self.seed)
            if self.schema:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
            return body
        opts: dict[str, Any] = {"num_predict": self.num_predict}
        if self.sampling == "greedy":
            opts["temperature"] = 0
        else:
            opts.update(temperature=0.9, seed=self.seed)
        body = {"model": self.model, "stream": stream, "options": opts}
        if self.schema:
            body["format"] = SCHEMA
        if self.route == "generate":
            body["prompt"] = self.text
        else:
            body["messages"] = [{"role": "user", "content": self.text}]
        return body


@attrs.frozen
class Plan:
    """How one request ends.

    action: ``complete``; ``early`` (vanish ``delay`` s after sending, whatever arrived by
    then); ``at_head`` (vanish as soon as the response headers arrive: the sequence has just
    been submitted); ``decode`` (vanish after ``after_tokens`` pieces of text); ``after_last``
    (vanish right after the last token's final line, before the stream's end); ``slow`` (stall
    ``stall_s`` after ``stall_after`` pieces, with a tiny receive buffer, then read on);
    ``client_fault`` (a malformed request of kind ``fault``).

    ``hold``: an event the client waits for (not reading) at the moment it would vanish, so
    the harness decides when a queue drains.
    """

    template: Template
    stream: bool = True
    action: str = "complete"
    delay: float = 0.0
    after_tokens: int = 1
    stall_after: int = 1
    stall_s: float = 0.0
    reset: bool = False  # vanish with RST rather than FIN
    fault: str = ""
    deadline: float = 60.0
    tag: str = ""  # scenario-specific label
    hold: Any = attrs.field(default=None, eq=False)  # trio.Event | None


@attrs.define
class Result:
    plan: Plan
    status: int | None = None
    headers: dict = attrs.Factory(dict)
    pieces: list[str] = attrs.Factory(list)
    finished: bool = False  # the final line / complete body arrived
    finish_reason: str | None = None
    error: str | None = None  # the error the daemon sent (body or final stream line)
    problems: list[str] = attrs.Factory(list)  # protocol or shape violations seen by the client
    disconnected: str | None = None  # client-side phase at which we vanished
    hung: bool = False
    t_send: float = 0.0
    t_head: float | None = None
    t_first: float | None = None
    t_end: float | None = None
    t_disconnect: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def survived(self) -> bool:
        """It got its whole answer (and so must match the solo reference)."""
        return self.finished and self.error is None and self.status == 200

    @property
    def latency(self) -> float | None:
        end = self.t_head if self.t_head is not None else self.t_end
        return None if end is None else end - self.t_send


class _Vanish(Exception):
    """Internal: the plan says leave now."""


def _wellformed_error(route: str, doc: Any) -> str | None:
    """The error message if ``doc`` is a well-formed error for its dialect, else None."""
    if not isinstance(doc, dict):
        return None
    err = doc.get("error")
    if route == "openai":
        if (
            isinstance(err, dict)
            and isinstance(err.get("message"), str)
            and err["message"]
            and isinstance(err.get("type"), str)
            and "param" in err
            and "code" in err
        ):
            return err["message"]
        return None
    return err if isinstance(err, str) and err else None


class _Reader:
    """Parses a streamed body into text pieces, the final line and errors, per dialect."""

    def __init__(self, result: Result, route: str):
        self.r = result
        self.route = route
        self.saw_role = False
        self.ended = False  # a terminal line ([DONE], done:true, or an error) was seen

    def feed(self, line: bytes) -> str | None:
        """Returns "piece" | "final" | "end" | "error" | None (nothing of interest)."""
        r = self.r
        line = line.strip()
        if not line:
            return None
        if self.ended:
            r.problems.append(f"data after the end of the stream: {line[:80]!r}")
        if self.route == "openai":
            if line.startswith(b":"):
                return None
            if not line.startswith(b"data: "):
                r.problems.append(f"not an SSE data line: {line[:80]!r}")
                return None
            payload = line[6:]
            if payload == b"[DONE]":
                if not r.finished:
                    r.problems.append("[DONE] before a finish_reason")
                self.ended = True
                return "end"
            try:
                doc = json.loads(payload)
            except ValueError:
                r.problems.append(f"SSE data is not JSON: {payload[:80]!r}")
                return None
            if "error" in doc:
                r.error = _wellformed_error("openai", doc) or ""
                if not r.error:
                    r.problems.append(f"malformed error event {doc!r}")
                self.ended = True
                return "error"
            choices = doc.get("choices")
            if not isinstance(choices, list):
                r.problems.append("chunk without choices")
                return None
            if not choices:
                return None  # the usage chunk
            delta = choices[0].get("delta") or {}
            if delta.get("role"):
                self.saw_role = True
            elif not self.saw_role:
                r.problems.append("first chunk has no delta.role")
                self.saw_role = True
            if delta.get("content"):
                r.pieces.append(delta["content"])
                kind = "piece"
            else:
                kind = None
            if choices[0].get("finish_reason"):
                r.finished = True
                r.finish_reason = choices[0]["finish_reason"]
                return "final"
            return kind
        try:
            doc = json.loads(line)
        except ValueError:
            r.problems.append(f"NDJSON line is not JSON: {line[:80]!r}")
            return None
        if "error" in doc:
            r.error = _wellformed_error(self.route, doc) or ""
            if not r.error:
                r.problems.append(f"malformed error line {doc!r}")
            self.ended = True
            return "error"
        piece = doc.get("response") if self.route == "generate" else (doc.get("message") or {}).get("content")
        if piece is None:
            r.problems.append(f"chunk without text field: {doc!r}"[:160])
        if doc.get("done") is True:
            if piece:
                r.pieces.append(piece)
            for f in ("done_reason", "eval_count", "total_duration"):
                if f not in doc:
                    r.problems.append(f"final line lacks {f}")
            r.finished = True
            r.finish_reason = doc.get("done_reason")
            self.ended = True
            return "final"
        if piece:
            r.pieces.append(piece)
            return "piece"
        return None


def _fault_request(kind: str, t: Template) -> tuple[str, bytes | None, dict[str, str]]:
    path = t.path
    body = t.body(stream=False)
    headers: dict[str, str] = {}
    match kind:
        case "bad_json":
            return path, b'{"model": "tiny", "prompt": ', headers
        case "unknown_model":
            body["model"] = "no-such-model-" + str(random.randrange(10**6))
        case "wrong_type":
            if t.route == "openai":
                body["temperature"] = "hot"
            else:
                body["options"] = "hot"
        case "bad_keep_alive":
            path, body = "/api/generate", {"model": t.model, "prompt": "x", "keep_alive": "5 parsecs"}
        case "raw_with_system":
            path, body = "/api/generate", {"model": t.model, "prompt": "x", "raw": True, "system": "s"}
        case "openai_n":
            path, body = "/v1/chat/completions", {**Template("openai", t.model, "x", "greedy", 4).body(False), "n": 999}
        case "empty_messages_openai":
            path, body = "/v1/chat/completions", {"model": t.model, "messages": []}
        case "foreign_host":
            headers["Host"] = "evil.example"
    return path, json.dumps(body).encode(), headers


async def run(host: str, port: int, plan: Plan, on_piece: Callable[[Result], None] | None = None) -> Result:
    """Drive one request to its planned end; never raises (everything lands in the Result).
    ``on_piece`` is called after each piece of streamed text (the harness's events)."""
    res = Result(plan)
    res.t_send = time.monotonic()
    with trio.move_on_after(plan.deadline) as deadline:
        try:
            await _drive(host, port, plan, res, on_piece)
        except (OSError, wire.ProtocolError) as exc:
            if res.disconnected is None:
                res.problems.append(f"{exc.__class__.__name__}: {exc}")
    if deadline.cancelled_caught:
        res.hung = True
    res.t_end = res.t_end or time.monotonic()
    return res


async def _drive(host: str, port: int, plan: Plan, res: Result, on_piece) -> None:
    t = plan.template
    conn = await wire.Connection.open(host, port, rcvbuf=4096 if plan.action == "slow" else None)
    try:
        if plan.action == "client_fault":
            path, body, headers = _fault_request(plan.fault, t)
            await conn.send("POST", path, body, headers=headers)
            await _read_plain(conn, res, route="openai" if path.startswith("/v1/") else "native")
            return
        body = json.dumps(t.body(plan.stream)).encode()
        await conn.send("POST", t.path, body)
        if plan.action == "early":
            with trio.move_on_after(plan.delay) as timer:
                await _read_response(conn, plan, res, on_piece)
            if timer.cancelled_caught:
                _vanish(conn, plan, res)
            return
        try:
            await _read_response(conn, plan, res, on_piece)
        except _Vanish:
            _vanish(conn, plan, res)
    finally:
        conn.abort()


async def _hold(plan: Plan) -> None:
    if plan.hold is not None:
        await plan.hold.wait()


def _vanish(conn: wire.Connection, plan: Plan, res: Result) -> None:
    if res.t_head is None:
        phase = "before_response"
    elif not plan.stream:
        phase = "before_response"
    elif res.finished:
        phase = "after_last"
    elif res.t_first is None:
        phase = "before_first_token"
    else:
        phase = "decode"
    res.disconnected = phase
    res.t_disconnect = conn.abort(reset=plan.reset)


async def _read_plain(conn: wire.Connection, res: Result, route: str) -> None:
    """A response read whole (client faults): status, headers and a well-formed error."""
    res.status, res.headers = await conn.read_head()
    res.t_head = time.monotonic()
    raw = await conn.read_body()
    res.t_end = time.monotonic()
    try:
        doc = json.loads(raw)
    except ValueError:
        res.problems.append(f"body is not JSON: {raw[:80]!r}")
        return
    if res.status != 200:
        res.error = _wellformed_error("openai" if route == "openai" else "native", doc) or ""
        if not res.error:
            res.problems.append(f"{res.status} with a malformed error body: {raw[:120]!r}")


async def _read_response(conn: wire.Connection, plan: Plan, res: Result, on_piece=None) -> None:
    t = plan.template
    res.status, res.headers = await conn.read_head()
    res.t_head = time.monotonic()
    if plan.action == "at_head" and res.status == 200:
        await _hold(plan)
        raise _Vanish()
    if res.status != 200 or not plan.stream:
        raw = await conn.read_body()
        res.t_end = time.monotonic()
        try:
            doc = json.loads(raw)
        except ValueError:
            res.problems.append(f"{res.status} body is not JSON: {raw[:80]!r}")
            return
        if res.status != 200:
            res.error = _wellformed_error(t.route, doc) or ""
            if not res.error:
                res.problems.append(f"{res.status} with a malformed error body: {raw[:120]!r}")
            if res.status == 503 and "retry-after" not in res.headers:
                res.problems.append("503 without Retry-After")
            return
        if t.route == "openai":
            try:
                choice = doc["choices"][0]
                res.pieces.append(choice["message"]["content"])
                res.finish_reason = choice["finish_reason"]
            except (KeyError, IndexError, TypeError):
                res.problems.append(f"malformed completion {doc!r}"[:160])
                return
        else:
            text = doc.get("response") if t.route == "generate" else (doc.get("message") or {}).get("content")
            if not isinstance(text, str) or doc.get("done") is not True:
                res.problems.append(f"malformed answer {doc!r}"[:160])
                return
            res.pieces.append(text)
            res.finish_reason = doc.get("done_reason")
        res.finished = True
        return
    expected = "text/event-stream" if t.route == "openai" else "application/x-ndjson"
    if not res.headers.get("content-type", "").startswith(expected):
        res.problems.append(f"content-type {res.headers.get('content-type')!r}, expected {expected}")
    reader = _Reader(res, t.route)
    pieces = 0
    async for line in conn.lines():
        kind = reader.feed(line)
        if kind == "piece":
            pieces += 1
            if res.t_first is None:
                res.t_first = time.monotonic()
            if on_piece is not None:
                on_piece(res)
            if plan.action == "decode" and pieces >= plan.after_tokens:
                await _hold(plan)
                raise _Vanish()
            if plan.action == "slow" and pieces == plan.stall_after:
                await trio.sleep(plan.stall_s)  # the client's behaviour under test, not a wait
        elif kind == "final":
            if plan.action == "after_last":
                await _hold(plan)
                raise _Vanish()
    res.t_end = time.monotonic()
    if not reader.ended:
        res.problems.append("stream ended without a final line or an error")
    elif t.route == "openai" and res.error is None and not res.finished:
        res.problems.append("stream ended without finish_reason")
