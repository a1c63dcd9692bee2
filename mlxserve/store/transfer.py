"""Moving models between stores: pull and push over the OCI distribution API, and pack/unpack
to an OCI image layout tar for machines with no registry. All blocking; the HTTP layer runs
these on a worker thread and cancels them through a ``threading.Event``.

Pull, in order:

1. fetch the manifest (``pulling manifest``);
2. every blob the store lacks is downloaded into ``partial/sha256-<hex>.part``, hashed on the
   way; ``partial/sha256-<hex>.json`` records how many bytes are durably on disk, so a pull that
   failed, was cancelled or whose daemon died resumes with a Range request. Blobs the store has
   are reported complete at once and not fetched. A blob whose bytes do not hash to its digest
   loses its partial and fails the pull;
3. under the store's shared write lock (prune waits for it), verified partials are renamed into
   ``blobs/`` and the manifest is published last (``writing manifest``). If a blob that was
   present at step 2 was pruned meanwhile, it is fetched again.

A partial is owned by an exclusive ``flock`` on its ``.part`` file while a pull writes it, so two
pulls (threads or daemons) of one blob never write the same file. ``Store.prune`` never looks in
``partial/``: partials are only removed by a digest mismatch or by :func:`prune_partials`.

Ollama-format manifests (``application/vnd.ollama.image.*`` layers) are stored as they are, and
run from their GGUF layer. A GGUF whose tensors ``mx.load`` cannot read correctly (K-quants and
the like) is converted at pull time with ``Store.create`` (``FROM @sha256:...``) into an mlx-lm
directory model that keeps the pulled template/system/parameters; the model is then stored in
mlxserve's format under the pulled name (so a later pull fetches the GGUF again).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Callable, Iterator

import attrs

from ..errors import BadRequest, IntegrityError, MlxserveError, ModelNotFound
from . import fsutil, manifest as mt
from .names import ModelName
from .registry import (
    AnyEvent,
    RegistryClient,
    RegistryDigestMismatch,
    RegistryError,
    TransferCancelled,
    TransferOptions,
    _Retryable,
    sha256_file_prefix,
)
from .store import Store

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
SYNC_EVERY = 8 << 20  # bytes between fsyncs of a partial and its record
THROTTLE_S = 0.1  # at most one progress event per layer this often
PARTIAL_GRACE_S = 7 * 24 * 3600
OCI_LAYOUT = "oci-layout"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
_ROUNDS = 3


@attrs.frozen
class TransferResult:
    name: str
    digest: str  # of the manifest
    bytes_transferred: int  # blob bytes that crossed the network in this call
    blobs_transferred: int
    converted: bool = False


class _Emitter:
    """Progress events, thread-safe, with per-layer throttling."""

    def __init__(self, progress: Progress | None, verb: str):
        self._progress = progress
        self._verb = verb
        self._lock = threading.RLock()
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, event: dict) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(event)

    def status(self, text: str) -> None:
        self({"status": text})

    def layer(self, digest: str, total: int, completed: int, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            last_t, last_n = self._last.get(digest, (0.0, -1))
            # Throttled: an event per THROTTLE_S, or per percent of the layer, whichever first.
            if completed == last_n or (
                not force and completed < total and now - last_t < THROTTLE_S and completed - last_n < total / 100
            ):
                return
            self._last[digest] = (now, completed)
            self(
                {
                    "status": f"{self._verb} {digest.split(':')[1][:12]}",
                    "digest": digest,
                    "total": total,
                    "completed": completed,
                }
            )


def _unique(doc: dict) -> list[dict]:
    seen: dict[str, dict] = {}
    for d in [doc["config"], *doc["layers"]]:
        seen.setdefault(d["digest"], d)
    return list(seen.values())


def _repo(mn: ModelName) -> str:
    return f"{mn.namespace}/{mn.name}"


def _have(store: Store, desc: dict) -> bool:
    try:
        return store.blob_path(desc["digest"]).stat().st_size == desc["size"]
    except FileNotFoundError:
        return False


def _run_parallel(
    items: list, fn: Callable, parallel: int, abort: threading.Event, discard: Callable = lambda result: None
) -> list:
    """``fn(item)`` for each item on up to ``parallel`` threads; the first failure sets
    ``abort`` (so the others stop at their next chunk) and is raised once all have stopped,
    after ``discard`` was called on the results of those that succeeded."""
    if not items:
        return []
    workers = max(1, min(parallel, len(items)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlxserve-transfer") as pool:
        futures = [pool.submit(fn, i) for i in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            abort.set()
        wait(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                discard(f.result())
        # The root cause, not the TransferCancelled of the ones stopped because of it.
        real = [e for e in errors if not isinstance(e, TransferCancelled)]
        raise (real or errors)[0]
    return [f.result() for f in futures]


# ---------------------------------------------------------------------- partial downloads


def partial_paths(store: Store, digest: str) -> tuple[Path, Path]:
    stem = digest.replace(":", "-")
    return store.partial_dir / f"{stem}.part", store.partial_dir / f"{stem}.json"


def _read_record(rec: Path, digest: str, size: int) -> int:
    try:
        r = json.loads(rec.read_bytes())
        if r.get("digest") == digest and r.get("size") == size:
            return max(0, min(int(r.get("completed", 0)), size))
    except (OSError, ValueError, TypeError):
        pass
    return 0


def _write_record(store: Store, rec: Path, digest: str, size: int, completed: int) -> None:
    data = json.dumps({"digest": digest, "size": size, "completed": completed, "updated": time.time()}).encode()
    # Temp files in partial/, not tmp/: prune empties tmp/ and does not hold off for pulls.
    fsutil.atomic_write(rec, data, store.partial_dir)


def _lock_partial(part: Path, cancel: AnyEvent) -> int:
    """An fd of the partial under an exclusive flock (waiting while another pull owns it)."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if cancel.wait(0.2):  # another pull is writing this blob; it may finish it for us
                raise TransferCancelled()
    except BaseException:
        os.close(fd)
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@attrs.define
class _Fetched:
    """A verified, complete partial, still locked (the fd) until it is published."""

    desc: dict
    part: Path
    fd: int
    received: int  # bytes this pull fetched over the network for it

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _download(store: Store, client: RegistryClient, repo: str, desc: dict, emit: _Emitter) -> _Fetched | None:
    """Fetch one blob into its partial (resuming), verified; returns it still locked, or None
    when the blob turned up in the store meanwhile."""
    digest, size = desc["digest"], desc["size"]
    part, rec = partial_paths(store, digest)
    fd = _lock_partial(part, client.cancel)
    try:
        if _have(store, desc):
            if _same_file(fd, part):  # the path is ours (locked): nobody else is using it
                _discard(part, rec)
            emit.layer(digest, size, size, force=True)
            os.close(fd)
            return None
        # Trust only what the record says was fsynced; anything after it may be garbage.
        offset = min(_read_record(rec, digest, size), os.fstat(fd).st_size)
        os.ftruncate(fd, offset)
        h = sha256_file_prefix(part, offset) if offset else hashlib.sha256()
        synced = offset
        received = 0
        emit.layer(digest, size, offset, force=True)

        def sync(f) -> None:
            nonlocal synced
            if offset != synced:
                f.flush()
                os.fsync(f.fileno())
                _write_record(store, rec, digest, size, offset)
                synced = offset

        def attempt(f) -> None:
            nonlocal offset, h, synced, received
            resp, start = client.open_blob(repo, digest, offset)
            try:
                if start != offset:  # the registry ignored Range: start over
                    f.seek(0)
                    f.truncate()
                    offset, h = 0, hashlib.sha256()
                    _write_record(store, rec, digest, size, 0)
                    synced = 0
                for chunk in client.iter_body(resp):
                    if offset + len(chunk) > size:
                        raise RegistryDigestMismatch(
                            f"blob {digest} from registry {client.registry} is larger than the "
                            f"{size} bytes its manifest says (the partial download was deleted)"
                        )
                    f.write(chunk)
                    h.update(chunk)
                    offset += len(chunk)
                    received += len(chunk)
                    if offset - synced >= SYNC_EVERY:
                        sync(f)
                    emit.layer(digest, size, offset)
                if offset < size:
                    raise _Retryable(f"download blob {digest}: connection closed at byte {offset} of {size}")
            finally:
                client.finish(resp)

        try:
            with os.fdopen(os.dup(fd), "r+b") as f:
                f.seek(offset)
                try:
                    if offset < size:
                        client.retrying(f"download blob {digest}", lambda: attempt(f))
                finally:
                    sync(f)  # a failed or cancelled pull resumes from here
        except RegistryDigestMismatch:
            _discard(part, rec)
            raise
        emit.layer(digest, size, offset, force=True)
        got = "sha256:" + h.hexdigest()
        if got != digest:
            _discard(part, rec)
            raise RegistryDigestMismatch(
                f"blob from registry {client.registry} does not match its digest: expected "
                f"{digest}, got {got} (the partial download was deleted)",
                expected=digest,
                actual=got,
            )
        return _Fetched(desc, part, fd, received)
    except BaseException:
        os.close(fd)
        raise


