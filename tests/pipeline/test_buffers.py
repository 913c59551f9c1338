"""pipeline.buffers: memory lent for rows and copies, reused only once nothing views it."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.buffers import ReusedBuffers


def test_lent_memory_comes_back_only_after_every_view_and_tensor_of_it_is_gone():
    pool = ReusedBuffers()
    a = pool.lend(64)
    a[:] = 7
    first = a.__array_interface__["data"][0]
    as_floats = a[8:24].view(np.float32).reshape(2, 2)  # a view of a view
    tensor_view = torch.from_numpy(as_floats)[1]  # a torch view of it
    del a, as_floats
    b = pool.lend(64)  # the first is still viewed: fresh memory
    assert b.__array_interface__["data"][0] != first and pool.allocated == 2
    b[:] = 1
    assert tensor_view.numpy().view(np.uint8).tolist() == [7] * 8  # not written into
    del tensor_view
    c = pool.lend(64)  # now the first's memory is free again
    assert c.__array_interface__["data"][0] == first and pool.allocated == 2
    assert pool.lend(32) is not None and pool.allocated == 3  # another size: its own buffers


def test_at_most_keep_free_buffers_of_a_size_are_kept():
    pool = ReusedBuffers(keep=2)
    held = [pool.lend(16) for _ in range(5)]
    del held  # five come back, two are kept
    again = [pool.lend(16) for _ in range(5)]
    assert pool.allocated == 5 + 3 and len(again) == 5


def test_copies_share_one_buffer_at_aligned_offsets_and_equal_what_was_copied():
    pool = ReusedBuffers()
    src = {"a": np.arange(5, dtype=np.float16), "b": np.arange(12, dtype=np.int64).reshape(3, 4), "c": np.ones(1, bool)}
    got = pool.copies(src)
    assert pool.allocated == 1 and list(got) == list(src)
    for name, a in src.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape and np.array_equal(got[name], a)
        assert got[name].flags.aligned and not np.shares_memory(got[name], a)
    a_addr = got["a"].__array_interface__["data"][0]
    assert got["b"].__array_interface__["data"][0] - a_addr == 64 and got["c"].__array_interface__["data"][0] - a_addr == 64 + 128  # b: 96 B
