"""Small generic stream stages shared by the caching job and the student's data path."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int, lookahead: int) -> Iterator[R]:
    """``map(fn, items)`` in order, computed ``lookahead`` items ahead on a thread pool.

    Decoding and augmenting (PIL/torchvision, which release the GIL in their C parts)
    overlaps the teacher's forward pass (or the student's step) this way; unlike
    ``Executor.map`` it does not consume the whole input up front, so memory stays bounded
    on large tars.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(it: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of ``n`` consecutive items (the last one shorter)."""
    batch: list[T] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
