""" A least-recently-used cache bounded by the bytes of what it holds. """
from collections import OrderedDict
from typing import Any, Hashable, Optional, Tuple

__all__ = ['BoundedCache']


class BoundedCache:
    """Values by key, each with its size in bytes; the least recently used are evicted beyond `max_bytes` in all.
    A value larger than the budget is not kept, unless `keep_newest`: then the most recent value is always kept
    (alone when it exceeds the budget), for a user whose every call would otherwise rebuild it."""

    def __init__(self, max_bytes: int, keep_newest: bool = False):
        self.max_bytes = max_bytes
        self.keep_newest = keep_newest
        self._entries: 'OrderedDict[Hashable, Tuple[Any, int]]' = OrderedDict()
        self._nbytes = 0

    def get(self, key: Hashable) -> Optional[Any]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old[1]
        if nbytes <= self.max_bytes or self.keep_newest:
            self._entries[key] = (value, nbytes)
            self._nbytes += nbytes
        self.trim()

    def trim(self) -> None:
        """Evict the least recently used values until the rest fit in `max_bytes` (`keep_newest`: all but the most
        recent)."""
        while len(self._entries) > int(self.keep_newest) and self._nbytes > self.max_bytes:
            _, (_, nbytes) = self._entries.popitem(last=False)
            self._nbytes -= nbytes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0
