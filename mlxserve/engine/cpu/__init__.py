"""Quantized few-row products for the CPU: an MLX primitive over MLX's packed affine weights.

:func:`load` builds (once per machine, cached like smallgemm) and imports the extension; it
returns None with the reason where it cannot, and callers keep the float32 path.
"""

from __future__ import annotations

import os
import threading

from .buildext import ENV, build, unavailable_reason  # noqa: F401

PATHS = {"scalar": 0, "avx2": 1}
_lock = threading.Lock()
_loaded: tuple | None = None  # (module or None, why)


def load():
    """(module, why): the imported extension, or (None, why not). Built on first use."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load():
    import importlib.util

    path, why = build()
    if path is None:
        return None, why
    try:
        spec = importlib.util.spec_from_file_location("_qmm", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a stale or foreign build: the float32 path serves
        return None, f"cannot import {path.name}: {exc}"
    module.start_threads(threads(), SPIN_US)
    return module, why


SPIN_US = 300  # a helper's wait for the next product before it sleeps


def threads() -> int:
    """Threads per product: ``MLXSERVE_GEMM_THREADS``, else 1. A spinning helper took the core
    the daemon's other threads need: served on the 2-core AMD machine, 1 stream 10.6 tok/s with a
    helper against 17.9 without, 4 streams 10.6 against 34.3."""
    from ..smallgemm import ENV_THREADS

    value = os.environ.get(ENV_THREADS, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def path_name(module) -> str:
    return {v: k for k, v in PATHS.items()}[module.best_path()]
