"""Keep the collector's full passes short while requests stream, and give an unloaded model's
memory back: objects that live as long as the daemon or a model are frozen out of the
collector's sight (its full passes stalled token streams for tens of milliseconds)."""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from typing import Callable

log = logging.getLogger("mlxserve.heap")


def freeze() -> None:
    """After a load (or the daemon's start): everything alive now is moved out of the collector's
    sight. Cheap (no pass); cycles that were already garbage wait for the next ``reclaim``."""
    gc.freeze()


def _malloc_trim() -> None:
    """glibc keeps freed heap pages mapped; malloc_trim returns them (a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def reclaim(release_buffers: Callable[[], None] | None = None) -> None:
    """After an unload: one full pass over everything, frozen objects included, so the model's
    cycles are freed, then freeze the survivors again; then ``release_buffers`` (the engine's
    buffer cache) and glibc hand the freed weights back to the system."""
    t0 = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    try:  # housekeeping: it never fails the unload that called it
        if release_buffers is not None:
            release_buffers()
        _malloc_trim()
    except Exception:
        log.exception("returning freed memory to the system failed")
    log.debug("heap reclaimed in %.1f ms: %d objects frozen", (time.perf_counter() - t0) * 1e3, gc.get_freeze_count())
