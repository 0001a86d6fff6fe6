"""A long-running process's startup objects and the garbage collector (archive/heap.py)."""

from __future__ import annotations

import gc
import weakref

from archive.heap import FROZEN, freeze_startup_objects


class _Node:
    """A tracked object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def test_objects_alive_at_startup_are_left_out_of_later_full_collections() -> None:
    startup = [_Node() for _ in range(5_000)]  # what a process keeps for its lifetime
    try:
        frozen = freeze_startup_objects()
        assert frozen >= len(startup)
        assert FROZEN._value.get() == frozen  # noqa: SLF001 - the gauge /metrics serves
        # a full collection no longer walks them ...
        generations = [gc.get_objects(generation) for generation in range(3)]
        walked = {id(o) for objects in generations for o in objects}
        assert not any(id(node) in walked for node in startup)
        # ... and what is made afterwards is collected as before, cycles included
        later = _Node()
        later.other = _Node()
        later.other.other = later
        cycle = weakref.ref(later)
        del later
        gc.collect()
        assert cycle() is None
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
