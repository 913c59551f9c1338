"""Reused shared-memory slots that carry a DataLoader worker's batch to the main process.

torch's DataLoader moves every tensor a worker returns through a shared-memory segment of its own: the worker
allocates it, fills it, the main process maps it and frees it when the batch dies. The kernel hands out and
zeroes each 4 KiB page of a fresh segment on first touch; on the 2-core VM of ``bench/results.md`` that is
~5 µs a page, so a batch of 16 ViTKD rows at real size (19 MB fp16) costs ~1.7 ms of worker CPU per sample
before a byte of it is written: more than reading those rows from the cache (``python -m bench.collate``,
way ``ring``). torch has no pool for these segments (a DataLoader has no channel from the main process back
to its workers), hence this small one:

* the main process allocates ``workers × slots`` slots of ``slot_bytes`` once, before the workers start (they
  inherit them; with ``spawn`` torch shares them by file descriptor), and a busy flag per slot;
* a worker stacks a batch into the next slot of its own once that slot is free (:meth:`BatchRing.put`) and
  returns only the slot's number and the layout of what it wrote;
* the main process copies the batch out to the training device (:meth:`BatchRing.take`) and frees the slot.

So pages are touched once per ring, not once per batch, and no file descriptor crosses the queue. The flags
are read and written under one lock shared by all processes (its acquire and release order the slot's bytes
and its flag on every CPU, also weakly ordered ones). A worker that finds its slot still busy after
``wait_s`` (its batch was never taken: a consumer that does not call :meth:`take`) hands that batch over the
DataLoader's usual way, so a ring can slow a loader down but never stop it.

The batch's samples are copied twice on this path (stack into the slot, copy out of it) against once on
torch's; at ~10 GB/s a copy is a small fraction of the page faults it avoids.

On the CPU (a CPU trainer's "device") the copy out is NumPy's, on the calling thread, not torch's ``clone``:
torch splits a copy this large over its intra-op threads, and while the loader's workers hold the cores those
threads wait for one another at the copy's end; in the ``bench.scale`` reader (2 workers on 2 cores, a ViTKD
batch of 19.7 MB rows and 9.6 MB images) ``clone`` cost the main process 0.82 ms of CPU a sample and
``np.copyto`` into ``np.empty`` 0.15 (ViTKD), 0.26 and 0.06 with images alone (scratch, 2026-12-02). It copies
into memory of batches already gone (:class:`pipeline.buffers.ReusedBuffers`), not a fresh ``np.empty``, whose
pages glibc often returns to the system between batches of this size: 0.38 → 0.13 ms a ViTKD sample.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.buffers import ReusedBuffers, aligned, packed

log = logging.getLogger(__name__)

Field = tuple[str, int, tuple[int, ...], str]  # name, byte offset in the slot, shape, NumPy dtype


def _nbytes(shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def packed_bytes(shapes: Mapping[str, tuple[tuple[int, ...], np.dtype | str]]) -> int:
    """Bytes a slot needs for arrays of these ``name: (shape, dtype)``, each aligned as :meth:`BatchRing.put`
    lays them out."""
    return packed([_nbytes(shape, dt) for shape, dt in shapes.values()])[1]


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system, ``None`` where there is none to ask."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class BatchRing:
    """``slots`` reused shared-memory slots of ``slot_bytes`` for each of ``workers`` DataLoader workers; see the
    module docstring. Create it in the main process before the DataLoader's workers start, pass it to the
    workers' ``collate_fn`` (:func:`student.batch.collate_rows` ``ring=``) and call :meth:`take` on every batch
    that carries a ``"ring"`` entry."""

    def __init__(self, workers: int, slots: int, slot_bytes: int, *, wait_s: float = 2.0) -> None:
        if workers < 1 or slots < 1 or slot_bytes < 1:
            raise ValueError(f"BatchRing(workers={workers}, slots={slots}, slot_bytes={slot_bytes}): all must be >= 1")
        self.workers, self.slots, self.slot_bytes, self.wait_s = workers, slots, aligned(slot_bytes), wait_s
        self.buf = torch.empty((workers, slots, self.slot_bytes), dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.lock = multiprocessing.get_context().Lock()
        self._turn = 0  # this worker's next slot (each worker process has its own copy)
        self._warned = False
        self._outputs = ReusedBuffers(keep=workers * slots)  # the main process's: CPU batches' memory, reused

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_outputs"] = ReusedBuffers(keep=self.workers * self.slots)  # a worker's copy starts empty
        return state

    # --- worker side ----------------------------------------------------------------------------------

    def put(self, arrays: Mapping[str, list | np.ndarray], worker: int | None = None) -> dict | None:
        """In a DataLoader worker (or as worker ``worker``): each of ``arrays`` (``name: list of same-shape arrays
        or tensors`` to stack, or one array) written into this worker's next slot once it is free. Returns ``{"slot": (worker, slot),
        "fields": [(name, offset, shape, dtype), ...]}`` for :meth:`take`, or ``None`` when the batch is to go the
        DataLoader's usual way: not in a worker, larger than a slot, or the slot still busy after ``wait_s``."""
        if worker is None:
            info = get_worker_info()
            worker = info.id if info is not None else None
        if worker is None or not 0 <= worker < self.workers:
            return None
        arrays = {k: [_numpy(a) for a in v] if isinstance(v, list) else _numpy(v) for k, v in arrays.items()}
        shapes = {}  # name: (shape, dtype) of what lands in the slot
        for name, v in arrays.items():
            first = v[0] if isinstance(v, list) else v
            shapes[name] = ((len(v), *first.shape) if isinstance(v, list) else tuple(first.shape), first.dtype.str)
        offsets, size = packed([_nbytes(shape, dt) for shape, dt in shapes.values()])
        if size > self.slot_bytes:
            return None
        fields: list[Field] = [(name, off, shape, dt)
                               for (name, (shape, dt)), off in zip(shapes.items(), offsets, strict=True)]
        w, k = worker, self._turn % self.slots
        if not self._claim(w, k):
            if not self._warned:
                log.warning("worker %d: ring slot %d still busy after %.1f s (the loader does not take its batches?);"
                            " batches go through fresh shared memory", w, k, self.wait_s)
                self._warned = True
            return None
        self._turn += 1
        slot = self.buf[w, k].numpy()
        for (_, off, shape, dt), v in zip(fields, arrays.values(), strict=True):
            out = slot[off:off + _nbytes(shape, dt)].view(dt).reshape(shape)
            if isinstance(v, list):
                np.stack(v, out=out)
            else:
                out[...] = v
        return {"slot": (w, k), "fields": fields}

    def _claim(self, w: int, k: int) -> bool:
        deadline = time.monotonic() + self.wait_s
        while True:
            with self.lock:
                if not self.busy[w, k]:
                    self.busy[w, k] = 1
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)

    # --- main process side ----------------------------------------------------------------------------

    def take(self, packed: dict, device: str | torch.device = "cpu", *, pin_memory: bool = False
             ) -> dict[str, torch.Tensor]:
        """In the main process: the arrays :meth:`put` wrote (``packed``, its return value), each copied out of
        the slot to ``device`` (a fresh tensor, also on the CPU; through pinned memory with ``pin_memory``), then
        the slot freed for its worker."""
        w, k = packed["slot"]
        slot = self.buf[w, k]
        on_cpu = torch.device(device).type == "cpu"
        try:
            src = {name: slot[off:off + _nbytes(shape, dt)].numpy().view(dt).reshape(shape)
                   for name, off, shape, dt in packed["fields"]}
            if on_cpu:  # NumPy's copy on this thread, into memory of batches gone: see the module docstring
                out = {name: torch.from_numpy(a) for name, a in self._outputs.copies(src).items()}
            elif pin_memory:
                out = {name: torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for name, a in src.items()}
            else:  # from pageable memory the copy has left the slot when .to returns
                out = {name: torch.from_numpy(a).to(device) for name, a in src.items()}
        finally:
            with self.lock:
                self.busy[w, k] = 0
        return out


def _numpy(a: torch.Tensor | np.ndarray | np.generic | int | float) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
