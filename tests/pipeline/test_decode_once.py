"""Decode once (issue 15 item 2): a task reads and decodes a tar once for several views, and every unit
(tar, view) it writes is byte for byte what the unit run alone writes.

The reference is the per-unit loop as it was before decode-once (one read and decode of the tar per view),
kept here verbatim; each tar's decodes are counted by wrapping the decoder the tar reader calls.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch

import pipeline.tars as tars_mod
from pipeline.job import finalise, pending_units, probe_teacher, start
from pipeline.plan import plan_tasks, unit_row_bytes
from pipeline.stages import batched, prefetch_map
from pipeline.store import CacheStore
from pipeline.tars import expand_urls, index_tar
from pipeline.unit import UnitRows, UnitRunner
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import UnitCompletion
from tests.conftest import cache_config

from .test_job import data_files
from .test_kill_points import normal_manifest  # the manifest with its times and output URL left out

MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.9, "window": 32}


def per_unit(runner: UnitRunner, tar: int, view: int) -> UnitCompletion:
    """One unit alone, as ``UnitRunner._run`` did before decode-once (commit 3124857): the tar read and decoded for
    this view only."""
    t0 = time.time()
    acc = UnitRows(runner.m, tar, runner.teacher)
    viewed = prefetch_map(partial(runner.with_view, view=view), runner.samples(tar), workers=runner.threads,
                          lookahead=2 * runner.cfg.job.batch_size)
    if runner.cfg.views.mix is not None:
        viewed = runner.mixed(viewed, tar, view)
    for batch in batched(viewed, runner.cfg.job.batch_size):
        for s in batch:
            if s.image is None:
                acc.skip(s)
        good = [s for s in batch if s.image is not None]
        if good:
            x = torch.stack([s.x for s in good])
            acc.add(good, x, runner.teacher(x, [(runner.cfg.views.seed, s.tar, s.position, view) for s in good]))
    shas, sizes = runner.store.write_unit(runner.m, tar, view, acc.arrays())
    done = acc.completion(view, shas, sizes, time.time() - t0)
    runner.store.write_unit_record(done)
    return done


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """How many images were decoded (``decodes["images"]``)."""
    seen: Counter = Counter()
    real = tars_mod.decode_image

    def counting(data: bytes):
        seen["images"] += 1
        return real(data)

    monkeypatch.setattr(tars_mod, "decode_image", counting)
    return seen


def build(cfg: CacheConfig, *, old: bool) -> object:
    """``build_cache_in_process``'s steps, units run by the old per-unit loop or in decode-once tasks."""
    store = CacheStore(cfg.output.url)
    urls = expand_urls(cfg.input.urls)
    tars = [index_tar(u, None, cfg.input.on_bad_sample) for u in urls]
    m = start(store, cfg, None, None, tars, lambda: probe_teacher(cfg), lambda s: None)
    runner = UnitRunner(cfg.output.url, cfg.secrets(), num_threads=1, manifest=m)
    if old:
        for t, v in pending_units(store, m):
            per_unit(runner, t, v)
    else:
        for t, views in plan_tasks(m, pending_units(store, m)):
            runner.run_views(t, views)
    return finalise(store, m, 1.0)


def records(path: Path) -> dict[str, dict]:
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
            for p in sorted((path / layout.UNITS_DIR).glob("*.json"))}


def samples_of(cfg: CacheConfig) -> int:
    return sum(index_tar(u, None, cfg.input.on_bad_sample).count for u in expand_urls(cfg.input.urls))


@pytest.fixture
def bad_tars(tmp_path) -> dict:
    """Two small tars with undecodable and unlabelled samples among good ones (skipped, positions kept)."""
    from PIL import Image

    from .test_tars import encode, sample, write_tar

    good = []
    for i in range(7):
        good += sample(f"ok{i:02d}", label=i % 10, colour=(20 * i, 40, 200 - 10 * i))
    write_tar(tmp_path / "in-000000.tar", good)
    bad = sample("a00", 3) + [("broken.png", b"\x89PNG not really"), ("broken.cls", b"4")]
    bad += [("nolabel.png", encode(Image.new("RGB", (5, 5), (1, 2, 3))))] + sample("a01", 5) + sample("a02", 1)
    write_tar(tmp_path / "in-000001.tar", bad)
    return {"train": str(tmp_path / "in-{000000..000001}.tar")}


