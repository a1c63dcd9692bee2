"""Memory MLX holds beyond live arrays."""

from __future__ import annotations

import mlx.core as mx


def release_cached_buffers() -> None:
    """MLX's allocator keeps freed buffers for reuse; after an unload they go back to the system
    (without this an unloaded model's memory stays with the daemon)."""
    mx.clear_cache()
