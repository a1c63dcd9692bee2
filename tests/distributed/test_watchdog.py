"""Rank 0's watchdog over real control connections (socket pairs), without starting ranks.

The follower's side of each connection is driven by the test: what a diverging, crashing or
silent rank would send. ``FakeMxGroup`` stands in for the MLX group object only (its size);
it is fault injection, not a model of MLX.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from mlxserve.engine import distributed as dist, loop as eng


class FakeMxGroup:
    """Fault injection: the group's size, for a Group whose ranks are socket pairs."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def _send(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


@pytest.fixture
def watched(tmp_path):
    """A Group of rank 0 and one follower end, its watchdog running, a leader holding it."""
    ours, theirs = socket.socketpair()
    group = dist.Group(FakeMxGroup(2), "test", "auto", 1.0, tmp_path, {})
    group.peers[1] = dist._Peer(1, ours, time.monotonic())
    leader = dist._Leader(group)
    events: list = []
    stopped = threading.Event()

    def deliver(evs: list) -> None:
        events.extend(evs)
        if any(isinstance(e, eng.Stopped) for e in evs):
            stopped.set()

    leader.raw_deliver = deliver
    group.acquire(leader)
    watchdog = threading.Thread(target=group.watch, daemon=True)
    watchdog.start()
    yield group, theirs, events, stopped
    theirs.close()
    group.fail("test over")
    watchdog.join(timeout=5)


def test_matching_checksums_keep_the_group_up(watched):
    group, follower, events, stopped = watched
    for step in range(1, 50):
        group.record(0, step, step * 7)
        _send(follower, {"t": "ack", "n": step, "x": step * 7, "e": group.epoch})
    _send(follower, {"t": "beat"})
    assert not stopped.wait(0.6)
    assert group.describe()["state"] == "up" and group.sums == {}


@pytest.mark.parametrize("follower_first", [True, False])
def test_a_diverging_rank_fails_the_group_whichever_reports_first(watched, follower_first):
    group, follower, events, stopped = watched
    if follower_first:
        _send(follower, {"t": "ack", "n": 3, "x": 222, "e": group.epoch})
        time.sleep(0.3)  # let the watchdog file the follower's checksum before rank 0's
    group.record(0, 3, 111)
    if not follower_first:
        _send(follower, {"t": "ack", "n": 3, "x": 222, "e": group.epoch})
    assert stopped.wait(5)
    assert "rank 1 generated other tokens than rank 0 at step 3" in events[-1].error
    assert group.describe()["state"] == "down"
    with pytest.raises(dist.GroupDown):
        group.acquire(dist._Leader(group))


def test_an_earlier_loads_checksums_are_ignored(watched):
    group, follower, events, stopped = watched
    group.record(0, 3, 111)
    _send(follower, {"t": "ack", "n": 3, "x": 222, "e": group.epoch - 1})
    _send(follower, {"t": "beat"})
    assert not stopped.wait(0.6)


def test_a_silent_rank_fails_the_group_within_the_timeout(watched):
    group, follower, events, stopped = watched
    t0 = time.monotonic()
    assert stopped.wait(5)
    assert 0.9 <= time.monotonic() - t0 < 3.0
    assert "rank 1 sent nothing for 1 s" in events[-1].error
    assert group.describe()["error"].startswith("rank 1 sent nothing")


def test_a_closed_connection_fails_the_group_at_once(watched):
    group, follower, events, stopped = watched
    follower.close()
    assert stopped.wait(0.9)
    assert "rank 1 closed its connection" in events[-1].error


def test_a_follower_engine_failing_alone_fails_the_group(watched):
    group, follower, events, stopped = watched
    _send(follower, {"t": "crashed", "n": 9, "error": "engine crashed: boom"})
    for _ in range(6):  # keep it from looking silent: the crash, not the silence, must fail it
        if stopped.wait(0.4):
            break
        _send(follower, {"t": "beat"})
    assert stopped.wait(1)
    assert "rank 1's engine failed at step 9: engine crashed: boom" in events[-1].error


def test_an_engine_failing_on_every_rank_at_the_same_step_keeps_the_group(watched):
    """An injected step fault fails every rank's engine at once: that is no reason to fail the group."""
    group, follower, events, stopped = watched
    group.leader_crash_step = 9
    _send(follower, {"t": "crashed", "n": 9, "error": "engine crashed: injected"})
    for _ in range(6):
        time.sleep(0.4)
        _send(follower, {"t": "beat"})
    assert not stopped.is_set()
    assert group.crashes == []


def test_faults_armed_on_rank_0_travel_with_the_next_step():
    faults = dist._StepFaults({"step_raise"})
    assert faults.next_step() == ["step_raise"] and faults.armed == set()
    assert faults.take("step_raise") and not faults.take("step_raise")
    follower = dist._StepFaults()
    follower.next_step(["thread_die"])
    assert follower.take("thread_die")


def test_commands_survive_the_wire():
    from mlxserve.engine.sampling import SamplingParams

    cmds = [
        eng.Add(
            7,
            [1, 2, 3],
            16,
            SamplingParams(temperature=0.5, seed=3, logit_bias={5: -1.5}),
            stop=("\n",),
            logprobs=2,
            grammar='{"type": "object"}',
        ),
        eng.Cancel(7),
        eng.Shutdown(),
    ]
    wire = json.loads(json.dumps([dist.encode_command(c) for c in cmds]))
    assert [dist.decode_command(c) for c in wire] == cmds


def test_a_step_that_failed_because_a_rank_left_says_so(watched):
    """The step's collective can break a moment before the watchdog sees the closed connection:
    the requests must still learn that the group failed, not the transport's error."""
    group, follower, events, stopped = watched
    leader = group.owner
    failed = eng.Chunk(4, "", (), finish="error", error="generation failed: [ring] connection to a peer was lost")
    other = eng.Chunk(5, "", (), finish="error", error="bad grammar")
    follower.close()
    out = leader._step_failure([failed, other])
    assert out[0].error.startswith("distributed group failed: rank 1 closed its connection")
    assert out[1] == other


def test_a_step_failure_with_every_rank_alive_is_left_as_it_is(watched):
    group, follower, events, stopped = watched
    failed = eng.Chunk(4, "", (), finish="error", error="generation failed: boom")
    _send(follower, {"t": "beat"})
    assert group.owner._step_failure([failed]) == [failed]


def test_a_fault_survives_loop_passes_that_ran_no_step():
    # rank 0 wakes without a batch step (an admission window, an empty drain): the fault armed
    # before must still fail the next step that runs, on every rank
    faults = dist._StepFaults()
    faults.armed.add("step_raise")
    assert faults.next_step() == ["step_raise"]  # a pass that takes nothing
    assert faults.next_step() == ["step_raise"]  # still this step's, and sent to the followers again
    assert faults.take("step_raise")
    assert faults.next_step() == []
