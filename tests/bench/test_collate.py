"""bench.collate compares like with like: both collations give the same shared batch, and its ratios are the
per-round quotients of the CPU times it measured."""

from __future__ import annotations

import numpy as np
import torch

from bench import collate
from student.batch import stack
from student.ring import BatchRing


def test_both_collations_give_the_same_shared_batch():
    g = np.random.default_rng(0)
    rows = [g.standard_normal((3, 4, 5)).astype(np.float16) for _ in range(3)]
    images = [torch.from_numpy(g.standard_normal((3, 6, 6)).astype(np.float32)) for _ in range(3)]
    ring = BatchRing(1, 1, 4096)
    for items in (rows, images):
        old, new = collate.private_then_shared(items), stack(items, shared=True)
        assert old.is_shared() and new.is_shared() and old.dtype == new.dtype and torch.equal(old, new)
        through = ring.take(ring.put({"a": items}, worker=0))["a"]
        assert through.dtype == old.dtype and torch.equal(through, old)


def test_ratios_are_the_per_round_quotients(monkeypatch):
    monkeypatch.setattr(collate, "SHAPES", {"rows": ((2, 3), np.float16), "images_224": ((3, 4, 4), np.float32)})
    res = collate.run(batch_size=2, rounds=3, repeats=1)
    for name in ("rows", "images_224"):
        r = res["shared_vs_private"][name]
        assert r["rounds"] == 3
        got = res["cpu_ms_per_batch"]
        assert got[f"{name}/shared"]["rounds"] == 3 and got[f"{name}/private+share"]["rounds"] == 3
        raw = res["cpu_ms_per_round"]
        want = [a / b for a, b in zip(raw[f"{name}/shared"], raw[f"{name}/private+share"], strict=True)]
        assert np.allclose(r["per_round"], want) and r["median"] == sorted(want)[1]
        want = [a / b for a, b in zip(raw[f"{name}/ring"], raw[f"{name}/private+share"], strict=True)]
        assert np.allclose(res["ring_vs_private"][name]["per_round"], want)
    assert {(row["batch"], row["collation"]) for row in res["rows"]} == {
        (n, w) for n in ("rows", "images_224") for w in ("private+share", "shared", "ring")}
