"""Quantized few-row products for the CPU: an MLX primitive over MLX's packed affine weights.

:func:`load` builds (once per machine, cached like smallgemm) and imports the extension; it
returns None with the reason where it cannot, and callers keep the float32 path.
"""

from __future__ import annotations

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
    from .. import smallgemm

    module.start_threads(smallgemm.threads(), smallgemm.SPIN_US)
    return module, why


def path_name(module) -> str:
    return {v: k for k, v in PATHS.items()}[module.best_path()]