def _discard(part: Path, rec: Path) -> None:
    part.unlink(missing_ok=True)
    rec.unlink(missing_ok=True)


def prune_partials(store: Store, grace_s: float = PARTIAL_GRACE_S) -> int:
    """Delete partial downloads untouched for ``grace_s`` that no pull owns; returns how many."""
    removed = 0
    now = time.time()
    for part in store.partial_dir.glob("*.part"):
        rec = part.with_suffix(".json")
        try:
            newest = max(p.stat().st_mtime for p in (part, rec) if p.exists())
        except (ValueError, FileNotFoundError):
            continue
        if now - newest < grace_s:
            continue
        fd = os.open(part, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a pull owns it
        try:
            _discard(part, rec)
            removed += 1
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------- pull


def _remote_manifest(data: bytes, mn: ModelName, registry: str) -> dict:
    try:
        doc = mt.parse_manifest(data, str(mn))
    except IntegrityError as exc:
        raise RegistryError(f"registry {registry} sent an unusable manifest: {exc}") from None
    for d in doc["layers"]:  # refuse early what the store could not lay out
        if d["mediaType"] in mt.DIRECTORY_TYPES or d["mediaType"] in mt.ADAPTER_TYPES:
            title = mt.layer_title(d)
            if title is not None:
                try:
                    mt.safe_title(title)
                except IntegrityError as exc:
                    raise RegistryError(f"manifest of {mn}: {exc}") from None
    return doc


def pull(
    store: Store,
    name: str,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    options: TransferOptions | None = None,
    transport=None,
) -> TransferResult:
    """Pull ``name`` from its registry into ``store``. Raises InvalidName, RemoteNotFound,
    RegistryError (and subclasses), TransferCancelled."""
    mn = store.parse(name)
    emit = _Emitter(progress, "pulling")
    abort = threading.Event()
    stop = AnyEvent(*(e for e in (cancel, abort) if e is not None))
    opts = options or TransferOptions()
    fetched = received = 0
    converted = False
    refused: BadRequest | None = None
    prune_partials(store)
    old_path = store.manifest_path(mn)
    old = old_path.read_bytes() if old_path.is_file() else None
    with RegistryClient(mn.registry, insecure=insecure, options=opts, cancel=stop, transport=transport) as client:
        emit.status("pulling manifest")
        data, _ctype = client.get_manifest(mn)
        doc = _remote_manifest(data, mn, mn.registry)
        descs = _unique(doc)
        repo = _repo(mn)
        for _round in range(_ROUNDS):
            missing = [d for d in descs if not _have(store, d)]
            for d in descs:
                if d not in missing:
                    emit.layer(d["digest"], d["size"], d["size"], force=True)
            got: list[_Fetched | None] = _run_parallel(
                missing,
                lambda d: _download(store, client, repo, d, emit),
                opts.parallel,
                abort,
                discard=lambda r: r.close() if r is not None else None,
            )
            try:
                client.check_cancel()
                fetched += sum(1 for g in got if g is not None)
                received += sum(g.received for g in got if g is not None)
                emit.status("verifying sha256 digest")
                with store.writing():
                    for g in got:
                        if g is not None and not _have(store, g.desc):
                            # Still under the partial's flock: nobody else touches the file.
                            fsutil.publish(g.part, store.blob_path(g.desc["digest"]))
                        if g is not None:
                            partial_paths(store, g.desc["digest"])[1].unlink(missing_ok=True)
                    if not all(_have(store, d) for d in descs):
                        continue  # pruned while we fetched the rest: fetch it again
                    if (refused := _unrunnable(store, doc, mn)) is not None:
                        break  # no manifest; its blobs are pruned below, outside this lock
                    if _needs_conversion(store, doc):
                        # The GGUF must outlive this lock until create names it: an upload
                        # marker gives it prune's grace period.
                        gguf = _gguf_layer(doc)
                        (store.uploads_dir / gguf["digest"].replace(":", "-")).touch()
                        converted = True
                    else:
                        emit.status("writing manifest")
                        store.write_manifest(name, data)
            finally:
                for g in got:
                    if g is not None:
                        g.close()
            break
        else:
            raise RegistryError(
                f"pull {mn}: blobs kept disappearing from the store while "
                f"pulling ({_ROUNDS} rounds); is something pruning it?"
            )
    if refused is not None:
        store.prune()  # as a refused create, the store is left as it was (bar partials)
        raise refused
    # Outside the write lock: create may prune, and prune takes the lock exclusively.
    if converted:
        _convert(store, name, doc, emit)
    elif old is not None and old != data:
        store.prune()  # the replaced manifest may have been the last user of some blobs
    emit.status("success")
    resolved = store.resolve(name)
    return TransferResult(str(mn), resolved.digest, received, fetched, converted)


def _unrunnable(store: Store, doc: dict, mn: ModelName) -> BadRequest | None:
    """Why the engine could not load a pulled Ollama-format model (create's check: an
    unsupported architecture, missing metadata or tensors), so that it is refused now rather
    than stored to fail its first request."""
    gguf = _gguf_layer(doc)
    if doc["config"]["mediaType"] == mt.SPEC_MEDIA_TYPE or gguf is None:
        return None  # mlxserve's own format was checked when it was created
    from .ggufmeta import read_header
    from .importers import check_gguf_runnable

    path = store.blob_path(gguf["digest"])
    try:
        check_gguf_runnable(path, read_header(path))
    except BadRequest as exc:
        return BadRequest(f"pull {mn}: {str(exc).removeprefix(f'{path.name}: ')}; nothing was stored")
    return None


def _gguf_layer(doc: dict) -> dict | None:
    ggufs = [d for d in doc["layers"] if d["mediaType"] in mt.GGUF_TYPES]
    return ggufs[0] if len(ggufs) == 1 else None


def _needs_conversion(store: Store, doc: dict) -> bool:
    """An Ollama-format model whose GGUF mx.load cannot read correctly (see the module doc)."""
    if doc["config"]["mediaType"] == mt.SPEC_MEDIA_TYPE:
        return False
    gguf = _gguf_layer(doc)
    if gguf is None:
        return False
    from .ggufmeta import read_header

    try:
        header = read_header(store.blob_path(gguf["digest"]))
    except MlxserveError:
        return False  # not a GGUF we can read; loading it will say why
    from . import convert  # imports mlx: only when needed

    try:
        return convert.needs_conversion(header)
    except BadRequest:
        return False


def _convert(store: Store, name: str, doc: dict, emit: _Emitter) -> None:
    from ..specs.modelfile import render_modelfile
    from .ollama_compat import spec_from_ollama

    gguf = _gguf_layer(doc)
    assert gguf is not None
    try:
        config = json.loads(store.blob_path(doc["config"]["digest"]).read_bytes())
    except ValueError:
        config = {}
    spec = spec_from_ollama(
        config if isinstance(config, dict) else {}, doc["layers"], lambda d: store.blob_path(d["digest"]).read_bytes()
    )
    modelfile = render_modelfile(f"@{gguf['digest']}", spec)
    emit.status("converting model (its GGUF tensor types need conversion for MLX)")

    def forward(event: dict) -> None:
        if event.get("status") != "success":
            emit(event)

    store.create(name, modelfile, base_dir=store.root, progress=forward)


# ---------------------------------------------------------------------- push


def push(
    store: Store,
    name: str,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    options: TransferOptions | None = None,
    transport=None,
) -> TransferResult:
    """Push ``name`` to the registry its name points at; blobs the registry has are skipped."""
    mn = store.parse(name)
    emit = _Emitter(progress, "pushing")
    abort = threading.Event()
    stop = AnyEvent(*(e for e in (cancel, abort) if e is not None))
    opts = options or TransferOptions()
    emit.status("retrieving manifest")
    try:
        data = store.manifest_path(mn).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFound(name) from None
    doc = mt.parse_manifest(data, str(mn))
    descs = _unique(doc)
    for d in descs:
        if not _have(store, d):
            raise IntegrityError(
                f"blob {d['digest']} of '{name}' is missing or truncated; re-create or re-pull it before pushing"
            )
    sent_total = 0
    sent_lock = threading.Lock()
    with RegistryClient(mn.registry, insecure=insecure, options=opts, cancel=stop, transport=transport) as client:
        repo = _repo(mn)

        def upload(d: dict) -> bool:
            digest, size = d["digest"], d["size"]
            done = 0

            def on_bytes(n: int) -> None:
                nonlocal done, sent_total
                done += n
                with sent_lock:
                    sent_total += n
                emit.layer(digest, size, done)

            emit.layer(digest, size, 0, force=True)
            sent = client.upload_blob(repo, digest, size, lambda: open(store.blob_path(digest), "rb"), on_bytes)
            emit.layer(digest, size, size, force=True)
            return sent

        sent = _run_parallel(descs, upload, opts.parallel, abort)
        emit.status("pushing manifest")
        client.put_manifest(mn, data, doc.get("mediaType") or mt.MANIFEST_MEDIA_TYPE)
    emit.status("success")
    return TransferResult(str(mn), fsutil.sha256_bytes(data), sent_total, sum(sent))


# ---------------------------------------------------------------------- pack / unpack


class _HashingReader(io.RawIOBase):
    def __init__(self, f: IO[bytes]):
        self._f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def pack(store: Store, name: str, out: Path, progress: Progress | None = None) -> dict:
    """Write ``name`` as an OCI image layout tar at ``out`` (atomically); every blob is
    re-hashed on the way, so a damaged store never produces a plausible archive."""
    emit = _Emitter(progress, "packing")
    mn = store.parse(name)
    try:
        data = store.manifest_path(mn).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFound(name) from None
    doc = mt.parse_manifest(data, str(mn))
    mdigest = fsutil.sha256_bytes(data)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": doc.get("mediaType") or mt.MANIFEST_MEDIA_TYPE,
                "digest": mdigest,
                "size": len(data),
                "annotations": {REF_NAME: str(mn)},
            }
        ],
    }
    out = Path(out).expanduser()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    now = time.time()
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _tar_bytes(tar, OCI_LAYOUT, b'{"imageLayoutVersion":"1.0.0"}', now)
                _tar_bytes(tar, "index.json", json.dumps(index, indent=2).encode(), now)
                for d in ("blobs", "blobs/sha256"):
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(now)
                    tar.addfile(info)
                _tar_bytes(tar, f"blobs/sha256/{mdigest.split(':')[1]}", data, now)
                for d in _unique(doc):
                    digest, size = d["digest"], d["size"]
                    path = store.blob_path(digest)
                    if not _have(store, d):
                        raise IntegrityError(f"blob {digest} of '{name}' is missing or truncated")
                    emit.layer(digest, size, 0, force=True)
                    info = tarfile.TarInfo(f"blobs/sha256/{digest.split(':')[1]}")
                    info.size, info.mode, info.mtime = size, 0o644, int(path.stat().st_mtime)
                    with open(path, "rb") as f:
                        reader = _HashingReader(f)
                        tar.addfile(info, reader)
                    got = "sha256:" + reader.hash.hexdigest()
                    if got != digest:
                        raise IntegrityError(
                            f"blob {digest} of '{name}' is damaged (its bytes hash to {got}); not packing it"
                        )
                    emit.layer(digest, size, size, force=True)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    emit.status("success")
    return {"name": str(mn), "digest": mdigest, "size": out.stat().st_size}


