"""The three ways to send (actors/mailbox.py): requests meet the inbox's capacity, facts that the
actor's state depends on (Release, RunnerExited) never find it full."""

from __future__ import annotations

import trio

from mlxserve.actors.mailbox import open_inbox, post_nowait_or_drop
from mlxserve.errors import ServerBusy


async def test_a_full_inbox_refuses_requests_but_takes_facts():
    inbox, receive = open_inbox(capacity=2)
    inbox.post("request 1")
    inbox.post("request 2")
    try:
        inbox.post("request 3")
    except ServerBusy:
        pass
    else:
        raise AssertionError("a full inbox took a request")
    assert inbox.deliver("release")  # must arrive: a full inbox still takes it
    got = [receive.receive_nowait() for _ in range(3)]
    assert got == ["request 1", "request 2", "release"]


async def test_deliver_to_a_stopped_actor_says_so():
    inbox, receive = open_inbox(capacity=2)
    receive.close()
    assert not inbox.deliver("release")


async def test_post_nowait_or_drop_drops_on_a_full_bounded_channel():
    send, receive = trio.open_memory_channel[str](1)
    assert post_nowait_or_drop(send, "a")
    assert not post_nowait_or_drop(send, "b")  # full: dropped, not raised
    receive.close()
    assert not post_nowait_or_drop(send, "c")  # closed: dropped, not raised
