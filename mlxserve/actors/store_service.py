"""The daemon's store service: every read and write of the model store the daemon makes.

Not an actor: there is no state here to serialize but a cache. The store (``mlxserve.store``)
is blocking file code whose own guards keep it consistent between threads and processes (the
CLI's offline commands write the same directory): every write is temp + fsync + atomic rename,
blob writers hold a shared flock that prune takes exclusively. On top of that this service
runs each call on a worker thread and keeps the daemon's manifest writes (create, copy, delete,
prune, blob upload) one at a time, so two requests never race on one name. Pulls and pushes run
beside them (they take minutes, and publish their manifest with one atomic rename).
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import attrs
import trio

from ..config import TransferOptions
from ..specs.modelfile import Modelfile
from ..store import transfer as xfer
from ..store.names import ModelName
from ..store.store import Progress, ResolvedModel, Store

T = TypeVar("T")
_RESOLVE_CACHE_MAX = 256


def _stat_key(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@attrs.define(eq=False)
class StoreService:
    store: Store  # the files themselves: tests read them; the daemon goes through the methods
    transfer_options: TransferOptions = TransferOptions()  # pulls and pushes (MLXSERVE_REGISTRY_*)
    _write_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    # name -> (its manifest's stat, the ResolvedModel read from it). Every generation request
    # resolves its model; answering a known, unchanged name here instead of on a worker thread
    # saves two GIL hand-offs, which under a busy engine thread cost several milliseconds each.
    # Any write clears it; a manifest replaced from outside changes its stat.
    _resolved: dict[str, tuple[tuple[int, ...], ResolvedModel]] = attrs.field(factory=dict, init=False)

    # ---- reads: concurrent, abandoned when the caller goes ----
    async def resolve(self, name: str) -> ResolvedModel:
        hit = self._resolved.get(name)
        if hit is not None and _stat_key(self.store.manifest_path(hit[1].name)) == hit[0]:
            return hit[1]
        return await self._read(self._resolve, name)

    async def list(self) -> list[ResolvedModel]:
        return await self._read(self.store.list)

    async def load_path(self, resolved: ResolvedModel) -> Path:
        """Verify the model's blobs and link its files: the path an engine loads."""
        return await self._read(self.store.load_path, resolved)

    def parse(self, name: str) -> ModelName:
        """A model name, or BadRequest (no I/O)."""
        return self.store.parse(name)

    def has_blob(self, digest: str) -> bool:
        """BadRequest for a malformed digest (one stat)."""
        return self.store.has_blob(digest)

    # ---- writes: one at a time, finished even when the caller goes ----
    async def delete(self, name: str) -> None:
        await self._write(self.store.delete, name)

    async def copy(self, src: str, dst: str) -> None:
        await self._write(self.store.copy, src, dst)

    async def create(
        self,
        name: str,
        modelfile: str | Modelfile,
        *,
        base_dir: Path,
        progress: Progress | None = None,
        quantize: str | None = None,
        files: dict[str, str] | None = None,
        on_validated: Callable[[], None] | None = None,
    ) -> ResolvedModel:
        """``modelfile``: its text or a parsed Modelfile; the rest as ``Store.create``."""
        return await self._write(
            functools.partial(
                self.store.create,
                name,
                modelfile,
                base_dir=base_dir,
                progress=progress,
                quantize=quantize,
                files=files,
                on_validated=on_validated,
            )
        )

    async def ingest_blob(self, digest: str, chunks: Iterable[bytes]) -> None:
        await self._write(self.store.ingest_blob, digest, chunks)

    async def prune(self) -> int:
        return await self._write(self.store.prune)

    # ---- transfers: beside the writes above, cancelled through ``cancel`` ----
    async def pull(
        self, name: str, *, insecure: bool, progress: Progress, cancel: threading.Event
    ) -> xfer.TransferResult:
        return await self._transfer(xfer.pull, name, insecure, progress, cancel)

    async def push(
        self, name: str, *, insecure: bool, progress: Progress, cancel: threading.Event
    ) -> xfer.TransferResult:
        return await self._transfer(xfer.push, name, insecure, progress, cancel)

    async def _transfer(
        self,
        fn: Callable[..., xfer.TransferResult],
        name: str,
        insecure: bool,
        progress: Progress,
        cancel: threading.Event,
    ) -> xfer.TransferResult:
        try:
            return await trio.to_thread.run_sync(
                functools.partial(
                    fn,
                    self.store,
                    name,
                    insecure=insecure,
                    progress=progress,
                    cancel=cancel,
                    options=self.transfer_options,
                )
            )
        finally:
            self._resolved.clear()

    # ---- plumbing ----
    def _resolve(self, name: str) -> ResolvedModel:
        """resolve() on a worker thread, remembering the answer if the manifest held still."""
        try:
            path = self.store.manifest_path(self.store.parse(name))
        except Exception:
            return self.store.resolve(name)  # let resolve raise its own error
        before = _stat_key(path)
        resolved = self.store.resolve(name)
        if before is not None and _stat_key(path) == before:
            if len(self._resolved) >= _RESOLVE_CACHE_MAX:
                self._resolved.clear()
            self._resolved[name] = (before, resolved)
        return resolved

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._write_lock:
            try:
                # Not abandoned on cancel: a write that started finishes, so the store never
                # sees half an operation because a client went away.
                return await trio.to_thread.run_sync(functools.partial(fn, *args))
            finally:
                self._resolved.clear()
