"""Whether any model is generating, for work that should give way to it (long embeddings).

On a CPU, an embedding that computes while a model decodes slows the decode far beyond a fair
share. Runners report here, on the trio thread; embedder threads read ``IDLE``.
"""

from __future__ import annotations

import threading

IDLE = threading.Event()  # set while no runner has a sequence in its engine
IDLE.set()
_busy: set[int] = set()


def report(owner: object, generating: bool) -> None:
    """A runner's state changed (called on the trio thread)."""
    if generating:
        _busy.add(id(owner))
    else:
        _busy.discard(id(owner))
    if _busy:
        IDLE.clear()
    else:
        IDLE.set()
