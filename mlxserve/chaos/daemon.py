"""A real ``mlxctl serve`` in a subprocess, observed from outside through /proc and HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from ..actors.faults import CONTROL_ENV
from . import wire

BIN = Path(sys.executable).parent
TRIO_WORKER = "Trio thread"  # trio names its cached worker threads so (OS-level comm)
POLL_S = 0.002  # bounded polling of daemon state, where the daemon offers no event to wait on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlxctl(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlxctl"), *args], env=env, capture_output=True, text=True, timeout=timeout)


class DaemonProcess:
    """One daemon: start, observe (/proc threads and RSS, /api/status, /metrics), fault, kill."""

    def __init__(self, name: str, workdir: Path, models_dir: Path, **env: str):
        self.name = name
        self.workdir = workdir
        self.models_dir = models_dir
        self.extra_env = dict(env)
        self.port = 0
        self.proc: trio.Process | None = None
        self.control = workdir / f"{name}-faults.json"
        self.log_dir = workdir / f"{name}-log"
        self._fault_id = 0
        self.starts = 0

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self, **more: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")}
        env.update(
            {
                "MLXSERVE_HOST": f"127.0.0.1:{self.port}",
                "MLXSERVE_MODELS": str(self.models_dir),
                "MLXSERVE_LOG_DIR": str(self.log_dir),
                CONTROL_ENV: str(self.control),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        env.update(more)
        return env

    async def start(self, *, timeout: float = 90, **env: str) -> None:
        """Start and wait for the daemon's own "listening on" line (printed once it serves)."""
        if not self.port:
            self.port = free_port()
        self.starts += 1
        stderr = open(self.workdir / f"{self.name}-{self.starts}.stderr", "wb")
        self.proc = await trio.lowlevel.open_process(
            [str(BIN / "mlxctl"), "serve"],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        stderr.close()
        out = b""
        with trio.fail_after(timeout):
            while b"listening on" not in out:
                data = await self.proc.stdout.receive_some(4096)
                if not data:
                    raise RuntimeError(f"daemon {self.name} exited during start: {self.stderr_tail()}")
                out += data

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return (self.workdir / f"{self.name}-{self.starts}.stderr").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self, *, timeout: float = 30) -> int | None:
        """SIGTERM and wait (the graceful path); SIGKILL if it does not end in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await self.proc.wait()
            if self.proc.poll() is None:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode

    async def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        with trio.move_on_after(timeout):
            await self.proc.wait()
        return self.proc.poll()

    # ---- observation from outside ----
    def threads(self) -> dict[str, int]:
        """OS threads by name, from /proc (what the kernel sees, not what Python knows)."""
        names: dict[str, int] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue  # it ended while we looked
            key = TRIO_WORKER if comm.startswith(TRIO_WORKER) else comm
            names[key] = names.get(key, 0) + 1
        return names

    def rss_kib(self) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))

    async def status(self) -> dict:
        code, _, doc = await wire.request_json(self.host, self.port, "GET", "/api/status", timeout=10)
        if code != 200:
            raise RuntimeError(f"/api/status answered {code}")
        return doc

    async def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value} (the harness reads gauges and counters)."""
        code, text = await wire.request_text(self.host, self.port, "/metrics", timeout=10)
        if code != 200:
            raise RuntimeError(f"/metrics answered {code}")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    async def version_ok(self) -> bool:
        try:
            code, _, doc = await wire.request_json(self.host, self.port, "GET", "/api/version", timeout=5)
        except (OSError, trio.TooSlowError, wire.ProtocolError):
            return False
        return code == 200 and "version" in doc

    def request_log(self) -> list[dict]:
        path = self.log_dir / "requests.jsonl"
        out = []
        try:
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        except OSError:
            pass
        return out

    # ---- the fault seam (actors/faults.py) ----
    async def arm(self, *faults: dict, timeout: float = 10) -> None:
        """Arm runtime faults: write the control file, SIGUSR1, wait for the daemon's ack file."""
        self._fault_id += 1
        ack = self.control.with_name(self.control.name + ".ack")
        tmp = self.control.with_name(self.control.name + ".tmp")
        tmp.write_text(json.dumps({"id": self._fault_id, "faults": list(faults)}))
        os.replace(tmp, self.control)
        self.proc.send_signal(signal.SIGUSR1)
        with trio.fail_after(timeout):
            while True:  # bounded polling: the ack is a file the daemon writes
                try:
                    doc = json.loads(ack.read_text())
                    if doc.get("id") == self._fault_id:
                        if not doc.get("ok"):
                            raise RuntimeError(f"fault control refused: {doc}")
                        return
                except (OSError, ValueError):
                    pass
                await trio.sleep(POLL_S)


async def wait_for(probe, predicate, *, timeout: float, interval: float = POLL_S):
    """Poll ``probe()`` (bounded by ``timeout``) until ``predicate(value)``; returns
    (value, seconds waited, ok). Used only where the daemon offers no event to wait on."""
    t0 = time.monotonic()
    value = None
    with trio.move_on_after(timeout):
        while True:
            value = await probe()
            if predicate(value):
                return value, time.monotonic() - t0, True
            await trio.sleep(interval)
    return value, time.monotonic() - t0, False
