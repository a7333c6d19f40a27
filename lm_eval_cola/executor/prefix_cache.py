"""Work done under chain prefixes, kept for chains that share them (a search's memory)."""

from __future__ import annotations

import ctypes
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from lm_eval_cola.chain import Chain


class Stored(Protocol):
    """What the prefix cache holds: a layer output (a tensor) or a :class:`StepState`."""

    @property
    def nbytes(self) -> int: ...


class PrefixCache:
    """Work done on a row under chain prefixes, by (row content, chain prefix), least recently
    used out.

    Chains explored by a search share prefixes: a child differs from its parent from the edit
    onwards. For the same row, the output of position ``p`` depends only on the chain's first
    ``p + 1`` layers, so a row resumes from the deepest prefix found here. A packed scoring row
    stores its output there; a generation's forward step stores a :class:`StepState`, which
    also holds what every position wrote to the KV cache.
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Stored] = OrderedDict()

    def deepest(self, row: str, chain: Chain) -> tuple[int, Stored | None]:
        """(positions already computed, what they left) for ``chain`` on ``row``."""
        for length in range(len(chain), 0, -1):
            output = self._entries.get((row, chain.layers[:length]))
            if output is not None:
                self._entries.move_to_end((row, chain.layers[:length]))
                self.hits += 1
                return length, output
        self.misses += 1
        return 0, None

    def path(self, row: str, chain: Chain) -> list[Stored]:
        """What is stored for every prefix of ``chain`` on ``row``, shortest first, up to the
        first one missing: for entries that hold their own position's work only (a decoding
        step's), resuming needs every shallower one."""
        path: list[Stored] = []
        for length in range(1, len(chain) + 1):
            value = self._entries.get((row, chain.layers[:length]))
            if value is None:
                break
            self._entries.move_to_end((row, chain.layers[:length]))
            path.append(value)
        self.hits += bool(path)
        self.misses += not path
        return path

    def put(self, row: str, prefix: tuple[int, ...], value: Stored) -> None:
        size = value.nbytes
        if size > self.max_bytes or (row, prefix) in self._entries:
            return
        self._entries[(row, prefix)] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)


TRIM_EVERY_S = 10.0
"""Seconds between two trims: a trim costs its walk over the free chunks and, afterwards, a
page fault for every page the next passes take back, so trimming after every pass of a long
search cost it about a tenth of its time; at this pace the holes still cannot pile up."""

_last_trim = -float("inf")


def return_freed_memory(every_s: float = TRIM_EVERY_S) -> None:
    """Hand the allocator's free pages back to the system (glibc; elsewhere nothing), at most
    once every ``every_s`` seconds.

    A search frees tensors of every size in an order no allocator predicts (the cache's
    evictions, finished generations' KV caches), and glibc keeps the holes: a GSM8K search
    with a 4 GB cache grew past 20 GB. Trimming now and then keeps a search at its cache plus
    the model (docs/BENCHMARKS.md, "Memory")."""
    global _last_trim
    trim = _malloc_trim()
    now = time.monotonic()
    if trim is not None and now - _last_trim >= every_s:
        trim(0)
        _last_trim = time.monotonic()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
