"""The chat REPL's client logic, against a scripted stand-in for the daemon.

The real daemon is not wired to the CLI yet, so ScriptedDaemon below is a small but real HTTP/1.1
server on 127.0.0.1 that answers /api/chat with scripted NDJSON lines and /api/show with JSON.
It exists only to exercise the REPL's HTTP client side; it knows nothing about models.
"""

from __future__ import annotations

import json
import signal
import threading
from functools import partial

import httpx
import pytest
import trio

from mlxserve.cli.repl import ReplError, StreamControl, format_stats, repl, stream_chat

STALL = object()  # as the last step of a chat reply: keep the stream open until the client leaves

SHOW = {
    "modelfile": "FROM /models/tiny\n",
    "parameters": 'stop                           "<|im_end|>"',
    "template": "{{ .Prompt }}",
    "system": "",
    "license": "",
    "details": {"format": "gguf", "family": "llama", "parameter_size": "1.2M", "quantization_level": "F32"},
    "model_info": {"general.architecture": "llama", "llama.context_length": 2048},
    "capabilities": ["completion"],
}


def answer(*pieces: str, **final) -> list:
    lines = [{"message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
    stats = {
        "done_reason": "stop",
        "total_duration": 1_200_000_000,
        "load_duration": 10_000_000,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 50_000_000,
        "eval_count": 40,
        "eval_duration": 1_100_000_000,
    }
    return lines + [{"message": {"role": "assistant", "content": ""}, "done": True, **stats, **final}]


class HttpError:
    def __init__(self, status: int, body: dict):
        self.status, self.body = status, body


class ScriptedDaemon:
    """Scripted stand-in for the daemon, for REPL client tests only (see the module docstring)."""

    def __init__(self):
        self.chat_replies: list = []  # one entry per /api/chat request, consumed in order
        self.requests: list[tuple[str, dict | None]] = []
        self.show = SHOW
        self.client_left = trio.Event()  # a stalled stream's client closed its connection
        self.url = ""

    def chats(self) -> list[dict]:
        return [body for path, body in self.requests if path == "/api/chat"]

    async def handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
                size = int(headers.get("content-length", "0"))
                while len(buf) < size:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:size], buf[size:]
                self.requests.append((path, json.loads(body) if body else None))
                if not await self.respond(stream, path):
                    return
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async def respond(self, stream, path: str) -> bool:
        """Answers one request; False once the connection is done for."""
        reply = self.show if path == "/api/show" else self.chat_replies.pop(0)
        if isinstance(reply, (dict, HttpError)):
            status, body = (200, reply) if isinstance(reply, dict) else (reply.status, reply.body)
            raw = json.dumps(body).encode()
            await stream.send_all(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            return True
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for step in reply:
            if step is STALL:
                while await stream.receive_some(65536):
                    pass
                self.client_left.set()
                return False
            line = (json.dumps(step) + "\n").encode()
            await stream.send_all(b"%x\r\n%s\r\n" % (len(line), line))
        await stream.send_all(b"0\r\n\r\n")
        return True


@pytest.fixture
async def daemon(nursery):
    d = ScriptedDaemon()
    listeners = await nursery.start(partial(trio.serve_tcp, d.handle, 0, host="127.0.0.1"))
    d.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return d


@pytest.fixture
async def client(daemon):
    async with httpx.AsyncClient(base_url=daemon.url, trust_env=False) as c:
        yield c


class Script:
    """An input_fn that replays lines (None stands for Ctrl+C at the prompt), then Ctrl+D."""

    def __init__(self, *lines):
        self.lines = list(lines)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line is None:
            raise KeyboardInterrupt
        return line


class Screen:
    def __init__(self):
        self.parts: list[str] = []

    def __call__(self, text: str) -> None:
        self.parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


@pytest.mark.trio
async def test_scripted_session(daemon, client):
    daemon.chat_replies = [answer("Hi", " there!"), answer("Two lines, got it."), answer("Again.")]
    script = Script(
        "hello",
        '"""',
        "multi",
        'line"""',
        "/set parameter temperature 0.2",
        "/set parameter stop <end> <eot>",
        "/set verbose",
        "/show info",
        "again",
        "/bye",
    )
    screen = Screen()
    with trio.fail_after(10):
        await repl(client, "tiny", options={"seed": 1}, input_fn=script, out=screen)

    first, second, third = daemon.chats()
    assert first["model"] == "tiny" and first["stream"] is True
    assert first["messages"] == [{"role": "user", "content": "hello"}]
    assert first["options"] == {"seed": 1}
    assert second["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "multi\nline"},
    ]
    assert third["options"] == {"seed": 1, "temperature": 0.2, "stop": ["<end>", "<eot>"]}
    assert isinstance(third["options"]["temperature"], float)
    assert third["messages"][-1] == {"role": "user", "content": "again"}
    assert len(third["messages"]) == 5
    assert ("/api/show", {"model": "tiny"}) in daemon.requests
    assert script.prompts[:3] == [">>> ", ">>> ", "... "]
    out = screen.text
    assert "Hi there!\n\n" in out
    assert "architecture    llama" in out and "context length  2048" in out
    assert "quantization    F32" in out and "Capabilities\n    completion" in out
    assert "eval rate:            36.36 tokens/s" in out  # verbose was on for the last answer


@pytest.mark.trio
async def test_commands(daemon, client):
    daemon.chat_replies = [answer("ok"), answer("ok")]
    script = Script(
        "hi",
        "/set system Be brief.",
        "/show system",
        "/clear",
        "/show template",
        "/show parameters",
        "/frobnicate",
        "/?",
        "/set",
        '"""one line"""',
    )
    screen = Screen()
    with trio.fail_after(10):
        await repl(client, "tiny", input_fn=script, out=screen)
    first, second = daemon.chats()
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    assert second["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one line"}]
    out = screen.text
    assert "Be brief.\n" in out and "Cleared session context" in out
    assert "{{ .Prompt }}" in out and "Model defined parameters:" in out
    assert "Unknown command '/frobnicate'" in out
    assert "/bye" in out and "/set parameter NAME VALUE" in out


@pytest.mark.trio
async def test_errors_are_printed_and_the_repl_goes_on(daemon, client):
    daemon.chat_replies = [
        answer("partial")[:1] + [{"error": "the model crashed"}],
        HttpError(404, {"error": "model 'tiny' not found"}),
        answer("fine"),
    ]
    screen = Screen()
    with trio.fail_after(10):
        await repl(client, "tiny", input_fn=Script("one", "two", "three"), out=screen)
    assert "partial\nError: the model crashed\n" in screen.text
    assert "Error: model 'tiny' not found\n" in screen.text
    assert daemon.chats()[2]["messages"] == [{"role": "user", "content": "three"}]


@pytest.mark.trio
async def test_stream_chat_returns_the_done_line(daemon, client):
    daemon.chat_replies = [answer("a", "b"), HttpError(500, {"error": "boom"})]
    pieces = []
    with trio.fail_after(10):
        final = await stream_chat(
            client, "tiny", [{"role": "user", "content": "x"}], {"top_k": 3}, out=pieces.append, keep_alive="5m"
        )
        with pytest.raises(ReplError, match="boom"):
            await stream_chat(client, "tiny", [], {}, out=pieces.append)
    assert pieces == ["a", "b"]
    assert final["done"] is True and final["eval_count"] == 40
    assert daemon.chats()[0]["keep_alive"] == "5m" and daemon.chats()[0]["options"] == {"top_k": 3}


def test_format_stats():
    text = format_stats(answer()[-1])
    assert text.splitlines() == [
        "total duration:       1.2s",
        "load duration:        10ms",
        "prompt eval count:    26 token(s)",
        "prompt eval duration: 50ms",
        "prompt eval rate:     520.00 tokens/s",
        "eval count:           40 token(s)",
        "eval duration:        1.1s",
        "eval rate:            36.36 tokens/s",
    ]
    odd = format_stats(
        {"total_duration": 62_500_000_000, "load_duration": 1_500, "eval_count": 3, "eval_duration": 123_456_789}
    )
    assert odd.splitlines() == [
        "total duration:       1m2.5s",
        "load duration:        1.5µs",
        "eval count:           3 token(s)",
        "eval duration:        123.456789ms",
        "eval rate:            24.30 tokens/s",
    ]


async def _interrupted_session(daemon, client, interrupt) -> tuple[Screen, Script]:
    """Streams an answer that stalls after one piece; `interrupt` plays Ctrl+C once it shows."""
    daemon.chat_replies = [answer("partial")[:1] + [STALL], answer("second answer")]
    control = StreamControl()
    shown = trio.Event()
    screen = Screen()

    def out(text):
        screen(text)
        if text == "partial":
            shown.set()

    script = Script("never finishes", "next question")
    async with trio.open_nursery() as nursery:

        async def press_ctrl_c():
            await shown.wait()
            interrupt(control)

        nursery.start_soon(press_ctrl_c)
        await repl(client, "tiny", input_fn=script, out=out, control=control)
    await daemon.client_left.wait()  # the stream was closed, which is how the daemon learns to stop
    return screen, script


@pytest.mark.trio
async def test_ctrl_c_stops_the_stream_and_keeps_it_out_of_history(daemon, client):
    with trio.fail_after(10):
        screen, script = await _interrupted_session(daemon, client, StreamControl.interrupt)
    assert script.prompts == [">>> ", ">>> ", ">>> "]
    assert daemon.chats()[1]["messages"] == [{"role": "user", "content": "next question"}]
    assert "partial\nsecond answer" in screen.text


@pytest.mark.trio
async def test_real_sigint_reaches_the_stream(daemon, client):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("trio can only receive signals in the main thread")

    def send_sigint(control):
        assert control.signals_installed  # otherwise the signal would kill the test run
        signal.raise_signal(signal.SIGINT)

    with trio.fail_after(10):
        await _interrupted_session(daemon, client, send_sigint)
    assert daemon.chats()[1]["messages"] == [{"role": "user", "content": "next question"}]


@pytest.mark.trio
async def test_ctrl_c_at_the_prompt_prints_the_hint(client):
    screen = Screen()
    with trio.fail_after(10):
        await repl(client, "tiny", input_fn=Script(None, '"""', "half a block", None, "/bye"), out=screen)
    assert screen.text.count("Use Ctrl + d or /bye to exit.") == 2

    # Ctrl+C arriving through the signal path while input() waits in its thread
    control, screen, asked = StreamControl(), Screen(), trio.Event()
    token, release = trio.lowlevel.current_trio_token(), trio.Event()

    def waiting_input(prompt):
        trio.from_thread.run_sync(asked.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)
        raise EOFError

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(repl, client, "tiny", input_fn=waiting_input, out=screen, control=control))
            await asked.wait()
            control.interrupt()
            release.set()
    assert screen.text.startswith("\nUse Ctrl + d or /bye to exit.\n>>> ")
