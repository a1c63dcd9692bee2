"""``/api/pull``, ``/api/push`` and ``HEAD|POST /api/blobs/<digest>``.

A pull or push runs through the store service (on a worker thread: ``mlxserve.store.transfer``
is blocking) as a task of the runtime's nursery, so the HTTP handler only watches it. The client leaving (or the daemon
stopping) sets the job's ``threading.Event``: the transfer stops at its next chunk, and a pull
keeps its partial downloads for the next attempt.

Errors found before any blob moves (a bad name, an unknown tag, an unreachable registry) are
answered with their own HTTP status even when streaming; later ones end the stream with an
``{"error": ...}`` line, as Ollama does.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Awaitable, Callable

import outcome
import trio
from quart import Blueprint, Response, request

from ..actors.mailbox import post_nowait_or_drop
from ..actors.store_service import StoreService
from ..errors import MlxserveError
from ..store.transfer import TransferCancelled
from .common import field, json_body, json_response, ndjson, runtime, stream_response

log = logging.getLogger("mlxserve.http.blobs")

bp = Blueprint("blobs", __name__)

EVENT_BUFFER = 4096
_FIRST_STAGE = ("pulling manifest", "retrieving manifest")


class _Job:
    """One pull/push on a worker thread; progress events arrive on ``events``."""

    def __init__(self, fn: Callable[..., Awaitable[Any]], name: str, insecure: bool):
        self.cancel = threading.Event()
        self.done = trio.Event()
        self.result: outcome.Outcome | None = None
        self._send, self.events = trio.open_memory_channel(EVENT_BUFFER)
        self._fn, self._name, self._insecure = fn, name, insecure
        self._token = trio.lowlevel.current_trio_token()

    def _progress(self, event: dict) -> None:
        # Called on transfer threads; progress is advisory, so a full buffer drops the event.
        try:
            trio.from_thread.run_sync(post_nowait_or_drop, self._send, event, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

        async def cancel_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                self.cancel.set()  # the daemon is stopping: let the thread wind down

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_cancelled)
                self.result = await outcome.acapture(
                    self._fn, self._name, insecure=self._insecure, progress=self._progress, cancel=self.cancel
                )
                nursery.cancel_scope.cancel()
        finally:
            self._send.close()
            self.done.set()
        if isinstance(self.result, outcome.Error) and not isinstance(
            self.result.error, (MlxserveError, TransferCancelled)
        ):
            log.error("transfer of %s failed", self._name, exc_info=self.result.error)

    def error_message(self) -> str:
        assert isinstance(self.result, outcome.Error)
        exc = self.result.error
        return str(exc) if isinstance(exc, MlxserveError) else f"internal error: {exc.__class__.__name__}"

    def raise_error(self) -> None:
        assert isinstance(self.result, outcome.Error)
        exc = self.result.error
        if isinstance(exc, MlxserveError):
            raise exc
        raise MlxserveError(self.error_message())


async def _transfer(pick: Callable[[StoreService], Callable[..., Awaitable[Any]]]):
    body = await json_body()
    name = field(body, "model", str) or field(body, "name", str, required=True)
    insecure = field(body, "insecure", bool, default=False)
    stream = field(body, "stream", bool, default=True)
    rt = runtime()
    rt.store.parse(name)  # a bad name is a 400 before anything starts
    job = _Job(pick(rt.store), name, insecure)
    await rt.nursery.start(job.run)
    finished = False
    try:
        if not stream:
            await job.done.wait()
            finished = True
            if isinstance(job.result, outcome.Error):
                job.raise_error()
            return json_response({"status": "success"})
        # Hold the response until the manifest stage is over, so that an unknown tag or a
        # dead registry gets its own status code rather than a 200 with an error line.
        first: list[dict] = []
        async for event in job.events:
            first.append(event)
            if event.get("status") not in _FIRST_STAGE:
                break
        if (
            job.done.is_set()
            and isinstance(job.result, outcome.Error)
            and all(e.get("status") in _FIRST_STAGE for e in first)
        ):
            finished = True
            job.raise_error()
        finished = True
    finally:
        if not finished:  # the client left (this handler was cancelled)
            job.cancel.set()
            job.events.close()

    def cleanup() -> None:
        if not job.done.is_set():
            job.cancel.set()
        job.events.close()

    async def body_iter():
        try:
            for event in first:
                yield ndjson(event)
            async for event in job.events:
                yield ndjson(event)
            await job.done.wait()
            if isinstance(job.result, outcome.Error):
                yield ndjson({"error": job.error_message()})
        finally:
            cleanup()

    return stream_response(body_iter(), cleanup, "application/x-ndjson")


@bp.post("/api/pull")
async def pull():
    return await _transfer(lambda store: store.pull)


@bp.post("/api/push")
async def push():
    return await _transfer(lambda store: store.push)


@bp.route("/api/blobs/<digest>", methods=["HEAD"])
async def blob_exists(digest: str):
    # has_blob: 400 for a malformed digest
    return Response("", status=200 if runtime().store.has_blob(digest) else 404)


@bp.post("/api/blobs/<digest>")
async def blob_upload(digest: str):
    """Stream the body into the store; it is kept only if it hashes to ``digest``."""
    rt = runtime()
    if rt.store.has_blob(digest):  # 400 for a malformed digest
        return Response("", status=200)
    send, recv = trio.open_memory_channel(4)
    token = trio.lowlevel.current_trio_token()

    def chunks():
        # Runs on the store service's thread: one hop to trio per request-body chunk.
        while True:
            try:
                item = trio.from_thread.run(recv.receive, trio_token=token)
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return  # a short body simply fails the digest check
            yield item

    async def feed() -> None:
        async with send:
            try:
                async for data in request.body:
                    if data:
                        await send.send(data)
            except trio.BrokenResourceError:
                pass  # the store stopped reading (it failed); its error is the answer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            await rt.store.ingest_blob(digest, chunks())
        finally:
            recv.close()
    return Response("", status=201)
