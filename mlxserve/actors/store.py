"""The Store actor: the only writer of the model store.

The store itself (``mlxserve.store``) is blocking file code; this actor runs each call on a
worker thread. Reads run concurrently; writes (create, copy, delete, prune, blob ingest) are
serialized here so manifests are never written by two requests at once.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import attrs
import trio

from ..store.store import Store
from .mailbox import Reply, fail_pending, post

_WRITES = {"create", "copy", "delete", "prune", "ingest_blob"}


@attrs.frozen
class Call:
    method: str
    args: tuple
    kwargs: dict
    reply: Reply


@attrs.define(eq=False)
class StoreHandle:
    _inbox: trio.MemorySendChannel
    store: Store  # read-only uses (paths) only; mutations go through the actor

    async def call(self, method: str, *args, **kwargs) -> Any:
        reply = Reply()
        post(self._inbox, Call(method, args, kwargs, reply))
        return await reply.wait()

    async def resolve(self, name: str):
        return await self.call("resolve", name)

    async def list(self):
        return await self.call("list")

    async def delete(self, name: str) -> None:
        await self.call("delete", name)

    async def copy(self, src: str, dst: str) -> None:
        await self.call("copy", src, dst)

    async def create(self, name: str, modelfile, *, base_dir, progress: Callable | None = None,
                     quantize: str | None = None, files: dict | None = None,
                     on_validated: Callable[[], None] | None = None):
        """``modelfile``: its text or a parsed Modelfile; the rest as ``Store.create``."""
        return await self.call("create", name, modelfile, base_dir=base_dir, progress=progress,
                               quantize=quantize, files=files, on_validated=on_validated)

    async def verify_for_load(self, resolved) -> None:
        await self.call("verify_for_load", resolved)

    async def model_path(self, resolved):
        return await self.call("model_path", resolved)


_RESOLVE_CACHE_MAX = 256


def _stat_key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@attrs.define(eq=False)
class StoreActor:
    store: Store
    _write_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    # name -> (its manifest's stat, the ResolvedModel read from it). Every generation request
    # resolves its model; answering a known, unchanged name here instead of on a worker thread
    # saves two GIL hand-offs, which under a busy engine thread cost several milliseconds each
    # (the chaos harness measured 503s under queue overflow at half the latency with this).
    # Any write clears it; a manifest replaced from outside changes its stat.
    _resolved: dict[str, tuple[tuple, Any]] = attrs.field(factory=dict, init=False)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        send, inbox = trio.open_memory_channel(256)
        async with trio.open_nursery() as nursery:
            task_status.started(StoreHandle(send, self.store))
            async with inbox:
                try:
                    async for msg in inbox:
                        if msg.method == "resolve" and self._answer_from_cache(msg):
                            continue
                        nursery.start_soon(self._serve, msg)
                finally:
                    fail_pending(inbox)

    def _answer_from_cache(self, msg: Call) -> bool:
        hit = self._resolved.get(msg.args[0]) if len(msg.args) == 1 and not msg.kwargs else None
        if hit is None:
            return False
        key, resolved = hit
        if _stat_key(self.store.manifest_path(resolved.name)) != key:
            return False
        msg.reply.send(resolved)
        return True

    def _resolve(self, name: str):
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

    async def _serve(self, msg: Call) -> None:
        if msg.method == "resolve" and len(msg.args) == 1 and not msg.kwargs:
            fn = functools.partial(self._resolve, msg.args[0])
        else:
            fn = functools.partial(getattr(self.store, msg.method), *msg.args, **msg.kwargs)
        try:
            if msg.method in _WRITES:
                async with self._write_lock:
                    # abandon_on_cancel=False: a write that started finishes, so the store
                    # never sees half an operation because a client went away.
                    try:
                        result = await trio.to_thread.run_sync(fn)
                    finally:
                        self._resolved.clear()
            else:
                result = await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except Exception as exc:
            msg.reply.fail(exc)
        else:
            msg.reply.send(result)
