"""A client for the OCI distribution API (blocking; one ``httpx.Client`` shared by threads).

    GET  /v2/<repo>/manifests/<ref>        Accept: OCI manifest, Docker schema 2 (Ollama's)
    HEAD /v2/<repo>/blobs/<digest>         does the registry have it?
    GET  /v2/<repo>/blobs/<digest>         with ``Range: bytes=N-`` to resume
    POST /v2/<repo>/blobs/uploads/         start an upload; then PUT (one shot) or PATCH chunks
    PUT  /v2/<repo>/manifests/<ref>

A registry may answer 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``;
the client then fetches an anonymous token from the realm (with basic credentials when
``TransferOptions.auth``, ``MLXSERVE_REGISTRY_AUTH=user:password``, is set) and repeats the request.

Transient failures (connection errors, 5xx, 429, a read that stalls longer than
``stall_timeout``) are retried with exponential backoff. Every wait checks ``cancel``, a
``threading.Event``: setting it makes the running call raise :class:`TransferCancelled` soon.

Errors, all ``MlxserveError`` subclasses (status in brackets):

    RegistryError            [502]  the registry is unreachable, failed, or answered nonsense
    ├── RegistryDigestMismatch [502] a blob's bytes do not hash to the digest asked for
    └── RegistryUnauthorized [401]  the registry refused our credentials/token
    RemoteNotFound           [404]  no such repository, tag or blob in the registry
    TransferCancelled        [499]  the caller set ``cancel``
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import re
import socket
import threading
import time
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlencode

import httpx

from ..config import TransferOptions  # noqa: F401  (defined with the settings; imported from here too)
from ..errors import (  # noqa: F401  (re-exported: callers import them from here too)
    MlxserveError,
    NotFound,
    RegistryDigestMismatch,
    RegistryError,
    RegistryUnauthorized,
    RemoteNotFound,
    TransferCancelled,
)
from . import manifest as mt
from .names import ModelName

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join(
    [mt.MANIFEST_MEDIA_TYPE, mt.DOCKER_MANIFEST_MEDIA_TYPE, OCI_INDEX + ";q=0.5", DOCKER_LIST + ";q=0.5"]
)
READ_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20


class AnyEvent:
    """Set when any of its ``threading.Event``s is (a caller's cancel plus a pull's own abort)."""

    def __init__(self, *events: threading.Event):
        self._events = events or (threading.Event(),)

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)

    def wait(self, timeout: float) -> bool:
        if len(self._events) == 1:
            return self._events[0].wait(timeout)
        deadline = time.monotonic() + timeout
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._events[0].wait(min(left, 0.05))
        return True


class _Retryable(Exception):
    """A failure worth another try (wraps the reason for the final error message)."""


class Stats:
    """Process-wide byte counters (observability, and how tests count what went over the wire)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blob_bytes_received = 0
        self.blob_bytes_sent = 0

    def add(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.blob_bytes_received += received
            self.blob_bytes_sent += sent


STATS = Stats()


def is_local(host: str) -> bool:
    h = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return h in ("localhost", "127.0.0.1", "[::1]") or h.endswith(".localhost")


def base_url(registry: str, insecure: bool) -> str:
    return f"{'http' if insecure or is_local(registry) else 'https'}://{registry}"


_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): q or u for k, q, u in _CHALLENGE_PARAM.findall(rest)}


def _registry_message(resp: httpx.Response) -> str:
    """The first error message of a registry's JSON error body, if any."""
    try:
        errors = resp.json().get("errors") or []
        if errors and isinstance(errors[0], dict):
            return str(errors[0].get("message") or errors[0].get("code") or "")
    except Exception:  # not JSON: a proxy's HTML page and so on
        pass
    return ""


