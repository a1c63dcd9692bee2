"""The interactive chat behind `mlxctl run MODEL` and `mlxctl chat MODEL`, shaped like `ollama run`.

It is a plain client of the daemon's Ollama-native API (/api/chat, /api/show); the httpx client
it is given must have the daemon as its base_url.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from typing import Callable

import httpx
import trio

EXIT_HINT = "Use Ctrl + d or /bye to exit."
HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""
SET_HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, num_predict, seed, top_k, top_p, stop ...)
  /set system TEXT            Set the system message
  /set verbose                Show statistics after each answer
  /set quiet                  Hide them
  /set think [low|medium|high]  Let the model think (its default for a model that can)
  /set nothink                Ask it not to
"""
SHOW_TOPICS = {
    "info": "details for this model",
    "license": "the model's license",
    "modelfile": "the Modelfile for this model",
    "parameters": "parameters for this model",
    "system": "the system message",
    "template": "the prompt template",
}
SHOW_HELP = "Available Commands:\n" + "".join(f"  /show {k:<12} Show {v}\n" for k, v in SHOW_TOPICS.items())


class ReplError(Exception):
    """An error reported by the daemon, as a message fit to print."""


def _error_text(status: int, raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip() or f"HTTP {status}"


THINKING, DONE_THINKING = "Thinking...\n", "\n...done thinking.\n\n"


async def stream_chat(
    client: httpx.AsyncClient,
    model: str,
    messages: list[dict],
    options: dict,
    *,
    out: Callable[[str], None],
    keep_alive=None,
    think=None,
    hide_thinking: bool = False,
    out_thinking: Callable[[str], None] | None = None,
) -> dict:
    """Streams the answer's text to ``out``; its reasoning, as ``ollama run`` shows it (between
    "Thinking..." and "...done thinking."), to ``out_thinking`` (``out`` unless given), or nowhere
    with ``hide_thinking``."""
    body = {"model": model, "messages": messages, "stream": True, "options": dict(options or {})}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    if think is not None:
        body["think"] = think
    show = (lambda s: None) if hide_thinking else (out_thinking or out)
    thinking = False
    # Loading a model or reading a long prompt can hold back the first byte for minutes, and
    # tokens may pause; only connecting is allowed to time out.
    timeout = httpx.Timeout(None, connect=client.timeout.connect)
    async with client.stream("POST", "/api/chat", json=body, timeout=timeout) as resp:
        if resp.status_code >= 400:
            raise ReplError(_error_text(resp.status_code, await resp.aread()))
        result: dict | ReplError | None = None
        async for line in resp.aiter_lines():
            # Reading on to the end of the body instead of leaving at the done or error line lets
            # httpx's generators finish rather than be collected half-way.
            if result is not None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                result = ReplError(f"unreadable line from the server: {line[:200]!r}")
                continue
            if obj.get("error"):
                result = ReplError(str(obj["error"]))
                continue
            thought = (obj.get("message") or {}).get("thinking")
            if thought:
                if not thinking:
                    show(THINKING)
                thinking = True
                show(thought)
            piece = (obj.get("message") or {}).get("content")
            if thinking and (piece or obj.get("done")):
                show(DONE_THINKING)
                thinking = False
            if piece:
                out(piece)
            if obj.get("done"):
                result = obj
    if isinstance(result, dict):
        return result
    raise result or ReplError("the server ended the stream before the answer was done")


def _go_duration(ns: int) -> str:
    """time.Duration's String(), which is what ollama prints, e.g. 1.234567s, 10ms, 1m2.5s."""

    def frac(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}" if digits else str(whole)

    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return frac(ns, 1_000) + "µs"
    if ns < 1_000_000_000:
        return frac(ns, 1_000_000) + "ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    secs = frac(rest, 1_000_000_000) + "s"
    return f"{hours}h{minutes}m{secs}" if hours else f"{minutes}m{secs}" if minutes else secs


def format_stats(final: dict) -> str:
    rows: list[tuple[str, str]] = []

    def ns(key: str) -> int:
        return int(final.get(key) or 0)

    for key, label in (("total_duration", "total duration"), ("load_duration", "load duration")):
        if ns(key) > 0:
            rows.append((label, _go_duration(ns(key))))
    for prefix, label in (("prompt_eval", "prompt eval"), ("eval", "eval")):
        count, dur = ns(f"{prefix}_count"), ns(f"{prefix}_duration")
        if count > 0:
            rows.append((f"{label} count", f"{count} token(s)"))
        if dur > 0:
            rows.append((f"{label} duration", _go_duration(dur)))
            rows.append((f"{label} rate", f"{count / (dur / 1e9):.2f} tokens/s"))
    return "\n".join(f"{label + ':':<22}{value}" for label, value in rows)


class StreamControl:
    """Where Ctrl+C lands: the SIGINT watcher calls interrupt(), and so can tests."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self.signals_installed = False
        self.on_idle: Callable[[], None] = lambda: None

    @contextlib.contextmanager
    def guard(self):
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                yield scope
            finally:
                self._scope = None

    def interrupt(self) -> None:
        if self._scope is not None:
            # Leaving the scope closes the HTTP stream, and the daemon cancels generation when
            # its client goes away.
            self._scope.cancel()
        else:
            self.on_idle()


def _parse_value(text: str):
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def _default_input() -> Callable[[str], str]:
    with contextlib.suppress(ImportError):  # no readline on Windows
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    return input


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Session:
    def __init__(self, client, model, options, verbose, out, control, input_fn, think=None, hide_thinking=False):
        self.client, self.model, self.options, self.verbose = client, model, options, verbose
        self.out, self.control, self.input_fn = out, control, input_fn
        self.think, self.hide_thinking = think, hide_thinking
        self.messages: list[dict] = []
        self.system = ""
        self.prompt = ">>> "
        control.on_idle = self._idle_interrupt

    def _idle_interrupt(self) -> None:
        # input() sits in a worker thread that no signal can wake, so answer the key the way
        # ollama does and redraw the prompt with whatever has been typed so far.
        typed = ""
        if "readline" in sys.modules and self.input_fn is input:
            typed = sys.modules["readline"].get_line_buffer()
        self.out("\n" + ("" if typed else EXIT_HINT + "\n") + self.prompt + typed)

    async def _ask(self, prompt: str) -> str:
        self.prompt = prompt
        # abandon_on_cancel: if the whole REPL is cancelled, don't wait for the user's Enter.
        return await trio.to_thread.run_sync(self.input_fn, prompt, abandon_on_cancel=True)

    async def read(self) -> str | None:
        """One input: a line, or a \"\"\" block joined with newlines; None at end of input."""
        try:
            line = await self._ask(">>> ")
            head, sep, tail = line.partition('"""')
            if not sep or head.strip() not in ("", "/set system"):
                return line
            if len(tail.rstrip()) >= 3 and tail.rstrip().endswith('"""'):
                return head + tail.rstrip()[:-3]
            parts = [tail] if tail.strip() else []
            while True:
                nxt = await self._ask("... ")
                if nxt.rstrip().endswith('"""'):
                    last = nxt.rstrip()[:-3]
                    return head + "\n".join(parts + [last] if last else parts)
                parts.append(nxt)
        except EOFError:
            return None
        except KeyboardInterrupt:  # an input_fn that runs where Ctrl+C can reach it
            self.out("\n" + EXIT_HINT + "\n")
            return ""

    async def run(self) -> None:
        while True:
            text = await self.read()
            if text is None:
                self.out("\n")
                return
            if text.startswith("/"):
                if await self.command(text):
                    return
            elif text.strip():
                await self.turn(text)

    def _request_messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    async def turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []

        def sink(piece: str) -> None:
            pieces.append(piece)
            self.out(piece)

        final, error = None, None
        try:
            with self.control.guard():
                final = await stream_chat(
                    self.client,
                    self.model,
                    self._request_messages(),
                    self.options,
                    out=sink,
                    think=self.think,
                    hide_thinking=self.hide_thinking,
                    out_thinking=self.out,
                )
        except (ReplError, httpx.HTTPError) as exc:
            error = str(exc) or type(exc).__name__
        if final is None:  # failed or interrupted
            # The unanswered user turn goes too: templates that insist on alternating roles
            # would reject the next request otherwise.
            self.messages.pop()
            lead = "\n" if pieces else ""
            self.out(f"{lead}Error: {error}\n" if error else "\n")
            return
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.out("\n\n")
        if self.verbose:
            self.out(format_stats(final) + "\n\n")

    async def command(self, line: str) -> bool:
        """Runs one /command; True means leave."""
        words = line.split(None, 2)
        cmd, args = words[0], words[1:]
        if cmd in ("/bye", "/exit"):
            return True
        if cmd == "/clear":
            self.messages.clear()
            self.out("Cleared session context\n")
        elif cmd in ("/?", "/help"):
            self.out(HELP)
        elif cmd == "/set":
            self.set(args)
        elif cmd == "/show":
            await self.show(args[0] if args else "")
        else:
            self.out(f"Unknown command '{cmd}'. Type /? for help\n")
        return False

    def set(self, args: list[str]) -> None:
        what, rest = (args + ["", ""])[:2]
        if what == "parameter":
            name, *values = rest.split() or [""]
            if not name or not values:
                self.out("Usage:\n  /set parameter NAME VALUE\n")
                return
            self.options[name] = values if name == "stop" else _parse_value(" ".join(values))
            self.out(f"Set parameter '{name}' to '{', '.join(values)}'\n")
        elif what == "system" and rest:
            self.system = rest
            self.out("Set system message.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.out(f"Set '{what}' mode.\n")
        elif what == "think" and rest in ("", "low", "medium", "high"):
            self.think = rest or True
            self.out(f"Set 'think' mode{f' to {rest!r}' if rest else ''}.\n")
        elif what == "nothink":
            self.think = False
            self.out("Set 'nothink' mode.\n")
        else:
            self.out(SET_HELP)

    async def show(self, what: str) -> None:
        if what not in SHOW_TOPICS:
            self.out(SHOW_HELP)
            return
        if what == "system" and self.system:
            self.out(self.system + "\n")
            return
        info = None
        try:
            with self.control.guard():
                resp = await self.client.post("/api/show", json={"model": self.model})
                if resp.status_code >= 400:
                    raise ReplError(_error_text(resp.status_code, resp.content))
                info = resp.json()
        except (ReplError, httpx.HTTPError, ValueError) as exc:
            self.out(f"Error: {exc}\n")
            return
        self.out(_render_show(what, info, self.options) if info is not None else "\n")


def _render_show(what: str, info: dict, user_options: dict) -> str:
    if what == "info":
        details, model_info = info.get("details") or {}, info.get("model_info") or {}
        ctx = next((v for k, v in model_info.items() if k.endswith(".context_length")), None)
        rows = [
            ("architecture", model_info.get("general.architecture") or details.get("family")),
            ("parameters", details.get("parameter_size")),
            ("context length", ctx),
            ("quantization", details.get("quantization_level")),
        ]
        text = "  Model\n" + "".join(f"    {k:<16}{v}\n" for k, v in rows if v not in (None, ""))
        caps = info.get("capabilities") or []
        if caps:
            text += "\n  Capabilities\n" + "".join(f"    {c}\n" for c in caps)
        return text + "\n"
    if what == "parameters":
        params = (info.get("parameters") or "").strip()
        text = f"Model defined parameters:\n{params}\n" if params else "No parameters were specified for this model.\n"
        if user_options:
            text += "\nUser defined parameters:\n" + "".join(f"{k:<30} {v}\n" for k, v in user_options.items())
        return text
    return (str(info.get(what) or "").rstrip() or f"No {what} was specified for this model.") + "\n"


async def _watch_sigint(signals, control: StreamControl) -> None:
    async for _ in signals:
        control.interrupt()


async def repl(
    client: httpx.AsyncClient,
    model: str,
    *,
    options: dict | None = None,
    verbose: bool = False,
    input_fn=None,
    out=None,
    control: StreamControl | None = None,
    think=None,
    hide_thinking: bool = False,
) -> None:
    control = control or StreamControl()
    session = _Session(
        client,
        model,
        dict(options or {}),
        verbose,
        out or _stdout,
        control,
        input_fn or _default_input(),
        think,
        hide_thinking,
    )
    with contextlib.ExitStack() as stack:
        try:
            # Owning SIGINT for the whole session also keeps trio from raising KeyboardInterrupt
            # into some later await after a Ctrl+C pressed at the prompt.
            signals = stack.enter_context(trio.open_signal_receiver(signal.SIGINT))
        except (RuntimeError, ValueError):  # not the main thread: Ctrl+C is the caller's business
            signals = None
        control.signals_installed = signals is not None
        async with trio.open_nursery() as nursery:
            if signals is not None:
                nursery.start_soon(_watch_sigint, signals, control)
            await session.run()
            nursery.cancel_scope.cancel()
