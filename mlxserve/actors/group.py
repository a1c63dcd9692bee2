"""The mx.distributed group this daemon runs on, if any, for the HTTP layer (/api/ps, /api/status).

The group itself lives in engine/distributed.py: rank 0 serves, the other ranks follow it.
"""

from __future__ import annotations

from typing import Any

from ..engine import distributed


def describe() -> dict[str, Any] | None:
    """backend, ranks, split, state ("up" | "down") and the error that took it down; None when
    this daemon is not one of several ranks."""
    return distributed.describe()
