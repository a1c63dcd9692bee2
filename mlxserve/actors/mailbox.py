"""Request/reply plumbing shared by every actor handle."""

from __future__ import annotations

from typing import Any

import attrs
import outcome
import trio

from ..errors import ServerBusy, ShuttingDown


@attrs.define(eq=False)
class Reply:
    """A one-shot reply slot: the actor sets it without awaiting, the caller waits on it."""

    _event: trio.Event = attrs.Factory(trio.Event)
    _result: outcome.Outcome | None = None

    def send(self, value: Any) -> None:
        if not self._event.is_set():
            self._result = outcome.Value(value)
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._result = outcome.Error(error)
            self._event.set()

    def value_nowait(self) -> Any:
        """The answer if it has been set (raises what it failed with); None before."""
        return self._result.unwrap() if self._result is not None else None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> Any:
        await self._event.wait()
        assert self._result is not None
        return self._result.unwrap()


def post(inbox: trio.MemorySendChannel, message: Any) -> None:
    """Send without waiting: a full inbox is back-pressure the caller turns into 503."""
    try:
        inbox.send_nowait(message)
    except trio.WouldBlock:
        raise ServerBusy("server busy: too many requests waiting") from None
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise ShuttingDown() from None


async def ask(inbox: trio.MemorySendChannel, make: Any) -> Any:
    """Build a message with a fresh reply slot, post it, and wait for the answer."""
    reply = Reply()
    post(inbox, make(reply))
    return await reply.wait()


def fail_pending(inbox: trio.MemoryReceiveChannel) -> None:
    """An actor that stops answers what is still in its inbox, so no caller waits forever."""
    while True:
        try:
            msg = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        reply = getattr(msg, "reply", None)
        if isinstance(reply, Reply):
            reply.fail(ShuttingDown())