class RegistryClient:
    """One registry (``host[:port]``); ``repo`` arguments are ``namespace/name``."""

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        options: TransferOptions | None = None,
        cancel: threading.Event | AnyEvent | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.registry = registry
        self.base = base_url(registry, insecure)
        self.options = options or TransferOptions()
        self.cancel = cancel if cancel is not None else AnyEvent()
        o = self.options
        self._http = httpx.Client(
            timeout=httpx.Timeout(o.stall_timeout, connect=o.connect_timeout),
            follow_redirects=True,
            transport=transport,
            limits=httpx.Limits(max_connections=o.parallel + 4),
            headers={"User-Agent": "mlxserve"},
        )
        self._tokens: dict[str, str] = {}
        self._tokens_lock = threading.Lock()
        # Downloads being read; a cancel shuts their sockets down so that a read blocked on a
        # stalled registry returns at once instead of after stall_timeout.
        self._active: set[httpx.Response] = set()
        self._active_lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._watch_cancel, name="mlxserve-registry-cancel", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._http.close()

    def _watch_cancel(self) -> None:
        while not self._closed.is_set():
            if self.cancel.wait(0.25):
                with self._active_lock:
                    active = list(self._active)
                for resp in active:
                    stream = resp.extensions.get("network_stream")
                    sock = stream.get_extra_info("socket") if stream is not None else None
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                return

    def finish(self, resp: httpx.Response) -> None:
        """Close a response from :meth:`open_blob`."""
        with self._active_lock:
            self._active.discard(resp)
        resp.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise TransferCancelled()

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise TransferCancelled()

    def retrying(self, what: str, attempt: Callable[[], object]):
        """Call ``attempt`` until it does not raise a transient error, with backoff."""
        delay = self.options.backoff
        for n in range(self.options.retries + 1):
            self.check_cancel()
            try:
                return attempt()
            except _Retryable as exc:
                reason = str(exc)
            except httpx.TimeoutException as exc:
                reason = f"no data for {self.options.stall_timeout:g}s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.check_cancel()
            if n == self.options.retries:
                raise RegistryError(f"{what}: registry {self.registry} failed after {n + 1} attempts: {reason}")
            log.info("%s: %s; retrying in %.2fs", what, reason, delay)
            self._sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, self.options.backoff_max)

    def _scope_of(self, url: str, push: bool) -> str:
        m = re.search(r"/v2/(.+?)/(?:manifests|blobs)/", url)
        repo = m.group(1) if m else ""
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def _auth_headers(self, scope: str) -> dict[str, str]:
        with self._tokens_lock:
            token = self._tokens.get(scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _fetch_token(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryUnauthorized(
                f"registry {self.registry} requires '{scheme}' authentication, which mlxserve does not support"
            )
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        headers = {}
        if creds := self.options.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
        try:
            resp = self._http.get(realm + ("&" if "?" in realm else "?") + urlencode(query), headers=headers)
        except httpx.TransportError as exc:
            raise _Retryable(f"token endpoint {realm}: {type(exc).__name__}") from exc
        if resp.status_code >= 500:
            raise _Retryable(f"token endpoint {realm} answered {resp.status_code}")
        if resp.status_code != 200:
            raise RegistryUnauthorized(f"registry {self.registry}: token request refused ({resp.status_code})")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {self.registry}: token endpoint returned no token")
        with self._tokens_lock:
            self._tokens[scope] = token

    def _send(
        self,
        method: str,
        url: str,
        *,
        push: bool = False,
        stream: bool = False,
        headers: dict | None = None,
        content=None,
        ok: tuple[int, ...] = (200,),
        what: str = "",
    ) -> httpx.Response:
        """One request (no retry loop here), answering one bearer challenge. Raises
        ``_Retryable`` for 5xx/429, RemoteNotFound for 404, RegistryError for other surprises.
        With ``stream`` the caller must close the response."""
        scope = self._scope_of(url, push)
        for auth_round in (0, 1):
            req = self._http.build_request(
                method,
                url,
                headers={**(headers or {}), **self._auth_headers(scope)},
                content=content() if callable(content) else content,
            )
            resp = self._http.send(req, stream=stream)
            if resp.status_code == 401 and auth_round == 0 and "www-authenticate" in resp.headers:
                resp.close()
                self._fetch_token(resp.headers["www-authenticate"], scope)
                continue
            break
        if resp.status_code in ok:
            return resp
        try:
            if stream:
                resp.read()
        finally:
            resp.close()
        msg = _registry_message(resp)
        detail = f"{what}: registry {self.registry} answered {resp.status_code}" + (f" ({msg})" if msg else "")
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise _Retryable(detail)
        if resp.status_code == 404:
            raise RemoteNotFound(detail)
        if resp.status_code in (401, 403):
            raise RegistryUnauthorized(detail)
        raise RegistryError(detail)

    def url(self, repo: str, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{repo}/{kind}/{ref}"

    # ------------------------------------------------------------------ manifests

    def get_manifest(self, name: ModelName) -> tuple[bytes, str]:
        """(bytes, media type) of ``name``'s manifest; RemoteNotFound for an unknown tag."""
        repo = f"{name.namespace}/{name.name}"
        what = f"pull manifest of {name}"

        def attempt() -> tuple[bytes, str]:
            resp = self._send(
                "GET",
                self.url(repo, "manifests", name.tag),
                stream=True,
                headers={"Accept": MANIFEST_ACCEPT},
                what=what,
            )
            try:
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > MAX_MANIFEST_BYTES:
                        raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            finally:
                resp.close()
            ctype = resp.headers.get("content-type", "").split(";")[0].strip()
            sent = resp.headers.get("docker-content-digest", "")
            got = "sha256:" + hashlib.sha256(data).hexdigest()
            if sent.startswith("sha256:") and sent != got:
                raise RegistryDigestMismatch(
                    f"{what}: the manifest does not match its digest: expected {sent}, got {got}"
                )
            return bytes(data), ctype

        try:
            data, ctype = self.retrying(what, attempt)
        except RemoteNotFound:
            raise RemoteNotFound(
                f"model '{name}' not found in registry {self.registry} (no such repository or tag)"
            ) from None
        if ctype in (OCI_INDEX, DOCKER_LIST):
            raise RegistryError(
                f"{what}: the registry returned an image index (a multi-platform image), not a model manifest"
            )
        return data, ctype

    def put_manifest(self, name: ModelName, data: bytes, media_type: str) -> None:
        repo = f"{name.namespace}/{name.name}"
        self.retrying(
            f"push manifest of {name}",
            lambda: self._send(
                "PUT",
                self.url(repo, "manifests", name.tag),
                push=True,
                content=data,
                headers={"Content-Type": media_type},
                ok=(200, 201, 202),
                what=f"push manifest of {name}",
            ).close(),
        )

    # ------------------------------------------------------------------ blobs: reading

    def blob_size(self, repo: str, digest: str, *, push: bool = False) -> int | None:
        """The size of a blob the registry has, or None."""

        def attempt():
            try:
                resp = self._send("HEAD", self.url(repo, "blobs", digest), push=push, what=f"check blob {digest}")
            except RemoteNotFound:
                return None
            resp.close()
            return int(resp.headers.get("content-length", -1))

        return self.retrying(f"check blob {digest}", attempt)

    def open_blob(self, repo: str, digest: str, offset: int) -> tuple[httpx.Response, int]:
        """Start a GET of a blob from ``offset``; returns (streaming response, the offset the
        body really starts at: ``offset`` for a 206, 0 when the server ignored the Range).
        No retry here: the caller's loop retries with a new offset."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._send(
            "GET",
            self.url(repo, "blobs", digest),
            stream=True,
            headers=headers,
            ok=(200, 206),
            what=f"download blob {digest}",
        )
        with self._active_lock:
            self._active.add(resp)
        if resp.status_code == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("content-range", ""))
            start = int(m.group(1)) if m else -1
            if start != offset:
                self.finish(resp)
                raise _Retryable(
                    f"download blob {digest}: asked for bytes {offset}-, the "
                    f"registry sent {resp.headers.get('content-range')!r}"
                )
            return resp, offset
        return resp, 0

    def iter_body(self, resp: httpx.Response) -> Iterator[bytes]:
        """A response's bytes, counted, stopping soon after ``cancel`` is set."""
        for chunk in resp.iter_raw(READ_CHUNK):
            self.check_cancel()
            STATS.add(received=len(chunk))
            yield chunk

    # ------------------------------------------------------------------ blobs: writing

    def upload_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        open_blob: Callable[[], BinaryIO],
        on_bytes: Callable[[int], None] | None = None,
    ) -> bool:
        """Upload a blob unless the registry has it; returns False when it was skipped.

        Small blobs go in one PUT; larger ones as PATCH chunks of ``options.chunk_size``, each
        retried on its own after asking the registry how much it holds."""
        have = self.blob_size(repo, digest, push=True)
        if have == size:
            return False
        what = f"upload blob {digest}"

        def start() -> str:
            resp = self._send("POST", f"{self.base}/v2/{repo}/blobs/uploads/", push=True, ok=(202,), what=what)
            resp.close()
            return self._location(resp, what)

        if size <= self.options.chunk_size:
            self._upload_simple(what, start, open_blob, digest, size, on_bytes)
        else:
            self._upload_chunked(what, start, open_blob, digest, size, on_bytes)
        return True

    def _upload_simple(
        self,
        what: str,
        start: Callable[[], str],
        open_blob: Callable[[], BinaryIO],
        digest: str,
        size: int,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        report = on_bytes or (lambda n: None)
        sent = 0

        def attempt():
            nonlocal sent
            if sent:
                report(-sent)  # a retry sends everything again
                sent = 0
            location = start()
            with open_blob() as f:

                def body() -> Iterator[bytes]:
                    nonlocal sent
                    if sent:  # sent again after a bearer challenge
                        report(-sent)
                        sent = 0
                    f.seek(0)
                    while chunk := f.read(READ_CHUNK):
                        self.check_cancel()
                        STATS.add(sent=len(chunk))
                        sent += len(chunk)
                        report(len(chunk))
                        yield chunk

                self._send(
                    "PUT",
                    self._with_digest(location, digest),
                    push=True,
                    content=body,
                    ok=(201,),
                    what=what,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                ).close()

        self.retrying(what, attempt)

    def _upload_chunked(
        self,
        what: str,
        start: Callable[[], str],
        open_blob: Callable[[], BinaryIO],
        digest: str,
        size: int,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        report = on_bytes or (lambda n: None)
        st = {"location": self.retrying(what, start), "offset": 0, "unsure": False}
        with open_blob() as f:

            def step() -> None:
                if st["unsure"]:
                    # A PATCH failed midway: ask the registry how much of the upload it holds.
                    resp = self._send("GET", st["location"], push=True, ok=(204,), what=what)
                    resp.close()
                    m = re.fullmatch(r"0-(\d+)", resp.headers.get("range", "").strip())
                    held = int(m.group(1)) + 1 if m and int(m.group(1)) > 0 else 0
                    report(held - st["offset"])
                    st["offset"], st["location"] = held, self._location(resp, what)
                st["unsure"] = True
                offset = st["offset"]
                n = min(self.options.chunk_size, size - offset)
                f.seek(offset)
                data = f.read(n)
                if len(data) != n:
                    raise RegistryError(f"{what}: the local blob is shorter than {size} bytes")
                self.check_cancel()
                resp = self._send(
                    "PATCH",
                    st["location"],
                    push=True,
                    content=data,
                    ok=(202,),
                    what=what,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                        "Content-Length": str(n),
                    },
                )
                resp.close()
                STATS.add(sent=n)
                st["location"], st["offset"], st["unsure"] = (self._location(resp, what), offset + n, False)
                report(n)

            while st["offset"] < size:
                self.retrying(what, step)
        self.retrying(
            what,
            lambda: self._send(
                "PUT",
                self._with_digest(st["location"], digest),
                push=True,
                content=b"",
                ok=(201,),
                what=what,
                headers={"Content-Length": "0"},
            ).close(),
        )

    def _location(self, resp: httpx.Response, what: str) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{what}: registry {self.registry} sent no upload location")
        return str(resp.request.url.join(loc))

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        return location + ("&" if "?" in location else "?") + urlencode({"digest": digest})


def sha256_file_prefix(path, length: int) -> hashlib._Hash:
    """A sha256 object fed with the first ``length`` bytes of ``path`` (to resume hashing)."""
    h = hashlib.sha256()
    remaining = length
    with open(path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(READ_CHUNK * 4, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h