@pytest.mark.parametrize("case", ["plain", "mixed", "bad-mixed"])
def test_decode_once_writes_the_per_unit_bytes_and_decodes_each_image_once(case, small_digits, tiny_teacher,
                                                                          tmp_path, decodes, request):
    """Digits with 3 views, unmixed and mixed; and tars with bad samples (skipped) mixed in blocks of 3, batches of
    2, so that batches, blocks and partners meet skipped samples."""
    over = {"views__num_views": 3, "job__batch_size": 16}
    data = small_digits
    if case != "plain":
        over["views__mix"] = MIX
    if case == "bad-mixed":
        data = request.getfixturevalue("bad_tars")
        over |= {"views__mix": MIX | {"window": 3}, "job__batch_size": 2, "input__on_bad_sample": "skip",
                 "targets__tpp": None}
    cfgs = {k: CacheConfig.model_validate(cache_config(data, tiny_teacher, str(tmp_path / f"{k}.zarr"), **over))
            for k in ("old", "once")}
    n = samples_of(cfgs["old"]) - (case == "bad-mixed")  # the unlabelled sample is refused before decoding
    counts = {}
    for k, cfg in cfgs.items():
        decodes.clear()
        build(cfg, old=k == "old")
        counts[k] = decodes["images"]
    assert counts == {"old": 3 * n, "once": n}  # each image decoded once per view, then once
    a, b = data_files(tmp_path / "old.zarr"), data_files(tmp_path / "once.zarr")
    assert len(a) > 40 and sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []  # every array shard, index, TPP pack and stats: byte for byte
    assert records(tmp_path / "old.zarr") == records(tmp_path / "once.zarr")  # shard sha256s, counts, fidelity
    assert normal_manifest(tmp_path / "old.zarr") == normal_manifest(tmp_path / "once.zarr")


def test_resume_with_some_units_of_a_tar_done(small_digits, tiny_teacher, tmp_path, decodes):
    """Units missing from tars whose other units are done (their records and shards removed, as a worker lost
    mid-task leaves them): the resumed run decodes only those tars, once each, and ends with the same bytes."""
    cfg = CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(tmp_path / "full.zarr"),
                                                  views__num_views=3))
    m = build(cfg, old=False)
    part = tmp_path / "part.zarr"
    shutil.copytree(tmp_path / "full.zarr", part)
    gone = [(0, 1), (2, 0), (2, 2)]
    for t, v in gone:
        (part / layout.unit_record_path(t, v)).unlink()
        for name in m.arrays:
            shard = part / layout.array_shard_key(name, t, v, len(m.arrays[name].shape) - 2)
            if shard.exists():
                shard.unlink()
    (part / layout.MANIFEST).write_text((part / layout.MANIFEST).read_text().replace('"complete"', '"building"'))
    store = CacheStore(str(part))
    m = store.read_manifest(allow_partial=True)
    assert pending_units(store, m) == gone
    assert plan_tasks(m, gone) == [(0, (1,)), (2, (0, 2))]
    runner = UnitRunner(str(part), {}, num_threads=1, manifest=m)
    assert runner.run_views(0, [0], skip_done=True) == []  # done: not redone
    decodes.clear()
    for t, views in plan_tasks(m, pending_units(store, m)):
        done = runner.run_views(t, views, skip_done=True)
        assert [(r.tar, r.view) for r in done] == [(t, v) for v in views]
    counts = [index_tar(u).count for u in expand_urls(cfg.input.urls)]
    assert decodes["images"] == counts[0] + counts[2]
    finalise(store, m, 1.0)
    a, b = data_files(tmp_path / "full.zarr"), data_files(part)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    assert records(tmp_path / "full.zarr") == records(part)


def _manifest(counts: list[int], views: int, row: int):
    """A manifest-like object for :func:`plan_tasks`: tars of ``counts`` samples, one uint8 array of ``row`` bytes."""
    from types import SimpleNamespace

    arr = SimpleNamespace(shape=[len(counts) * max(counts), views, row], dtype="uint8")
    return SimpleNamespace(arrays={"a": arr}, dataset=SimpleNamespace(shards=[SimpleNamespace(count=c)
                                                                            for c in counts]))


def test_plan_tasks_groups_a_tars_views_within_the_row_budget():
    m = _manifest([10, 10, 4], 5, 100)  # a unit: 1,000 bytes (tars 0, 1), 400 (tar 2)
    pending = [(t, v) for t in range(3) for v in range(5) if (t, v) != (1, 3)]
    assert unit_row_bytes(m, 0) == 1000 and unit_row_bytes(m, 2) == 400
    assert plan_tasks(m, pending, row_bytes=10_000) == [(0, (0, 1, 2, 3, 4)), (1, (0, 1, 2, 4)), (2, (0, 1, 2, 3, 4))]
    # 2,500 bytes: 2 views of tars 0 and 1 a task, 6 of tar 2 (all 5); split evenly, views in order
    assert plan_tasks(m, pending, row_bytes=2500) == [
        (0, (0, 1)), (0, (2, 3)), (0, (4,)), (1, (0, 1)), (1, (2, 4)), (2, (0, 1, 2, 3, 4))]
    assert plan_tasks(m, pending, row_bytes=1) == [(t, (v,)) for t, v in pending]  # a unit too big: one a task
    # more actors than tasks: the biggest halved until there are enough (or every task is one unit)
    assert plan_tasks(m, pending, min_tasks=5) == [(0, (0, 1, 2)), (0, (3, 4)), (1, (0, 1, 2, 4)), (2, (0, 1, 2)),
                                                   (2, (3, 4))]
    assert len(plan_tasks(m, pending, min_tasks=100)) == len(pending)
    for budget, actors in ((1, 1), (1500, 3), (10**9, 7)):
        tasks = plan_tasks(m, pending, min_tasks=actors, row_bytes=budget)
        assert sorted((t, v) for t, vs in tasks for v in vs) == sorted(pending)  # each unit in exactly one task
        assert all(unit_row_bytes(m, t) * len(vs) <= max(budget, unit_row_bytes(m, t)) for t, vs in tasks)
