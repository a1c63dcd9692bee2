"""HTTP/1.1 connection handling on a real daemon: keep-alive after early answers, and closing.

An early answer (an unknown route, a wrong method, a refused host or origin, a body over the
limit, a blob already stored) can go out before the request body is all in. The connection must
then either be drained (and serve the client's next request) or be closed with
``Connection: close``; it must never sit half open with the next request unanswered.
"""

from __future__ import annotations

import hashlib
import json
import socket

import httpx
import ollama
import pytest
import trio
from support import start_daemon

TRIALS = 8  # the body races the answer: several tries per kind make a lost race show
MAX_BODY = 64 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


SMALL_BLOB = b"small blob " * 1000  # under the drain limit: drained, the connection is kept
LARGE_BLOB = bytes(range(256)) * 8192  # 2 MiB, over it: answered with Connection: close

# (label, method, path, extra request arguments, expected status)
EARLY_ANSWERS = [
    ("unknown route (OpenAI)", "POST", "/v1/no-such-route", {"json": {"model": "tiny", "x": "y" * 500}}, 404),
    ("unknown route (Ollama)", "POST", "/api/no-such-route", {"json": {"a": 1}}, 404),
    ("wrong method", "PUT", "/api/tags", {"json": {"a": "b" * 2000}}, 405),
    (
        "over the body limit",
        "POST",
        "/api/chat",
        {"content": b"{" + b" " * (2 * MAX_BODY) + b"}", "headers": {"content-type": "application/json"}},
        413,
    ),
    ("bad field", "POST", "/api/chat", {"json": {"model": 5, "messages": []}}, 400),
    ("foreign host", "POST", "/api/chat", {"json": {"model": "tiny"}, "headers": {"host": "evil.example"}}, 403),
    (
        "foreign origin",
        "POST",
        "/api/chat",
        {"content": b'{"model": "tiny"}', "headers": {"origin": "http://evil.example", "content-type": "text/plain"}},
        403,
    ),
    ("small blob already stored", "POST", f"/api/blobs/{_digest(SMALL_BLOB)}", {"content": SMALL_BLOB}, 200),
    ("large blob already stored", "POST", f"/api/blobs/{_digest(LARGE_BLOB)}", {"content": LARGE_BLOB}, 200),
]


async def _store_blobs(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        for blob in (SMALL_BLOB, LARGE_BLOB):
            r = await c.post(f"/api/blobs/{_digest(blob)}", content=blob)
            assert r.status_code == 201, r.text


@pytest.fixture
async def daemon_small_body(models_dir):
    async with trio.open_nursery() as nursery:
        d = await start_daemon(nursery, models_dir, max_body_bytes=MAX_BODY)
        yield d
        d.shutdown.set()


def _early_answers_then_follow_ups(url: str) -> list[str]:
    """On a worker thread: with a blocking client the body truly races the answer (a client in
    the daemon's own trio loop writes headers and body before the daemon reads either)."""
    problems = []
    # One client per kind, kept alive across its trials: each follow-up request goes on the
    # connection of the early answer unless that answer said Connection: close.
    for label, method, path, kwargs, status in EARLY_ANSWERS:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=3)) as c:
            for trial in range(TRIALS):
                r = c.request(method, path, **kwargs)
                if r.status_code != status:
                    problems.append(f"{label}: answered {r.status_code}, not {status}: {r.text[:100]}")
                    break
                try:
                    after = c.get("/api/version")
                except httpx.ReadTimeout:
                    problems.append(f"{label}: trial {trial}: the next request on the connection hung")
                    break
                if after.status_code != 200:
                    problems.append(f"{label}: the next request got {after.status_code}")
    return problems


async def test_keep_alive_client_is_answered_after_every_early_answer(daemon_small_body):
    url = daemon_small_body.url
    with trio.fail_after(120):
        await _store_blobs(url)
        problems = await trio.to_thread.run_sync(_early_answers_then_follow_ups, url, abandon_on_cancel=True)
    assert not problems, "\n".join(problems)


