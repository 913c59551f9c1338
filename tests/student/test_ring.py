"""student.ring: a loader's workers hand their batches over through reused shared-memory slots."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from student.batch import collate_rows, received
from student.data import CacheDataset, target_arrays
from student.ring import BatchRing, packed_bytes

TAPS = ["block0", "final"]


def make(small_cache, **kw) -> CacheDataset:
    t = small_cache["manifest"].teacher
    opts = {"size": t.input_size, "mean": t.mean, "std": t.std, "shuffle_buffer": 64, "taps": TAPS, **kw}
    return CacheDataset(str(small_cache["path"]), **opts)


def batches(ds: CacheDataset, **kw) -> list:
    def logits(t):
        return t.logits if t.topk is None else (t.topk.values, t.topk.indices, t.topk.logsumexp)

    return [(b.x, b.labels, b.tars, b.positions, b.views, b.keys, b.lam, b.partner_labels, logits(b.targets),
             dict(b.targets.features)) for b in ds.loader(batch_size=24, **kw)]


def same(a: list, b: list) -> bool:
    def eq(u, v) -> bool:
        if isinstance(u, torch.Tensor):
            return u.dtype == v.dtype and torch.equal(u, v)
        if isinstance(u, dict):
            return u.keys() == v.keys() and all(eq(u[k], v[k]) for k in u)
        if isinstance(u, tuple):
            return len(u) == len(v) and all(eq(p, q) for p, q in zip(u, v, strict=True))
        return u == v
    return len(a) == len(b) and all(eq(u, v) for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True))


def test_batches_through_the_ring_equal_the_in_process_ones_and_its_slots_are_reused(small_cache):
    """Two workers through the ring serve, batch for batch, what the DataLoader's usual way serves (ring off)
    and what one process collates (the split over consumers differs with workers, so each is compared with its
    own kind); the second epoch reuses the first one's slots, still correct."""
    ds = make(small_cache)
    ds.set_epoch(1)
    ring_epoch = batches(ds, num_workers=2)
    ring = ds._idle_ring
    assert isinstance(ring, BatchRing) and ring.workers == 2 and not ring.busy.any()
    ds.set_epoch(1)
    assert same(ring_epoch, batches(ds, num_workers=2, ring=False))
    ds.set_epoch(1)
    again = batches(ds, num_workers=2)
    assert ds._idle_ring is ring and same(ring_epoch, again)  # the same slots, rewritten by new workers
    one = make(small_cache, rank=0, world_size=1)
    one.set_epoch(1)
    flat = sorted(zip(*(torch.cat([b[i] for b in ring_epoch]).tolist() for i in (2, 3)), strict=True))
    assert flat == sorted((s.tar, s.position) for s in one)  # every cached sample once


def test_a_slot_sized_for_the_batch_holds_it_and_a_larger_batch_goes_the_usual_way(small_cache):
    ds = make(small_cache)
    shapes = ds.slot_shapes(24)
    m = small_cache["manifest"]
    names = target_arrays(m, logits=True, taps=TAPS)
    assert {k[len("rows/"):] for k in shapes if k.startswith("rows/")} == set(names)
    row_bytes = sum(np.prod(m.arrays[n].shape[2:]) * np.dtype(m.arrays[n].dtype).itemsize for n in names)
    h, w = (m.teacher.input_size,) * 2
    assert packed_bytes(shapes) >= 24 * (row_bytes + 3 * h * w * 4 + 6 * 8)  # by hand: rows, x, six scalars
    small = BatchRing(workers=1, slots=2, slot_bytes=packed_bytes(ds.slot_shapes(4)))
    dl = DataLoader(ds, batch_size=8, num_workers=1, collate_fn=partial(collate_rows, names=ds.targets, ring=small))
    raw = next(iter(dl))
    assert "ring" not in raw and raw["rows"][names[0]].shape[0] == 8  # too large for a slot: shared memory


