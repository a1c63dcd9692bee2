"""Fixtures for the registry tests: the real CNCF distribution registry (Debian's
``docker-registry``) on 127.0.0.1, and a small fault-injection stand-in registry.

conftest.py here hands the fixtures to pytest and test modules import the helpers; this module
is not itself a conftest.py so that ``from support import`` keeps meaning tests/conftest.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from mlxserve.config import TransferOptions

REGISTRY_BIN = shutil.which("docker-registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One docker-registry process; ``restart`` brings it back on the same port and storage."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = workdir / "storage"
        self.config = workdir / "config.yml"
        self.log = workdir / "registry.log"
        self.config.write_text(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
http:
  addr: {self.host}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)], stdout=log, stderr=log)
        # Bounded wait for the port to answer (the one place a retry loop is the right tool).
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def registry(tmp_path):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    reg = Registry(tmp_path / "registry")
    reg.start()
    yield reg
    reg.kill()


# What start_daemon's daemons pull and push with (Settings.transfer); fast_retries changes it.
DAEMON_TRANSFER = TransferOptions()


@pytest.fixture
def fast_retries(monkeypatch):
    """Transfers made by a daemon in these tests give up (or notice a stall) quickly."""
    monkeypatch.setattr(
        sys.modules[__name__], "DAEMON_TRANSFER", TransferOptions(retries=2, backoff=0.05, stall_timeout=10)
    )


# ---------------------------------------------------------------------- fault-injection stand-in


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StandIn:
    """A fault-injection stand-in for a registry: serves manifests and blobs from memory, asks
    for a bearer token when ``token`` is set, honours Range, and can misbehave on purpose:

    * ``corrupt``: digests whose bytes are served altered (same length);
    * ``stall``: digest -> byte count: the first GET sends that many bytes, then stops sending
      (without closing) until ``release`` is set.
    """

    def __init__(self, token: str | None = None):
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.corrupt: set[str] = set()
        self.stall: dict[str, int] = {}
        self.token = token
        self.release = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.token_requests = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _send(
                self,
                code: int,
                body: bytes = b"",
                headers: dict | None = None,
                head: bool = False,
                length: int | None = None,
            ) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                stand_in.requests.append((self.command, self.path, self.headers.get("Range")))
                if self.path.startswith("/token"):
                    stand_in.token_requests += 1
                    return self._send(
                        200, json.dumps({"token": stand_in.token}).encode(), {"Content-Type": "application/json"}
                    )
                if (
                    stand_in.token
                    and self.path != "/v2/"
                    and self.headers.get("Authorization") != f"Bearer {stand_in.token}"
                ):
                    realm = f"http://{stand_in.host}/token"
                    return self._send(
                        401,
                        b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                        {"WWW-Authenticate": f'Bearer realm="{realm}",service="stand-in",scope="repository:x:pull"'},
                        head=head,
                    )
                m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", self.path)
                if self.path == "/v2/":
                    return self._send(200, b"{}", head=head)
                if m is None:
                    return self._send(404, head=head)
                repo, kind, ref = m.groups()
                if kind == "manifests":
                    if (repo, ref) not in {tuple(k.split("@")) for k in stand_in.manifests}:
                        return self._send(
                            404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}', head=head
                        )
                    data, ctype = stand_in.manifests[f"{repo}@{ref}"]
                    return self._send(200, data, {"Content-Type": ctype}, head=head)
                data = stand_in.blobs.get(ref)
                if data is None:
                    return self._send(404, head=head)
                if ref in stand_in.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range")
                if rng and (rm := re.fullmatch(r"bytes=(\d+)-", rng)):
                    start = int(rm.group(1))
                body = data[start:]
                headers = {"Content-Type": "application/octet-stream"}
                code = 200
                if start:
                    code = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if head:
                    return self._send(200, b"", headers, head=True, length=len(data))
                cut = stand_in.stall.pop(ref, None)
                if cut is not None:
                    self._send(code, b"", headers, length=len(body), head=True)
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    stand_in.release.wait(30)  # a stalled connection: open, silent
                    self.close_connection = True
                    return
                self._send(code, body, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_blob(self, data: bytes) -> dict:
        digest = sha(data)
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def add_manifest(self, repo: str, tag: str, doc: dict, media_type: str) -> bytes:
        data = json.dumps(doc).encode()
        self.manifests[f"{repo}@{tag}"] = (data, media_type)
        return data

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    s = StandIn(token="s3cret")
    s.thread.start()
    yield s
    s.close()


# ---------------------------------------------------------------------- daemons


class Daemon:
    def __init__(self, info, shutdown):
        self.url = info.url
        self.runtime = info.runtime
        self.shutdown = shutdown


async def start_daemon(nursery, models_dir: Path) -> Daemon:
    """A daemon on 127.0.0.1:0 serving ``models_dir`` (as tests/conftest.py's start_daemon; not
    imported from there because ``conftest`` names a different module per test directory)."""
    import trio

    from mlxserve.config import Settings
    from mlxserve.http.server import run_daemon

    settings = Settings(host="127.0.0.1", port=0, models_dir=models_dir, keep_alive=300.0, transfer=DAEMON_TRANSFER)
    shutdown = trio.Event()
    info = await nursery.start(lambda task_status: run_daemon(settings, shutdown=shutdown, task_status=task_status))
    return Daemon(info, shutdown)
