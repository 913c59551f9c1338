"""Memory a reader fills again and again (each sample's rows of the arrays read by the block, a batch copied out
of its ring slot), reused instead of allocated afresh.

Why: a fresh array of a few hundred KB or more is not free on Linux. A large one is a fresh ``mmap``, and glibc
hands freed memory back to the system once enough of it sits free at the top of its heap; either way the next
array of that size faults its pages in again, and the kernel zeroes each one on its first write: one more pass
over the bytes, spent in page faults. Measured in ``bench.scale``'s reader (ViT-L's three ViTKD taps, 1.2 MB a
sample, 2 workers on 2 cores; scratch scripts under /tmp/s21 and /tmp/s22, 2026-12-02):

* a 64-row block read into a fresh 25 MB array per tap: 4.1–5.9 ms of worker CPU a ViTKD sample, 3.7 reused;
* each sample's rows copied out of its block into fresh arrays: 150 page faults a sample (36 with images alone),
  3.86 ms of worker CPU a sample against 3.49 reused (30 faults);
* a batch taken out of its ring slot into a fresh ``np.empty``: 69 faults and 0.38 ms of main-process CPU a
  ViTKD sample, 0.13 reused.

Since then the blocks are not read into buffers of their own at all: each sample's rows are read straight into
the sample's buffer (:class:`student.stream.BlockRows`).

:class:`ReusedBuffers` lends memory as an array that comes back by itself once the last array or tensor viewing
it is gone (:meth:`~ReusedBuffers.lend`: a ``weakref.finalize`` on the buffer NumPy keeps as the base of every
view of it), for rows and batches whose lifetime is their user's (a shuffle buffer, a training step); it never
hands out memory that something still views.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

ALIGN = 64  # bytes: arrays packed into one buffer start this far apart at least (:func:`aligned`), so each is
# aligned for its dtype wherever the buffer starts, and on a cache line of its own where the buffer starts on one


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`: the room an array takes in a buffer it shares."""
    return -(-nbytes // ALIGN) * ALIGN


def packed(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where arrays of ``sizes`` bytes start in one buffer that packs them in order, each at an :func:`aligned`
    offset, and the buffer's size."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + aligned(n))
    return offsets[:-1], offsets[-1]


class ReusedBuffers:
    """Buffers of uint8, reused by size (see the module docstring). Thread-safe: rows are read on a prefetch
    thread, and a finalizer runs on whichever thread drops the last view. At most ``keep`` free buffers of a size
    are kept; more are freed."""

    def __init__(self, keep: int = 1024) -> None:
        self.keep = keep
        self.allocated = 0  # buffers made so far (for tests: the pool stays as small as what is alive at once)
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.RLock()  # re-entrant: a finalizer may run while this thread holds it

    def lend(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` that nothing else views; its memory comes back once it and every array or
        tensor made from it are gone."""
        buf = self._take(nbytes)
        out = np.frombuffer(memoryview(buf), np.uint8)  # its base, a memoryview, ends every view's chain of bases
        weakref.finalize(out.base, self._put, buf)
        return out

    def copies(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A copy of each of ``arrays`` (NumPy's, on this thread), all in one buffer from :meth:`lend`, each at an
        :func:`aligned` offset from its start: the buffer comes back once every copy (and whatever views one) is gone."""
        offsets, size = packed([a.nbytes for a in arrays.values()])
        mem = self.lend(size)
        out = {}
        for (name, a), off in zip(arrays.items(), offsets, strict=True):
            out[name] = mem[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
            np.copyto(out[name], a)
        return out

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = self._free.get(nbytes)
            buf = free.pop() if free else None
            self.allocated += buf is None
        return np.empty(nbytes, np.uint8) if buf is None else buf

    def _put(self, buf: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < self.keep:
                free.append(buf)
