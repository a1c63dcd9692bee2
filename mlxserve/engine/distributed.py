"""One model served across the ranks of an mx.distributed group (``mlx.launch``).

Rank 0 is the daemon (HTTP, actors, tokenizer); every other rank is a follower that runs the same
``Engine`` loop on the commands rank 0 drained, so everything deterministic (the batch, greedy and
seeded sampling, grammars, stop strings, the prefix cache) stays in lockstep, and the model's
collectives (tensor parallel ``all_sum``, pipeline ``send``/``recv``) always meet.

Commands travel over a control connection of plain TCP from rank 0 to each follower, not through
MLX collectives: a follower waiting in a collective spins a core (about half of one on the ring
backend), one waiting on a socket sleeps. The same connection carries, back to rank 0, heartbeats,
load results and a checksum of the tokens each step delivered; rank 0's watchdog fails the group
when a follower goes silent, crashes or diverges, so a dead or hung rank costs requests a clean
error within ``MLXSERVE_DIST_TIMEOUT`` rather than a hang.

Only one sharded model holds the group at a time (its collectives would interleave with another's):
``mlxctl serve`` sets MAX_LOADED_MODELS to 1 on a group. Which weights a rank keeps: sharding.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import attrs

from ..config import DistSettings
from ..errors import LoadError
from . import loop as eng, model as engine_model, sharding

log = logging.getLogger("mlxserve.distributed")

HEARTBEAT_S = 0.5
STEP_FAILED = "generation failed:"  # loop.Engine._step's error for a step that raised
STEP_FAILED_GRACE_S = 1.0


class GroupDown(LoadError):
    """The group lost a rank: its model cannot run until the ranks are started again."""

    status = 503
    kind = "server_error"


def launched(env: dict | None = None) -> bool:
    """Whether this process was started as one rank of several (mlx.launch's environment)."""
    env = os.environ if env is None else env
    return "MLX_RANK" in env and any(
        k in env
        for k in ("MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    )


def _backend_name(env: dict, dist: DistSettings) -> str:
    if dist.backend:
        return dist.backend
    if env.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    if env.get("MLX_HOSTFILE"):
        return "ring"
    if env.get("MLX_WORLD_SIZE"):
        return "nccl"
    return "any"


def _ring_hosts(env: dict) -> list[list[str]] | None:
    path = env.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _control_host(env: dict, dist: DistSettings) -> str:
    """Where rank 0 listens for its followers: MLXSERVE_DIST_CONTROL, else its ring address."""
    if v := dist.control:
        return v.rpartition(":")[0] or v
    hosts = _ring_hosts(env)
    if hosts and hosts[0]:
        return hosts[0][0].rpartition(":")[0]
    if v := env.get("MLX_JACCL_COORDINATOR"):
        return v.rpartition(":")[0]
    return "127.0.0.1"


# ---------------------------------------------------------------------------- framing


def _send(sock: socket.socket, msg: dict, lock: threading.Lock | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    frame = struct.pack("!I", len(data)) + data
    if lock is None:
        sock.sendall(frame)
    else:
        with lock:
            sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("connection closed")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket) -> dict:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, n))


def encode_command(cmd) -> dict:
    match cmd:
        case eng.Add():
            d = attrs.asdict(cmd, recurse=True)
            d["images"] = [base64.b64encode(b).decode() for b in d.get("images") or ()]
            if d["params"].get("logit_bias"):
                d["params"]["logit_bias"] = [[int(k), float(v)] for k, v in d["params"]["logit_bias"].items()]
            return {"k": "add", **d}
        case eng.Cancel(seq_id=sid):
            return {"k": "cancel", "seq_id": sid}
        case eng.Shutdown():
            return {"k": "shutdown"}
    raise TypeError(f"cannot send {cmd!r} to the group")


def decode_command(d: dict):
    from .sampling import SamplingParams

    kind = d.pop("k")
    if kind == "cancel":
        return eng.Cancel(d["seq_id"])
    if kind == "shutdown":
        return eng.Shutdown()
    p = d.pop("params")
    if p.get("logit_bias"):
        p["logit_bias"] = {int(k): float(v) for k, v in p["logit_bias"]}
    if "images" in d:
        d["images"] = tuple(base64.b64decode(b) for b in d["images"])
    return eng.Add(params=SamplingParams(**p), **{**d, "stop": tuple(d.get("stop") or ())})


def _step_failed(events: list) -> bool:
    return any(isinstance(ev, eng.Chunk) and (ev.error or "").startswith(STEP_FAILED) for ev in events)


def _reseed(seed: int, step: int) -> None:
    """After a failed step the engine reseeds from the clock; every rank reseeds alike instead,
    or unseeded sampling would part the ranks (it runs right after, on the engine thread)."""
    import mlx.core as mx

    mx.random.seed((seed ^ step) & ((1 << 62) - 1))


def _crc(crc: int, chunk) -> int:
    return zlib.crc32(f"{chunk.seq_id}:{','.join(map(str, chunk.token_ids))}:{chunk.finish};".encode(), crc)


# ---------------------------------------------------------------------------- rank 0


class _StepFaults:
    """Chaos faults armed on rank 0 take effect on every rank in the same step: the followers
    get each step's faults with its commands (a fault on one rank alone would split the batch).
    ``armed`` is where the Runner arms them (as on FaultSeam); a step takes them from there."""

    def __init__(self, armed: set[str] | None = None) -> None:
        self.armed: set[str] = armed if armed is not None else set()
        self.step: set[str] = set()

    def next_step(self, names=None) -> list[str]:
        if names is None:  # rank 0: what was armed since the last step (pop: the Runner may arm now)
            # A loop pass that ran no batch step took nothing: keep it for the next one, which
            # the followers then get again with its commands.
            names = set(self.step)
            while self.armed:
                names.add(self.armed.pop())
        self.step = set(names)
        return sorted(names)

    def take(self, name: str) -> bool:
        if name in self.step:
            self.step.discard(name)
            return True
        return False


def _engine_params(engine) -> dict:
    prefix = engine._prefix
    return {
        "num_parallel": engine._num_parallel,
        "prefill_chunk": engine._prefill_chunk,
        "device": engine._device if isinstance(engine._device, (str, type(None))) else engine._device.type.name,
        "prompt_cache_bytes": prefix.max_bytes if prefix is not None else 0,
        "warm_up": engine._warm_up,
    }


@attrs.define(eq=False)
class _Peer:
    rank: int
    sock: socket.socket
    last_seen: float
    buf: bytearray = attrs.Factory(bytearray)


class Group:
    """Rank 0's view of the group: the control connections, the watchdog, the model holding it."""

    def __init__(self, mxgroup, backend: str, split: str, timeout: float, models_dir: Path, env: dict):
        self.mx = mxgroup
        self.backend = backend
        self.size = mxgroup.size()
        self.split = split
        self.timeout = timeout
        self.models_dir = Path(models_dir)
        self.env = env
        self.peers: dict[int, _Peer] = {}
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.down: str | None = None
        self.owner: _Leader | None = None
        self.model_split: str | None = None
        self.answers: dict[int, dict] = {}
        self.epoch = 0  # loads so far: the followers' answers name the load they answer
        self.sums: dict[int, dict[int, int]] = {}  # step -> rank -> checksum of its tokens
        self.crashes: list[tuple[int, int, str, float]] = []  # followers' engine crashes: rank, step, error, when
        self.leader_crash_step: int | None = None

    # -- state for /api/ps and /api/status --
    def describe(self) -> dict:
        with self.cond:
            loaded = self.owner is not None and self.model_split is not None
            return {
                "backend": self.backend,
                "ranks": self.size,
                "split": self.model_split if loaded else self.split,
                "state": "down" if self.down else "up",
                "error": self.down,
            }

    # -- the watchdog thread --
    def watch(self) -> None:
        while self.down is None:
            socks = {p.sock: p for p in self.peers.values()}
            try:
                ready, _, _ = select.select(list(socks), [], [], 0.25)
            except (OSError, ValueError):
                return
            now = time.monotonic()
            for s in ready:
                p = socks[s]
                try:
                    data = s.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self.fail(f"rank {p.rank} closed its connection (it exited or was killed)")
                    return
                p.last_seen = now
                p.buf += data
                while len(p.buf) >= 4:
                    (n,) = struct.unpack("!I", p.buf[:4])
                    if len(p.buf) < 4 + n:
                        break
                    msg = json.loads(bytes(p.buf[4 : 4 + n]))
                    del p.buf[: 4 + n]
                    self._on_message(p, msg)
            for p in self.peers.values():
                if now - p.last_seen > self.timeout:
                    self.fail(f"rank {p.rank} sent nothing for {self.timeout:g} s (hung or unreachable)")
                    return
            stale = None
            with self.cond:  # a follower's engine failed: fine if rank 0's failed at that step too
                for c in list(self.crashes):
                    if self.leader_crash_step == c[1]:
                        self.crashes.remove(c)
                    elif now - c[3] > 2.0:
                        stale = c
            if stale is not None:
                self.fail(f"rank {stale[0]}'s engine failed at step {stale[1]}: {stale[2]}")
                return

    def _on_message(self, p: _Peer, msg: dict) -> None:
        match msg.get("t"):
            case "loaded":
                with self.cond:
                    if msg.get("epoch") == self.epoch:  # not a late answer to an earlier load
                        self.answers[p.rank] = msg
                    self.cond.notify_all()
            case "ack":
                if msg.get("e") == self.epoch:
                    self.record(p.rank, msg["n"], msg["x"])
            case "crashed":
                with self.cond:
                    self.crashes.append((p.rank, msg["n"], msg.get("error", ""), time.monotonic()))

    def record(self, rank: int, step: int, crc: int) -> None:
        """A rank's checksum of the tokens it delivered in ``step``; compared once all have one."""
        with self.cond:
            got = self.sums.setdefault(step, {})
            got[rank] = crc
            self.sums.pop(step - 4096, None)  # a rank that never reports is the watchdog's business
            if len(got) < self.size:
                return
            del self.sums[step]
        odd = sorted(r for r, x in got.items() if x != got[0])
        if odd:
            self.fail(f"rank {odd[0]} generated other tokens than rank 0 at step {step}")

    def fail(self, reason: str) -> None:
        """Tear the group down: fail the model's requests now, wake its engine thread, let the
        followers go. The daemon stays up; the model cannot be loaded again on this group."""
        with self.cond:
            if self.down is not None:
                return
            self.down = reason
            owner = self.owner
            self.cond.notify_all()
        log.error("distributed group down: %s", reason)
        if owner is not None and owner.raw_deliver is not None:
            owner.raw_deliver([eng.Stopped(f"distributed group failed: {reason}")])
        for p in self.peers.values():
            _close(p.sock)
        if self.backend == "ring":
            _shutdown_ring_sockets(self.env, 0)

    # -- the model holding the group --
    def broadcast(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        frame = struct.pack("!I", len(data)) + data
        with self.send_lock:
            for p in self.peers.values():
                try:
                    p.sock.sendall(frame)
                except OSError:
                    pass  # the watchdog sees the closed connection and fails the group

    def acquire(self, leader: _Leader) -> None:
        with self.cond:
            # The previous model's engine may still be winding down after its unload.
            self.cond.wait_for(lambda: self.owner is None or self.down is not None, timeout=30)
            if self.down is not None:
                raise GroupDown(f"the distributed group is down ({self.down}); restart the ranks")
            if self.owner is not None:
                raise LoadError("another model holds the distributed group; one sharded model at a time")
            self.owner = leader
            self.epoch += 1
            self.answers = {}
            self.sums = {}
            self.crashes = []
            self.leader_crash_step = None
            self.model_split = None

    def release(self, leader: _Leader) -> None:
        with self.cond:
            if self.owner is leader:
                self.owner = None
                self.model_split = None
                self.cond.notify_all()

    def load(self, leader: _Leader, load: Callable):
        import mlx.core as mx

        self.acquire(leader)
        seed = leader.seed = secrets.randbits(62)
        announced: list[bool] = []

        def on_path(path: Path, weight_dtype: str | None) -> None:
            try:
                rel = str(path.resolve().relative_to(self.models_dir.resolve()))
            except ValueError:
                rel = str(path)
            self.broadcast(
                {
                    "t": "load",
                    "path": rel,
                    "weight_dtype": weight_dtype,
                    "split": self.split,
                    "seed": seed,
                    "engine": leader.params,
                    "epoch": self.epoch,
                }
            )
            announced.append(True)

        plan = sharding.ShardPlan(self.mx, self.split, on_path)
        try:
            with sharding.loading(plan):
                lm = load()
            if not announced:
                raise LoadError("this model's loader does not support a distributed group")
            with self.cond:
                self.cond.wait_for(lambda: len(self.answers) >= self.size - 1 or self.down is not None)
                if self.down is not None:
                    raise GroupDown(f"the distributed group is down ({self.down}); restart the ranks")
                bad = sorted((r, a) for r, a in self.answers.items() if not a.get("ok"))
            if bad:
                r, a = bad[0]
                raise LoadError(f"rank {r} could not load the model: {a.get('error')}")
            splits = {a.get("split") for a in self.answers.values()} | set(plan.chosen)
            if len(splits) != 1:
                raise LoadError(f"the ranks split the model differently: {sorted(map(str, splits))}")
        except BaseException:
            if announced:
                self.broadcast({"t": "end"})
            self.release(leader)
            raise
        mx.random.seed(seed)  # unseeded sampling draws the same numbers on every rank
        with self.cond:
            self.model_split = plan.chosen[0]
        log.info("model loaded on %d ranks (%s parallel)", self.size, self.model_split)
        return lm


class _Leader:
    """Rank 0's seam in one Engine (``Engine(sync=...)``): broadcasts each step's commands."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.params: dict = {}
        self.step = 0
        self.crc = 0
        self.raw_deliver: Callable | None = None
        self.faults = _StepFaults()
        self.seed = 0  # the load's: every rank seeds unseeded sampling with it

    def attach(self, engine) -> None:
        self.params = _engine_params(engine)
        load, deliver = engine._load, engine._deliver
        self.raw_deliver = deliver
        self.faults = _StepFaults(engine.faults.armed)
        engine.faults = self.faults

        def deliver_and_check(events: list) -> None:
            for ev in events:
                if isinstance(ev, eng.Chunk):
                    self.crc = _crc(self.crc, ev)
                elif isinstance(ev, eng.Stopped):
                    with self.group.cond:
                        if ev.error is not None:
                            self.group.leader_crash_step = self.step
                    self.group.release(self)
                elif isinstance(ev, eng.LoadFailed):
                    self.group.release(self)
            if _step_failed(events):
                _reseed(self.seed, self.step)
                events = self._step_failure(events)
            deliver(events)

        engine._load = lambda: self.group.load(self, load)
        engine._deliver = deliver_and_check

    def _step_failure(self, events: list) -> list:
        """A step that fails on a group is most often a rank gone (its collective broke): give the
        watchdog a moment to tell, so the requests learn that rather than a transport error."""
        g = self.group
        with g.cond:
            g.cond.wait_for(lambda: g.down is not None, timeout=STEP_FAILED_GRACE_S)
            down = g.down
        if down is None:
            return events
        return [
            attrs.evolve(ev, error=f"distributed group failed: {down}")
            if isinstance(ev, eng.Chunk) and (ev.error or "").startswith(STEP_FAILED)
            else ev
            for ev in events
        ]

    def commands(self, drain: Callable[[bool], list], block: bool) -> list:
        g = self.group
        if g.down is not None:
            raise GroupDown(f"distributed group failed: {g.down}")
        if self.step:
            g.record(0, self.step, self.crc)
        cmds = drain(block)
        self.step += 1
        self.crc = 0
        faults = self.faults.next_step()
        g.broadcast({"t": "step", "n": self.step, "c": [encode_command(c) for c in cmds], "f": faults})
        return cmds


GROUP: Group | None = None


def describe() -> dict | None:
    """The group for /api/ps and /api/status; None outside a group."""
    return GROUP.describe() if GROUP is not None else None


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _shutdown_ring_sockets(env: dict, rank: int) -> None:
    """Wake an engine thread blocked in a ring collective on a dead peer (the ring backend waits
    for ever): shut down this process's sockets to the ring's addresses, so its send/recv fail."""
    hosts = _ring_hosts(env) or []
    ours = {a.rpartition(":")[2] for a in (hosts[rank] if rank < len(hosts) else [])}
    theirs = {(a.rpartition(":")[0], a.rpartition(":")[2]) for i, h in enumerate(hosts) if i != rank for a in h}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            local, peer = s.getsockname(), s.getpeername()
            if str(local[1]) in ours or (peer[0], str(peer[1])) in theirs:
                s.shutdown(socket.SHUT_RDWR)
        except (OSError, IndexError, TypeError):
            pass
        finally:
            s.close()


# ---------------------------------------------------------------------------- start-up


def start(models_dir: Path, env: dict | None = None) -> tuple[int, Any]:
    """Join the group mlx.launch described: (rank, what that rank runs). Rank 0 returns
    (0, Group) and serves; a follower returns (rank, its control connection) for ``follow``.
    (0, None) when this process is not one of several ranks."""
    env = dict(os.environ if env is None else env)
    if not launched(env):
        return 0, None
    import mlx.core as mx

    dist = DistSettings.from_env(env)
    backend = _backend_name(env, dist)
    split = dist.split
    if split not in sharding.SPLITS:
        raise ValueError(f"MLXSERVE_DIST_SPLIT must be one of {', '.join(sharding.SPLITS)}, not {split!r}")
    timeout = dist.timeout
    g = mx.distributed.init(strict=True, backend=backend)
    if g.size() < 2:
        return 0, None
    rank = g.rank()
    host = _control_host(env, dist)
    listener = None
    token = b"\0" * 16
    port = 0
    if rank == 0:
        listener = socket.create_server((host, 0))
        port = listener.getsockname()[1]
        token = secrets.token_bytes(16)
    # The control port and the followers' pass phrase travel through the group itself, once.
    with mx.stream(mx.cpu):
        mine = mx.array([port, *token], dtype=mx.int32)
        both = mx.distributed.all_sum(mine, group=g)
        mx.eval(both)
    port, token = int(both[0].item()), bytes(int(x) for x in both[1:].tolist())
    if rank != 0:
        sock = socket.create_connection((host, port), timeout=60)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send(sock, {"t": "hello", "rank": rank, "token": token.hex()})
        lock = threading.Lock()
        threading.Thread(target=_beat, args=(sock, lock), name="mlxserve-dist-heartbeat", daemon=True).start()
        return rank, (g, sock, lock)
    group = Group(g, backend, split, timeout, models_dir, env)
    listener.settimeout(60)
    try:
        while len(group.peers) < g.size() - 1:
            sock, _ = listener.accept()
            sock.settimeout(10)
            try:
                hello = _recv(sock)
            except (OSError, ValueError, ConnectionError):
                _close(sock)
                continue
            if hello.get("token") != token.hex():
                _close(sock)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            group.peers[int(hello["rank"])] = _Peer(int(hello["rank"]), sock, time.monotonic())
    finally:
        listener.close()
    global GROUP
    GROUP = group
    eng.STEP_SYNC = lambda: _Leader(group)  # every Engine on rank 0 steps with the group
    threading.Thread(target=group.watch, name="mlxserve-dist-watchdog", daemon=True).start()
    log.info("rank 0 of %d (%s backend, split %s)", g.size(), backend, split)
    return 0, group


# ---------------------------------------------------------------------------- followers


class _Follower:
    """A follower's seam in its Engine: the step commands come from rank 0's connection."""

    def __init__(self, sock: socket.socket, lock: threading.Lock, epoch: int, seed: int) -> None:
        self.sock = sock
        self.lock = lock
        self.epoch = epoch  # the load this engine serves: rank 0 ignores an earlier one's acks
        self.seed = seed
        self.step = 0
        self.crc = 0
        self.pending: dict | None = None
        self.faults = _StepFaults()

    def attach(self, engine) -> None:
        engine.faults = self.faults

    def deliver(self, events: list) -> None:
        if _step_failed(events):
            _reseed(self.seed, self.step)
        for ev in events:
            if isinstance(ev, eng.Chunk):
                self.crc = _crc(self.crc, ev)
            elif isinstance(ev, eng.Stopped) and ev.error is not None:
                log.error("engine failed at step %d: %s", self.step, ev.error)
                self._send({"t": "crashed", "n": self.step, "error": ev.error})

    def _send(self, msg: dict) -> None:
        try:
            _send(self.sock, msg, self.lock)
        except OSError:
            os._exit(0)

    def commands(self, drain: Callable[[bool], list], block: bool) -> list:
        if self.step:
            self._send({"t": "ack", "n": self.step, "x": self.crc, "e": self.epoch})
        msg = _recv_or_exit(self.sock)
        if msg.get("t") != "step":
            self.pending = msg  # rank 0 moved on (a new load, or this load failed): end this engine
            return [eng.Shutdown()]
        self.step, self.crc = msg["n"], 0
        self.faults.next_step(msg.get("f") or [])
        return [decode_command(c) for c in msg["c"]]


def _recv_or_exit(sock: socket.socket) -> dict:
    try:
        return _recv(sock)
    except (OSError, ConnectionError, ValueError):
        # Rank 0 exited or tore the group down: nothing is left to serve here.
        log.info("rank 0 closed the group; exiting")
        os._exit(0)


def _beat(sock: socket.socket, lock: threading.Lock) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            _send(sock, {"t": "beat"}, lock)
        except OSError:
            os._exit(0)


def follow(rank: int, conn, models_dir: Path, weight_dtype: str | None = None) -> None:
    """A follower's life: load what rank 0 loads, step when it steps. Never returns."""
    import mlx.core as mx

    g, sock, lock = conn
    log.info("rank %d of %d: following rank 0", rank, g.size())
    pending: dict | None = None
    while True:
        msg, pending = pending or _recv_or_exit(sock), None
        if msg.get("t") != "load":
            continue  # a stale step or end of an engine that is already gone
        path = Path(msg["path"])
        path = path if path.is_absolute() else Path(models_dir) / path
        params = dict(msg["engine"])
        seq = _Follower(sock, lock, msg["epoch"], int(msg["seed"]))

        def load(path=path, msg=msg, seq=seq):
            plan = sharding.ShardPlan(g, msg["split"])
            try:
                with sharding.loading(plan):
                    lm = engine_model.load_path(path, weight_dtype=msg.get("weight_dtype"))
            except BaseException as exc:
                seq._send(
                    {"t": "loaded", "ok": False, "error": f"{exc.__class__.__name__}: {exc}", "epoch": msg["epoch"]}
                )
                raise
            mx.random.seed(int(msg["seed"]))
            seq._send(
                {"t": "loaded", "ok": True, "split": plan.chosen[0] if plan.chosen else None, "epoch": msg["epoch"]}
            )
            return lm

        engine = eng.Engine(load, seq.deliver, sync=seq, **params)
        engine.run()
        pending = seq.pending
        del engine
