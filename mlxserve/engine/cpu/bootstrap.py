"""Pick the fastest CPU BLAS before mlx is imported (see backend.py); a no-op where absent.

Entry points call :func:`setup_backend` first thing: importing this module imports no MLX.
"""

from __future__ import annotations


def setup_backend() -> str:
    try:
        from . import backend
    except ImportError:
        return "default"
    return str(backend.configure_blas())
