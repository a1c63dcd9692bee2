"""heap.freeze / heap.reclaim: frozen objects skip the collector's passes, and a cycle that
became garbage while frozen is freed by the next reclaim."""

from __future__ import annotations

import gc
import weakref

from mlxserve.actors import heap


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector can free it


def test_frozen_cycles_wait_for_reclaim():
    node = Node()
    ref = weakref.ref(node)
    heap.freeze()
    try:
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: a full pass does not even look at it
        heap.reclaim()
        assert ref() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