class _Rows(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full((5, 7), i, np.float16)


def _collate(items: list, ring: BatchRing) -> dict:
    packed = ring.put({"a": items, "n": np.arange(len(items))})
    if packed is None:
        return {"a": torch.from_numpy(np.stack(items)), "n": torch.arange(len(items))}
    return {"ring": packed}


def test_a_consumer_that_never_takes_gets_every_batch_the_usual_way_after_the_wait(caplog):
    """A ring whose batches are not taken (its slots stay busy): once the worker's slots are used up, each batch
    waits ``wait_s`` and comes the DataLoader's usual way, with one warning; none is lost or wrong."""
    ring = BatchRing(workers=1, slots=2, slot_bytes=1024, wait_s=0.05)
    with caplog.at_level(logging.WARNING):
        got = list(DataLoader(_Rows(), batch_size=3, num_workers=1, collate_fn=partial(_collate, ring=ring)))
    assert ["ring" in g for g in got] == [True, True, False, False]
    for i, g in enumerate(got[:2]):
        out = ring.take(g["ring"])
        assert torch.equal(out["a"], torch.from_numpy(np.stack([_Rows()[j] for j in range(3 * i, 3 * i + 3)])))
        assert out["n"].tolist() == [0, 1, 2]
    assert not ring.busy.any()
    for i, g in enumerate(got[2:], start=2):
        assert g["a"][:, 0, 0].tolist() == [3 * i, 3 * i + 1, 3 * i + 2]
    assert sum("still busy" in r.message for r in caplog.records) <= 1  # once per worker (its log may not reach us)


def test_taken_tensors_are_copies_and_the_slot_is_free_again():
    ring = BatchRing(workers=1, slots=1, slot_bytes=4096)

    class One(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> np.ndarray:
            return np.full(3, i, np.int32)

    dl = DataLoader(One(), batch_size=1, num_workers=1, collate_fn=partial(_collate, ring=ring))
    it = iter(dl)
    first = ring.take(next(it)["ring"])  # frees the one slot: the worker can write the second batch into it
    second = ring.take(next(it)["ring"])
    assert first["a"].tolist() == [[0, 0, 0]] and second["a"].tolist() == [[1, 1, 1]]  # not overwritten
    assert first["a"].data_ptr() != ring.buf.data_ptr() and not first["a"].is_shared()


def test_a_batch_taken_to_the_cpu_keeps_its_memory_while_any_view_of_it_lives_then_a_later_batch_reuses_it():
    """The copy out lands in memory of batches already gone (``pipeline.buffers.ReusedBuffers``): never in one still viewed (a tensor
    view, a NumPy view), and, once all are gone, in theirs instead of freshly allocated memory."""
    ring = BatchRing(workers=1, slots=1, slot_bytes=4096)

    def batch(i: int) -> dict[str, torch.Tensor]:
        out = ring.take(ring.put({"a": [np.full(3, i, np.int32)] * 2, "b": np.arange(5.0) + i}, worker=0))
        assert out["a"].tolist() == [[i] * 3] * 2 and out["b"].tolist() == [i + k for k in range(5)]
        return out

    first = batch(0)
    first_ptr = first["a"].data_ptr()
    held_tensor, held_array = first["a"][1], first["b"].numpy()[2:]
    del first
    second = batch(1)
    assert second["a"].data_ptr() != first_ptr  # the first batch's views still live
    assert held_tensor.tolist() == [0, 0, 0] and held_array.tolist() == [2.0, 3.0, 4.0]  # not written into
    del held_tensor
    third_ptr = batch(2)["a"].data_ptr()  # a NumPy view of the first's "b" still lives; this batch dies here
    assert third_ptr not in (first_ptr, second["a"].data_ptr())
    del held_array
    assert batch(3)["a"].data_ptr() in (first_ptr, third_ptr)
    assert ring._outputs.allocated == 3  # the first's, the second's (alive), the third's: none for the fourth
    assert not ring.busy.any()


def test_received_needs_the_ring_a_batch_came_through():
    assert received({"x": 1}, None) == {"x": 1}  # the usual way: as it came
    with pytest.raises(ValueError, match="BatchRing"):
        received({"ring": {"slot": (0, 0), "fields": []}}, None)
    with pytest.raises(ValueError, match="must be >= 1"):
        BatchRing(workers=0, slots=1, slot_bytes=1)