def _create_blobs_then_list(host: str, paths: list) -> list[str]:
    problems = []
    client = ollama.Client(host=host, timeout=httpx.Timeout(10, read=3))
    for path in paths:
        assert client.create_blob(path) == _digest(path.read_bytes())  # stores it
        for trial in range(TRIALS):
            client.create_blob(path)  # already stored: answered early
            try:
                listed = client.list()
            except httpx.ReadTimeout:
                problems.append(f"{path.name}, trial {trial}: the call after create_blob hung")
                break
            assert any(m.model == "tiny:latest" for m in listed.models)
    return problems


async def test_official_client_is_answered_after_create_blob_of_a_stored_blob(daemon, tmp_path):
    """ollama.Client.create_blob always uploads; for a blob already stored the daemon answers
    before reading it. The client's next call, on the same connection pool, must be answered."""
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(SMALL_BLOB)
    large.write_bytes(LARGE_BLOB)
    with trio.fail_after(90):
        problems = await trio.to_thread.run_sync(
            _create_blobs_then_list, daemon.url, [small, large], abandon_on_cancel=True
        )
    assert not problems, "\n".join(problems)


async def _exchange(stream: trio.SocketStream, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request``; read one response (head, body), by Content-Length."""
    await stream.send_all(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before the response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = int(
        next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head, body


async def _closed_by_server(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(5):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return True
            except trio.BrokenResourceError:  # reset: closed all the same
                return True
    return False


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", id="connection-close"
        ),
        pytest.param(b"GET /api/version HTTP/1.0\r\n\r\n", id="http-1.0"),
        pytest.param(
            b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b'Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{"model": "nope"}',
            id="connection-close-error",
        ),
    ],
)
async def test_server_closes_the_connection_when_asked(daemon, request_bytes):
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream(*_host_port(daemon.url))
        async with stream:
            head, body = await _exchange(stream, request_bytes)
            assert head.split(b" ")[1] in (b"200", b"404"), head
            json.loads(body)
            assert await _closed_by_server(stream), "the server kept the connection open after answering"


def _closes_after_client_eof(host: str, port: int, requests: list[bytes]) -> bool:
    """Blocking, on a worker thread (in the daemon's own loop the race never shows): answers
    to ``requests`` on one connection, then shut our side; did the server close within 5 s?"""
    with socket.create_connection((host, port), timeout=30) as s:
        f = s.makefile("rb")
        for request in requests:
            s.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += f.readline()
            assert head.split(b" ")[1] == b"200" and b"connection: close" not in head.lower(), head
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            f.read(length)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            return f.read() == b""
        except TimeoutError:
            return False


async def test_connection_closed_by_the_client_is_closed_at_once(daemon):
    """A client that ends a kept-alive connection after its answers must find it closed by the
    server too, not held (CLOSE-WAIT, two live tasks) until the keep-alive timeout, 75 s."""
    show = (
        b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 17\r\n\r\n{"model": "tiny"}'
    )
    version = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    held = []
    with trio.fail_after(120):
        for requests in [[show], [version], [show, version]] * TRIALS:  # the close races the recycle
            if not await trio.to_thread.run_sync(_closes_after_client_eof, *_host_port(daemon.url), requests):
                held.append(len(requests))
    assert not held, f"{len(held)} of {3 * TRIALS} connections held open after the client closed"


async def test_body_sent_after_the_answer_never_hangs_the_connection(daemon):
    """Deterministic order: the headers, then the answer, then the body and the next request.
    The connection must either have been closed (the answer said so) or answer that request."""
    body = json.dumps({"model": "tiny", "pad": "x" * 100}).encode()
    with trio.fail_after(30):
        for path in ("/v1/no-such-route", "/api/no-such-route"):
            stream = await trio.open_tcp_stream(*_host_port(daemon.url))
            async with stream:
                head, _ = await _exchange(
                    stream,
                    (
                        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n"
                    ).encode(),
                )
                assert head.split(b" ")[1] == b"404", head
                assert b"connection: close" in head.lower(), head  # it could not wait for the body
                try:
                    await stream.send_all(body + b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                except trio.BrokenResourceError:
                    pass
                assert await _closed_by_server(stream), "the connection was left half open"
