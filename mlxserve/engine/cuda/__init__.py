"""CUDA kernels written through MLX's own extension point (``mx.fast.cuda_kernel``).

Nothing here runs unless MLX has a CUDA device: :func:`available` says whether it has.
"""

from __future__ import annotations

import mlx.core as mx


def available() -> bool:
    return mx.cuda.is_available()
