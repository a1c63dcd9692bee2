"""MLX's CPU backend on this machine: the quantized kernels here, and the bootstrap beside them.

Everything that makes MLX's CPU path fast lives in this one package, since it shares one build
cache, one CPU probe (machine.py) and one rule (it runs before ``mlx.core`` is first imported):
the BLAS selection (backend.py, bootstrap.py), the few-row float32 kernels (smallgemm.py), the
``-march=native`` JIT wrapper (jitflags.py), and the quantized few-row products (this module:
an MLX primitive over MLX's packed affine weights, qmm.cpp, built by buildext.py).

:func:`load` builds (once per machine, cached like smallgemm) and imports the extension; it
returns None with the reason where it cannot, and callers keep the float32 path.
"""

from __future__ import annotations

import threading

from .buildext import ENV, build, unavailable_reason  # noqa: F401

PATHS = {"scalar": 0, "avx2": 1, "avx512vnni": 2}


class KernelModule:
    """Marks modules whose products go through these kernels (their weights stay packed)."""

    kernels = None  # the extension module, set when a model is routed through it


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
    n, rows = threads()
    module.start_threads(n, SPIN_US)
    module.set_thread_rows(rows)
    return module, why


def pack(w, scales, biases, bits: int):
    """MLX's affine layout (w (N, K*bits/32) uint32, scales/biases (N, K/group)) -> the kernels'
    tiles of 8 rows (qmm.cpp, "the packed layout"): (w (T, K*bits/4) uint32, scales and biases
    (T, K/group, 8), N), the rows padded to 8T with zeros. Lazy MLX ops."""
    import mlx.core as mx

    n = w.shape[0]
    k = w.shape[1] * 32 // bits
    t = -(-n // 8)
    pad = 8 * t - n
    b8 = mx.view(w, mx.uint8)
    if bits == 4:
        q = mx.stack([b8 & 15, b8 >> 4], axis=-1).reshape(n, k)
    else:
        q = b8.reshape(n, k)
    if pad:
        q = mx.concatenate([q, mx.zeros((pad, k), q.dtype)])
        scales = mx.concatenate([scales, mx.zeros((pad, scales.shape[1]), scales.dtype)])
        biases = mx.concatenate([biases, mx.zeros((pad, biases.shape[1]), biases.dtype)])
    nb = k // 32
    if bits == 4:
        # (t, i, b, h, v, c) -> (t, b, v, i, c, h); byte = lo | hi << 4
        q = q.reshape(t, 8, nb, 2, 4, 4).transpose(0, 2, 4, 1, 5, 3)
        packed = q[..., 0] | (q[..., 1] << 4)
    else:
        # (t, i, b, j, c) -> (t, b, j, i, c), stored as q - 128
        packed = q.reshape(t, 8, nb, 8, 4).transpose(0, 2, 3, 1, 4) ^ 128
    packed = mx.view(mx.contiguous(packed.astype(mx.uint8)).reshape(t, -1), mx.uint32)
    g = scales.shape[1]
    sp = mx.contiguous(scales.reshape(t, 8, g).transpose(0, 2, 1))
    bp = mx.contiguous(biases.reshape(t, 8, g).transpose(0, 2, 1))
    return packed, sp, bp, n


SPIN_US = 300  # a helper's wait for the next product before it sleeps


def threads() -> tuple[int, int]:
    """(threads per product, fewest rows a product needs to be shared): ``MLXSERVE_GEMM_THREADS``,
    else two for every product, decode steps' too. With a step submitted in parts
    (engine/submit.py) a helper spinning between products no longer holds up Python building
    the next step (benchmarks/results/history-cpu.md)."""
    from ...config import CpuSettings
    from .machine import cpu_count

    if (setting := CpuSettings.from_env().gemm_threads) is not None:
        return setting, 1
    return min(2, cpu_count()), 1


def path_name(module) -> str:
    return {v: k for k, v in PATHS.items()}[module.best_path()]
