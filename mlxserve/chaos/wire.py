"""A minimal HTTP/1.1 client on raw trio sockets, for the chaos harness.

The harness needs what ordinary clients hide: the exact moment a socket closes (and whether it
closes with FIN or RST), a receive buffer small enough that a stalled reader really pushes back
on the server, and the body as it arrives, piece by piece. One request per connection
(``Connection: close``), so a closed socket is always one abandoned request.
"""

from __future__ import annotations

import json
import socket as _socket
import struct
import time
from typing import AsyncIterator

import trio


class ProtocolError(Exception):
    """The server's bytes are not valid HTTP/1.1."""


class Connection:
    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._buf = bytearray()
        self._eof = False
        self.closed_at: float | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._chunked = False
        self._remaining: int | None = None  # content-length left; None: until EOF or chunked
        self._body_done = False

    @classmethod
    async def open(cls, host: str, port: int, *, rcvbuf: int | None = None) -> Connection:
        sock = trio.socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            if rcvbuf:  # before connect, so the window is small from the handshake on
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketStream(sock))

    # ---- sending ----
    async def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        h = {"Host": host, "Connection": "close", "User-Agent": "mlxserve-chaos"}
        if body is not None:
            h["Content-Type"] = "application/json"
            h["Content-Length"] = str(len(body))
        h.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        await self._stream.send_all(head.encode() + (body or b""))

    # ---- receiving ----
    async def _fill(self) -> bool:
        if self._eof:
            return False
        data = await self._stream.receive_some(65536)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    async def _read_until(self, sep: bytes, limit: int = 65536) -> bytes:
        while True:
            i = self._buf.find(sep)
            if i >= 0:
                out = bytes(self._buf[:i])
                del self._buf[: i + len(sep)]
                return out
            if len(self._buf) > limit:
                raise ProtocolError("header or chunk line too long")
            if not await self._fill():
                raise ProtocolError("connection closed mid-message")

    async def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise ProtocolError("connection closed mid-body")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_head(self) -> tuple[int, dict[str, str]]:
        head = await self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line {line!r}")
            self.headers[k.strip().lower()] = v.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
        return self.status, self.headers

    async def read_piece(self) -> bytes | None:
        """The next piece of the (de-chunked) body; None at its end."""
        if self._body_done:
            return None
        if self._chunked:
            size_line = await self._read_until(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line!r}") from None
            if size == 0:
                while await self._read_until(b"\r\n"):  # trailers, then the empty line
                    pass
                self._body_done = True
                return None
            data = await self._read_exact(size)
            if await self._read_exact(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            return data
        if self._remaining is not None:
            if self._remaining == 0:
                self._body_done = True
                return None
            if not self._buf and not await self._fill():
                raise ProtocolError("connection closed mid-body")
            data = bytes(self._buf[: self._remaining])
            del self._buf[: len(data)]
            self._remaining -= len(data)
            return data
        if not self._buf and not await self._fill():
            self._body_done = True
            return None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def read_body(self) -> bytes:
        out = bytearray()
        while (piece := await self.read_piece()) is not None:
            out += piece
        return bytes(out)

    async def lines(self) -> AsyncIterator[bytes]:
        """Body lines as they arrive (NDJSON and SSE are both line-framed)."""
        pending = b""
        while (piece := await self.read_piece()) is not None:
            pending += piece
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line
        if pending:
            yield pending

    # ---- closing ----
    def abort(self, *, reset: bool = False) -> float:
        """Close now (a client that vanished); RST instead of FIN when ``reset``. Returns when."""
        sock = self._stream.socket
        if self.closed_at is None:
            if reset:
                try:
                    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()
            self.closed_at = time.monotonic()
        return self.closed_at


async def request_json(
    host: str, port: int, method: str, path: str, body: dict | None = None, *, timeout: float = 30.0
) -> tuple[int, dict, dict]:
    """One small request, fully read: (status, headers, parsed JSON body or {})."""
    with trio.fail_after(timeout):
        conn = await Connection.open(host, port)
        try:
            await conn.send(method, path, json.dumps(body).encode() if body is not None else None)
            status, headers = await conn.read_head()
            raw = await conn.read_body()
        finally:
            conn.abort()
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = {"_raw": raw.decode("utf-8", "replace")}
    return status, headers, doc


async def request_text(host: str, port: int, path: str, *, timeout: float = 30.0) -> tuple[int, str]:
    with trio.fail_after(timeout):
        conn = await Connection.open(host, port)
        try:
            await conn.send("GET", path)
            status, _ = await conn.read_head()
            raw = await conn.read_body()
        finally:
            conn.abort()
    return status, raw.decode("utf-8", "replace")
