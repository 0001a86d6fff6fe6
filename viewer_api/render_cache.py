"""Rendered images kept in process memory, least recently used first out.

Scrolling back and forth through a series, or a second person opening the
same shared study, asks for the same frames at the same size and window
again; decoding a 30 MB mammogram again for that costs hundreds of
milliseconds.  The cache is bounded by bytes (the encoded images' sizes),
not by entries, so that a few large frames cannot exhaust memory.

The key is what the image depends on: the instance, the frame, the viewport,
the window and the quality (``(sop_uid, frame, viewport, window, quality)``).
Access control happens before the cache is consulted: the cache is shared
by every caller, so a caller must have located the instance in its own
scope before asking for it here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class RenderCache:
    """A thread-safe LRU of encoded images, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            body = self._items.get(key)
            if body is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return body

    def put(self, key: Hashable, body: bytes) -> None:
        """Keep ``body``; an image larger than the whole cache is not kept."""
        if len(body) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = body
            self._size += len(body)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)
