"""The one fault seam, for the chaos harness. Inert unless the harness turns it on.

Off by default: nothing here runs unless ``MLXSERVE_FAULT_CONTROL`` (``Settings.fault_control``)
names a file. Then the
runtime listens for SIGUSR1; on each signal it reads that file (JSON written by the harness),
arms the faults it lists and writes ``<file>.ack`` holding the request's ``id``, so the harness
knows the faults are armed before it goes on::

    {"id": 7, "faults": [{"fault": "thread_die", "model": "tiny:latest"},
                         {"fault": "load_slow", "model": "tiny-mlx:latest", "seconds": 2.0}]}

Faults (each fires once per arming; ``model`` is a display name, absent = any model):

- ``step_raise``, ``thread_die``: handed to the engine (``engine.loop.EngineFaults``) of the
  model's live runner, or of its next runner when none is loaded: the next step raises / the
  engine thread exits.
- ``load_fail``: the model's next load fails on its engine thread (as a bad file would).
- ``load_slow``: the model's next load takes ``seconds`` longer on its engine thread.

One fault is armed at start instead, because it kills the process: a create that reaches the
stage ``MLXSERVE_FAULT_CREATE_KILL_AFTER`` names (``Settings.fault_create_kill_after``, handed
to ``Store(kill_at_stage=...)``) kills the daemon there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import weakref
from pathlib import Path
from typing import Any, Callable

import trio

from ..config import Settings

log = logging.getLogger("mlxserve.faults")
CONTROL_ENV = "MLXSERVE_FAULT_CONTROL"
ENGINE_FAULTS = ("step_raise", "thread_die")
LOAD_FAULTS = ("load_fail", "load_slow")


class FaultSeam:
    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.fired: dict[str, int] = {}
        self._runners: weakref.WeakSet[Any] = weakref.WeakSet()
        self.on_fire: Callable[[str, str], None] | None = None

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def arm(self, spec: dict[str, Any]) -> None:
        name = spec.get("fault")
        if name not in ENGINE_FAULTS + LOAD_FAULTS:
            raise ValueError(f"unknown fault {name!r}")
        if name in ENGINE_FAULTS:
            for runner in list(self._runners):
                if runner.alive and _matches(spec, runner.name):
                    runner.arm_engine_fault(name)
                    self._count(name, runner.name)
                    return
        self.pending.append(dict(spec))

    def take(self, name: str, model: str) -> dict[str, Any] | None:
        """Consume one armed ``name`` fault for ``model``; None (the normal case) if none."""
        if not self.pending:
            return None
        for i, spec in enumerate(self.pending):
            if spec["fault"] == name and _matches(spec, model):
                del self.pending[i]
                self._count(name, model)
                return spec
        return None

    def runner_started(self, runner: Any) -> None:
        """A new runner: hand it any engine fault that was armed for its model."""
        self._runners.add(runner)
        for name in ENGINE_FAULTS:
            if self.take(name, runner.name) is not None:
                runner.arm_engine_fault(name)

    def _count(self, name: str, model: str) -> None:
        self.fired[name] = self.fired.get(name, 0) + 1
        log.warning("fault seam: %s armed for %s", name, model)
        if self.on_fire is not None:
            self.on_fire(name, model)


def _matches(spec: dict[str, Any], model: str) -> bool:
    return spec.get("model") in (None, "", model)


SEAM = FaultSeam()


def control_path(settings: Settings) -> Path | None:
    return settings.fault_control


async def watch(path: Path) -> None:
    """Arm faults from ``path`` on every SIGUSR1 (only started when the control file is set)."""
    try:
        receiver = trio.open_signal_receiver(signal.SIGUSR1)
    except ValueError:  # not the main thread (an in-process test daemon): no control channel
        log.warning("fault control needs the main thread; ignoring %s", CONTROL_ENV)
        return
    log.warning("fault seam enabled: control file %s", path)
    with receiver as signals:
        async for _ in signals:
            try:
                doc = json.loads(path.read_text())
                for spec in doc.get("faults", []):
                    SEAM.arm(spec)
                ack = {"id": doc.get("id"), "ok": True}
            except Exception as exc:  # a bad control file must not stop the daemon
                log.exception("fault control failed")
                ack = {"id": None, "ok": False, "error": str(exc)}
            tmp = path.with_name(path.name + ".ack.tmp")
            tmp.write_text(json.dumps(ack))
            os.replace(tmp, path.with_name(path.name + ".ack"))
