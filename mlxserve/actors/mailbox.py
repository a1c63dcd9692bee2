"""Request/reply plumbing shared by every actor handle.

Three ways to send, by what losing the message would cost:

- ``post``: a request a caller waits on; a full inbox is back-pressure (``ServerBusy``, 503).
- ``post_nowait_or_drop``: advice nobody waits on (a cancel, a wake-up, a metric); a full or
  closed inbox drops it and says so.
- ``deliver``: a fact the actor's state depends on (``Release``, ``RunnerExited``); it goes to
  an inbox opened with ``open_inbox``, whose channel is unbounded, so it never finds it full
  (``post`` still enforces the inbox's capacity on requests).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Generic, TypeVar

import attrs
import outcome
import trio

from ..errors import ServerBusy, ShuttingDown

T = TypeVar("T")
M = TypeVar("M")


@attrs.define(eq=False)
class Reply(Generic[T]):
    """A one-shot reply slot: the actor sets it without awaiting, the caller waits on it."""

    _event: trio.Event = attrs.Factory(trio.Event)
    _result: outcome.Outcome[T] | None = None

    def send(self, value: T) -> None:
        if not self._event.is_set():
            self._result = outcome.Value(value)
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._result = outcome.Error(error)
            self._event.set()

    def value_nowait(self) -> T | None:
        """The answer if it has been set (raises what it failed with); None before."""
        return self._result.unwrap() if self._result is not None else None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> T:
        await self._event.wait()
        assert self._result is not None
        return self._result.unwrap()


@attrs.define(eq=False)
class Inbox(Generic[M]):
    """The sending side of an actor's inbox: unbounded underneath, ``capacity`` for requests."""

    _send: trio.MemorySendChannel[M]
    capacity: int

    def post(self, message: M) -> None:
        if self._send.statistics().current_buffer_used >= self.capacity:
            raise ServerBusy("server busy: too many requests waiting")
        post(self._send, message)

    def post_nowait_or_drop(self, message: M) -> bool:
        return post_nowait_or_drop(self._send, message)

    def deliver(self, message: M) -> bool:
        """Never dropped for want of room; False only when the actor has stopped (its state
        is gone with it)."""
        try:
            self._send.send_nowait(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        self._send.close()


def open_inbox(capacity: int) -> tuple[Inbox[Any], trio.MemoryReceiveChannel[Any]]:
    send, receive = trio.open_memory_channel[Any](math.inf)
    return Inbox(send, capacity), receive


def post(inbox: trio.MemorySendChannel[Any], message: Any) -> None:
    """Send without waiting: a full inbox is back-pressure the caller turns into 503."""
    try:
        inbox.send_nowait(message)
    except trio.WouldBlock:
        raise ServerBusy("server busy: too many requests waiting") from None
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise ShuttingDown() from None


def post_nowait_or_drop(inbox: trio.MemorySendChannel[Any], message: Any) -> bool:
    """Send advice nobody waits on; a full or closed inbox drops it. True if it was sent."""
    try:
        inbox.send_nowait(message)
    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        return False
    return True


async def ask(inbox: trio.MemorySendChannel[Any] | Inbox[Any], make: Callable[[Reply[T]], Any]) -> T:
    """Build a message with a fresh reply slot, post it, and wait for the answer."""
    reply: Reply[T] = Reply()
    if isinstance(inbox, Inbox):
        inbox.post(make(reply))
    else:
        post(inbox, make(reply))
    return await reply.wait()


def fail_pending(inbox: trio.MemoryReceiveChannel[Any]) -> None:
    """An actor that stops answers what is still in its inbox, so no caller waits forever."""
    while True:
        try:
            msg = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        reply = getattr(msg, "reply", None)
        if isinstance(reply, Reply):
            reply.fail(ShuttingDown())