def _member(tar: tarfile.TarFile, members: dict, path: str) -> tarfile.TarInfo:
    m = members.get(path)
    if m is None:
        raise BadRequest(f"archive has no {path}")
    if not m.isfile():
        raise BadRequest(f"archive entry {path} is not a regular file")
    return m


def _member_bytes(tar: tarfile.TarFile, members: dict, path: str, limit: int = 4 << 20) -> bytes:
    m = _member(tar, members, path)
    if m.size > limit:
        raise BadRequest(f"archive entry {path} is too large ({m.size} bytes)")
    f = tar.extractfile(m)
    assert f is not None
    return f.read()


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(fsutil.CHUNK):
        yield chunk


def unpack(store: Store, archive: Path, name: str | None = None, progress: Progress | None = None) -> str:
    """Import the model in an OCI image layout tar (as ``pack`` writes) into ``store``; every
    blob is verified against its digest before it is kept. Returns the model's name."""
    emit = _Emitter(progress, "unpacking")
    try:
        tar = tarfile.open(Path(archive).expanduser(), mode="r:*")
    except (OSError, tarfile.TarError) as exc:
        raise BadRequest(f"cannot read {archive}: {exc}") from None
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        try:
            layout = json.loads(_member_bytes(tar, members, OCI_LAYOUT))
            index = json.loads(_member_bytes(tar, members, "index.json"))
        except ValueError as exc:
            raise BadRequest(f"{archive}: not an OCI image layout ({exc})") from None
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise BadRequest(f"{archive}: unsupported OCI layout version")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(entries, list) or not entries:
            raise BadRequest(f"{archive}: index.json lists no manifest")
        entry = _pick(entries, store, name, archive)
        ref = (entry.get("annotations") or {}).get(REF_NAME)
        target = name or ref
        if not target:
            raise BadRequest(f"{archive} does not name its model; give a NAME")
        mn = store.parse(target)
        mdigest = entry.get("digest")
        if not isinstance(mdigest, str) or not fsutil.DIGEST_RE.fullmatch(mdigest):
            raise BadRequest(f"{archive}: index.json has a bad manifest digest")
        data = _member_bytes(tar, members, f"blobs/sha256/{mdigest.split(':')[1]}")
        if fsutil.sha256_bytes(data) != mdigest:
            raise IntegrityError(f"{archive}: the manifest does not match its digest {mdigest}")
        doc = mt.parse_manifest(data, str(mn))
        for d in _unique(doc):
            digest, size = d["digest"], d["size"]
            if _have(store, d):
                emit.layer(digest, size, size, force=True)
                continue
            m = _member(tar, members, f"blobs/sha256/{digest.split(':')[1]}")
            if m.size != size:
                raise IntegrityError(f"{archive}: blob {digest} has {m.size} bytes, the manifest says {size}")
            emit.layer(digest, size, 0, force=True)
            f = tar.extractfile(m)
            assert f is not None
            store.ingest_blob(digest, _chunks(f))  # raises DigestMismatch; keeps nothing then
            emit.layer(digest, size, size, force=True)
        emit.status("writing manifest")
        store.write_manifest(str(mn), data)
    emit.status("success")
    return mn.display(store.default_registry)


def _pick(entries: list, store: Store, name: str | None, archive: Path) -> dict:
    entries = [e for e in entries if isinstance(e, dict)]
    if len(entries) == 1:
        return entries[0]
    if name is not None:
        want = store.parse(name)
        for e in entries:
            ref = (e.get("annotations") or {}).get(REF_NAME)
            try:
                if ref and store.parse(ref) == want:
                    return e
            except BadRequest:
                continue
    refs = [(e.get("annotations") or {}).get(REF_NAME) for e in entries]
    raise BadRequest(f"{archive} holds {len(entries)} models ({', '.join(map(str, refs))}); name the one to import")
