"""Student data: lockstep streaming of tars and cache rows, view replay, policies, splits, resume."""

from __future__ import annotations

import collections
import shutil

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader

from pipeline.raw_shards import is_raw_sharded
from pipeline.store import CacheNotReadyError, CacheStore
from pipeline.targets import input_fingerprint
from pipeline.tars import Sample, iter_samples
from pipeline.views import eval_view
from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.errors import ConfigError
from student import stream
from student.batch import collate_rows
from student.config import check_mix
from student.data import CacheDataset, merge_states, target_arrays
from student.evaluate import eval_loader
from student.plan import random_views, shuffle_order

TAPS = ["block0", "final"]


def make(small_cache, path=None, **kw) -> CacheDataset:
    t = small_cache["manifest"].teacher
    opts = {"size": t.input_size, "mean": t.mean, "std": t.std, "shuffle_buffer": 64, **kw}
    return CacheDataset(str(path or small_cache["path"]), **opts)


def ids(samples) -> list[tuple[int, int]]:
    return [(s.tar, s.position) for s in samples]


def all_ids(m) -> set[tuple[int, int]]:
    return {(t, p) for t, sh in enumerate(m.dataset.shards) for p in range(sh.count)}


@pytest.fixture(scope="module")
def random_epoch(small_cache) -> list[Sample]:
    """Epoch 0 of the random policy at the teacher's size, with fingerprints and all targets."""
    m = small_cache["manifest"]
    names = [*target_arrays(m, logits=True, taps=TAPS), A.VIEW_FINGERPRINT, A.PRED_TOP1]
    return list(make(small_cache, arrays=names, view_policy="random"))


# --- fidelity of what is served ---------------------------------------------------------------


def test_replay_at_teacher_size_is_the_view_the_teacher_saw(random_epoch, small_cache):
    m = small_cache["manifest"]
    assert len(random_epoch) == m.dataset.num_samples == small_cache["digits"]["counts"]["train"] == 359
    x = torch.stack([s.x for s in random_epoch])
    fp = input_fingerprint(x, m.config.targets.fingerprint_size).float().numpy()
    stored = np.stack([s.rows[A.VIEW_FINGERPRINT] for s in random_epoch]).astype(np.float32)
    np.testing.assert_allclose(fp, stored, rtol=1e-3, atol=1e-3)
    assert {s.view for s in random_epoch} == {0, 1}  # both stored views were replayed


def test_rows_match_cache_and_keys_match_tar(random_epoch, small_cache):
    m = small_cache["manifest"]
    store = CacheStore(str(small_cache["path"]), read_only=True)
    units = {(t, v): store.read_unit(m, t, v) for t in range(len(m.dataset.shards)) for v in range(m.num_views)}
    tar_keys = {t: [(s.key, s.label) for s in iter_samples(sh.url)] for t, sh in enumerate(m.dataset.shards)}
    names = set(target_arrays(m, logits=True, taps=TAPS)) | {A.VIEW_FINGERPRINT, A.PRED_TOP1}
    for s in random_epoch:
        rows, p = units[(s.tar, s.view)], s.position
        assert (s.key, s.label) == tar_keys[s.tar][p] == (store.read_index(s.tar)[p], rows[A.LABEL][p])
        assert names <= set(s.rows)
        for name, row in s.rows.items():
            np.testing.assert_array_equal(row, rows[name][p], err_msg=f"{name} {s.key}")
    batch = make(small_cache, taps=TAPS).collate(random_epoch[:16])
    assert batch.x.shape == (16, 3, 32, 32) and batch.labels.tolist() == [s.label for s in random_epoch[:16]]
    assert batch.targets.topk.values.shape == (16, m.logits.k) and set(batch.targets.features) == set(TAPS)
    assert batch.keys == [s.key for s in random_epoch[:16]]


def test_large_target_arrays_are_read_a_chunk_at_a_time_with_the_same_rows(random_epoch, small_cache,
                                                                            monkeypatch):
    """Target arrays too large to hold a whole unit of (ViTKD taps at ImageNet's tar size) are read by
    blocks of ``chunk_rows`` as the stream reaches them: the same samples, order and rows as whole units."""
    m = small_cache["manifest"]
    names = [*target_arrays(m, logits=True, taps=TAPS), A.VIEW_FINGERPRINT, A.PRED_TOP1]
    whole = {n for n in names if m.arrays[n].row_bytes * 120 > stream.WHOLE_UNIT_BYTES}
    assert not whole  # the digits' units are small: random_epoch read every array whole
    monkeypatch.setattr(stream, "WHOLE_UNIT_BYTES", 0)  # now every target array counts as large
    ds = make(small_cache, arrays=names, view_policy="random")
    step = 16
    ds.m = ds.m.model_copy(update={"chunk_rows": step})  # finer than the stored chunks: many blocks a tar
    reads, read_unit = [], CacheStore.read_unit

    def spy(self, m, tar, view, names=None, lo=0, hi=None, **kw):
        reads.append((tar, view, tuple(names or ()), lo, hi))
        return read_unit(self, m, tar, view, names, lo, hi, **kw)

    raw_shard = CacheStore.raw_shard

    def spy_raw(self, tar, view, name):  # an uncompressed array's block: read straight into the samples' buffers
        shard = raw_shard(self, tar, view, name)
        if shard is not None:
            rows_into = shard.rows_into

            def into(lo, hi, dests):
                reads.append((tar, view, (name,), lo, hi))
                return rows_into(lo, hi, dests)

            shard.rows_into = into
        return shard

    monkeypatch.setattr(CacheStore, "read_unit", spy)
    monkeypatch.setattr(CacheStore, "raw_shard", spy_raw)
    got = list(ds)  # every sample kept: a row that viewed a reused buffer would now hold a later block's bytes
    assert ids(got) == ids(random_epoch) and [s.view for s in got] == [s.view for s in random_epoch]
    for a, b in zip(got, random_epoch, strict=True):
        assert set(a.rows) == set(b.rows)
        for name in a.rows:
            np.testing.assert_array_equal(a.rows[name], b.rows[name], err_msg=f"{name} {a.key}")
    raw = [n for n in names if is_raw_sharded(ds.store().array(n))]
    assert raw and len(raw) < len(names)  # both kinds: read straight into the samples' buffers, and by Zarr
    large = [n for n in names if n not in {A.LABEL, A.VALID, *A.VIEW_RECORD_ARRAYS}]
    for s in got[:50]:  # a sample's rows of every large array share the one buffer it keeps
        assert len({id(s.rows[n].base) for n in large}) == 1, s.key
    tap = target_arrays(m, logits=False, taps=["final"])[0]
    by_block = [(t, v, lo, hi) for t, v, n, lo, hi in reads if tap in n]
    count = {t: sh.count for t, sh in enumerate(m.dataset.shards)}
    assert by_block and all(hi == min(lo + step, count[t]) and lo % step == 0 for t, _, lo, hi in by_block)
    assert all(A.LABEL not in n for _, _, n, _, _ in reads if tap in n)  # what a tar needs whole, read whole
    for t, sh in enumerate(m.dataset.shards):  # each block of each view drawn read once
        drawn = random_views(0, 0, t, sh.count, tuple(range(m.num_views)))
        want = sorted((t, int(v), lo, min(lo + step, sh.count)) for lo in range(0, sh.count, step)
                      for v in np.unique(drawn[lo:lo + step]))
        assert sorted(b for b in by_block if b[0] == t) == want


def test_blocks_read_into_reused_buffers_leave_each_sample_the_rows_zarr_reads(small_cache, monkeypatch):
    """The large arrays' rows are read straight into a buffer of each sample's, reused once the sample is gone
    (pipeline.buffers.ReusedBuffers): every sample, kept to the end of the epoch, holds its own rows as Zarr
    reads them, and an epoch after them takes no new memory."""
    m = small_cache["manifest"]
    monkeypatch.setattr(stream, "WHOLE_UNIT_BYTES", 0)
    names = target_arrays(m, logits=False, taps=TAPS)
    ds = make(small_cache, arrays=names)
    ds.m = ds.m.model_copy(update={"chunk_rows": 16})  # several blocks a tar
    got = list(ds)
    assert len(got) == sum(sh.count for sh in m.dataset.shards) and all(is_raw_sharded(ds.store().array(n))
                                                                        for n in names)
    S = m.rows_per_shard
    for name in names:
        arr = ds.store().array(name)  # Zarr's own reader
        for s in got:
            np.testing.assert_array_equal(s.rows[name], arr[s.tar * S + s.position, s.view], err_msg=f"{name} {s.key}")
    made = ds.store().row_buffers.allocated
    assert made == len(got)  # each kept sample's rows in a buffer of its own
    del got, s
    assert sum(1 for _ in ds) == made and ds.store().row_buffers.allocated == made  # all came back: reused


def test_only_requested_arrays_are_read(small_cache):
    m = small_cache["manifest"]
    ds = make(small_cache, logits=False, taps=["final"])
    assert "logits_topk_values" not in ds.read_names and "feat_block0" not in ds.read_names
    assert {A.VIEW_CROP, A.LABEL, A.VALID, "feat_final"} <= set(ds.read_names)
    with pytest.raises(ValueError, match=r"tap 'nope' is not in this cache; it holds \['block0', 'final'\]"):
        make(small_cache, taps=["nope"])
    with pytest.raises(ValueError, match="not in this cache"):
        make(small_cache, arrays=["feat_nope"])
    batch = ds.collate([next(iter(ds))])  # no logits read: only the tap is decoded
    assert not batch.targets.has_logits and list(batch.targets.features) == ["final"]
    assert batch.targets.features["final"].shape == (1, m.features[1].tokens, m.features[1].dim)


# --- view policies, order, splits --------------------------------------------------------------


def test_cycle_policy_sees_each_sample_once_with_the_epochs_view(small_cache):
    m = small_cache["manifest"]
    ds = make(small_cache, size=16, logits=False)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = list(ds)
        assert sorted(ids(got)) == sorted(all_ids(m))
        assert {s.view for s in got} == {epoch % m.num_views} and got[0].x.shape == (3, 16, 16)


def test_max_views_serves_only_the_first_views_with_their_stored_rows(random_epoch, small_cache):
    m = small_cache["manifest"]
    assert m.num_views == 2
    view0 = {(s.tar, s.position): s for s in random_epoch if s.view == 0}
    # cycle's epoch 1 would serve view 1 of a 2-view cache; random draws among the views it may use
    for policy, epoch in (("cycle", 1), ("random", 0)):
        ds = make(small_cache, view_policy=policy, max_views=1, arrays=["logits_topk_values"])
        ds.set_epoch(epoch)
        got = list(ds)
        assert sorted(ids(got)) == sorted(all_ids(m)) and {s.view for s in got} == {0}
        for s in got:  # the row served is view 0's row, the image is view 0's replay
            if (ref := view0.get((s.tar, s.position))) is not None:
                torch.testing.assert_close(s.x, ref.x)
                np.testing.assert_array_equal(s.rows["logits_topk_values"], ref.rows["logits_topk_values"])
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"max_views={bad}: .* holds 2 views per sample; choose 1..2"):
            make(small_cache, max_views=bad)


def test_random_policy_views_and_epochs_differ(random_epoch, small_cache):
    m = small_cache["manifest"]
    assert sorted(ids(random_epoch)) == sorted(all_ids(m))
    for t in range(len(m.dataset.shards)):
        want = random_views(0, 0, t, m.dataset.shards[t].count, range(m.num_views))
        assert all(s.view == want[s.position] for s in random_epoch if s.tar == t)
    ds = make(small_cache, size=16, view_policy="random", logits=False)
    ds.set_epoch(1)
    again = list(ds)
    assert sorted(ids(again)) == sorted(all_ids(m))
    v0 = {(s.tar, s.position): s.view for s in random_epoch}
    v1 = {(s.tar, s.position): s.view for s in again}
    assert 0.3 < np.mean([v0[k] != v1[k] for k in v0]) < 0.7  # fresh draws per epoch
    assert ids(again) != ids(random_epoch)


def test_shuffle_order_depends_on_seed_and_epoch_only(random_epoch, small_cache):
    ds = make(small_cache, size=8, view_policy="random", logits=False)
    assert ids(ds) == ids(random_epoch)  # same seed and epoch: same order, whatever the size

    def plan(seed, epoch):  # tars in order and the buffer's order, planned before any read
        tasks, order = make(small_cache, seed=seed, logits=False).plan.consumer_order(epoch, 0, 1)
        return [t.tar for t in tasks], order.tolist()

    assert plan(0, 0) == plan(0, 0)
    assert plan(1, 0) != plan(0, 0) != plan(0, 1)
    shards = [s.tar for s in random_epoch]
    second = next(i for i, t in enumerate(shards) if t != shards[0])
    assert shards[0] in shards[second:second + 64]  # the buffer mixes units read in turn
    order = shuffle_order(1000, 64, np.random.default_rng(0))
    assert sorted(order) == list(range(1000)) and all(order[k] < k + 64 for k in range(1000))
    assert shuffle_order(5, 0, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]


def test_two_ranks_two_workers_see_every_sample_once(small_cache):
    m = small_cache["manifest"]
    seen: list[tuple[int, int]] = []
    consumers = collections.Counter()
    for rank in range(2):
        ds = make(small_cache, size=8, logits=False, rank=rank, world_size=2)
        ds.set_epoch(3)
        for b in DataLoader(ds, batch_size=50, num_workers=2, collate_fn=collate_rows):
            seen += list(zip(b["tar"].tolist(), b["position"].tolist(), strict=True))
            consumers.update(b["consumer"])
            assert b["num_consumers"] == 4 and set(b["view"].tolist()) == {1}
    assert len(seen) == len(set(seen)) and set(seen) == all_ids(m)
    assert sorted(consumers) == [0, 1, 2, 3]  # 4 tars: one each


def test_drop_uneven_equalises_deterministically(small_cache):
    m = small_cache["manifest"]
    got = [list(make(small_cache, size=8, logits=False, rank=r, world_size=3, drop_uneven=True)) for r in range(3)]
    quota = min(sh.count for sh in m.dataset.shards)  # ranks hold 2, 1 and 1 tars
    assert [len(g) for g in got] == [quota] * 3
    flat = [i for g in got for i in ids(g)]
    assert len(set(flat)) == len(flat)
    ds = make(small_cache, size=8, logits=False, rank=0, world_size=3, drop_uneven=True)
    assert ds.num_samples() == quota and ids(ds) == ids(got[0])
    assert make(small_cache, logits=False, rank=0, world_size=3).num_samples() > quota  # default: off


# --- exact resume --------------------------------------------------------------------------------


def test_resume_mid_epoch_yields_exactly_the_remaining_samples(small_cache):
    def run(ds, stop=None):
        out = []
        for i, b in enumerate(ds.loader(batch_size=40, num_workers=2), start=1):
            out += list(zip(b.tars.tolist(), b.positions.tolist(), b.views.tolist(), strict=True))
            if i == stop:  # a batch handed out counts as consumed: stop after using it
                break
        return out

    kw = {"size": 8, "logits": False, "view_policy": "random", "seed": 5}
    full_ds = make(small_cache, **kw)
    full_ds.set_epoch(2)
    full = run(full_ds)
    ds = make(small_cache, **kw)
    ds.set_epoch(2)
    head = run(ds, stop=7)  # an odd number of batches: the resumed loader must start at worker 1
    state = merge_states([ds.state_dict()])
    assert state["epoch"] == 2 and sum(state["consumed"].values()) == len(head) == 280
    resumed = make(small_cache, **kw)
    resumed.load_state_dict(state)
    tail = run(resumed)
    assert head + tail == full and len(set(full)) == small_cache["manifest"].dataset.num_samples
    with pytest.raises(ValueError, match="seed=5"):
        make(small_cache, **{**kw, "seed": 6}).load_state_dict(state)
    wrong = make(small_cache, **kw)
    wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="same world size and workers"):
        next(iter(wrong))  # in-process: 1 consumer, the state counted 2


# --- read-only and partial caches ----------------------------------------------------------------


class NoWriteFS(fsspec.AbstractFileSystem):
    """Local files behind ``kdcachero://``; every write raises and is recorded."""

    protocol = "kdcachero"
    attempts: list[str] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("kdcachero://"):] if path.startswith("kdcachero://") else path
        return LocalFileSystem._strip_protocol(path)

    def _refuse(self, what, path, *args, **kwargs):
        NoWriteFS.attempts.append(f"{what} {path}")
        raise PermissionError(f"read-only test filesystem: {what} {path}")

    def ls(self, path, detail=True, **kwargs):
        return self.local.ls(path, detail=detail)

    def info(self, path, **kwargs):
        return self.local.info(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self.local.cat_file(path, start=start, end=end)

    def _open(self, path, mode="rb", **kwargs):
        if set(mode) - {"r", "b"}:
            self._refuse(f"open({mode!r})", path)
        return self.local._open(path, mode)

    def pipe_file(self, path, *a, **k):
        self._refuse("pipe_file", path)

    def put_file(self, lpath, rpath, *a, **k):
        self._refuse("put_file", rpath)

    def rm_file(self, path, *a, **k):
        self._refuse("rm_file", path)

    def rm(self, path, *a, **k):
        self._refuse("rm", path)

    def mkdir(self, path, *a, **k):
        self._refuse("mkdir", path)

    def makedirs(self, path, *a, **k):
        self._refuse("makedirs", path)

    def mv(self, path1, path2, *a, **k):
        self._refuse("mv", path1)

    def cp_file(self, path1, path2, *a, **k):
        self._refuse("cp_file", path2)

    def touch(self, path, *a, **k):
        self._refuse("touch", path)


def test_cache_is_only_read(small_cache):
    fsspec.register_implementation("kdcachero", NoWriteFS, clobber=True)
    NoWriteFS.attempts.clear()
    url = f"kdcachero://{small_cache['path']}"
    with pytest.raises(PermissionError):  # the guard works
        fsspec.filesystem("kdcachero").pipe_file(f"{small_cache['path']}/x", b"")
    NoWriteFS.attempts.clear()
    ds = make(small_cache, url, size=8, taps=TAPS)
    assert ds.store().read_only and isinstance(ds.store().fs, NoWriteFS)
    got = list(ds)
    assert sorted(ids(got)) == sorted(all_ids(small_cache["manifest"])) and NoWriteFS.attempts == []


def test_partial_cache_refused_unless_asked_then_only_completed_units(small_cache, tmp_path):
    path = tmp_path / "partial.zarr"
    shutil.copytree(small_cache["path"], path)
    store = CacheStore(str(path))
    dropped = {(0, 0), (1, 1), (2, 0), (2, 1)}
    for s, v in dropped:
        (path / layout.unit_record_path(s, v)).unlink()
    store.write_manifest(small_cache["manifest"].model_copy(update={"status": "building", "units_complete": 4}))
    with pytest.raises(CacheNotReadyError, match="--allow-partial"):
        make(small_cache, path, logits=False)
    m = small_cache["manifest"]
    cycle = list(make(small_cache, path, size=8, logits=False, allow_partial=True))  # epoch 0: view 0
    assert sorted(ids(cycle)) == sorted(i for i in all_ids(m) if i[0] in (1, 3))
    rand = list(make(small_cache, path, size=8, logits=False, allow_partial=True, view_policy="random"))
    assert sorted(ids(rand)) == sorted(i for i in all_ids(m) if i[0] != 2)
    assert all((s.tar, s.view) not in dropped for s in rand)
    assert {s.view for s in rand if s.tar == 3} == {0, 1}


# --- eval and mixup --------------------------------------------------------------------------------


def test_eval_loader_centre_crops_val_tars(digits):
    loader = eval_loader(digits["val"], 24, (0.5,) * 3, (0.5,) * 3, batch_size=100, crop_pct=0.875)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (digits["counts"]["val"], 3, 24, 24) and y.dtype == torch.int64
    first = next(iter_samples(loader.dataset.urls[0]))
    want = eval_view(first.image, size=24, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    assert torch.equal(x[0], want) and int(y[0]) == first.label


def test_check_mix_allows_only_the_caches_own_mix():
    from storage_schemas.views import MixRecipe

    check_mix("c.zarr", None, None, None)
    check_mix("c.zarr", None, 0.0, 0.0)  # an unmixed cache, said explicitly
    with pytest.raises(ConfigError, match=r"^data.mixup=0.8, data.cutmix=0.0: the cache c.zarr holds unmixed views") as e:
        check_mix("c.zarr", None, 0.8, None)
    assert "views.mix: {mixup_alpha: 0.8, cutmix_alpha: 0.0}" in str(e.value)
    mix = MixRecipe(mixup_alpha=0.1, cutmix_alpha=1.0)
    check_mix("c.zarr", mix, None, None)
    check_mix("c.zarr", mix, 0.1, None)
    check_mix("c.zarr", mix, 0.1, 1.0)
    for mixup, cutmix in ((0.0, None), (0.8, 1.0), (None, 0.5)):
        with pytest.raises(ConfigError, match="do not match the cache c.zarr") as e:
            check_mix("c.zarr", mix, mixup, cutmix)
        assert "views.mix: mixup_alpha=0.1, cutmix_alpha=1.0," in str(e.value) and "leave data.mixup" in str(e.value)


# --- repeated augmentation (data.aug_repeats) -------------------------------------------------------


def test_aug_repeats_every_sample_r_times_through_different_views_over_ranks_and_workers(small_cache):
    """R = 2 on the 2-view cache, 2 ranks x 2 workers: each cached sample exactly twice per epoch, once per view;
    the next epoch takes the views in turn again."""
    m = small_cache["manifest"]
    for epoch in (0, 3):
        seen: collections.Counter = collections.Counter()
        for rank in range(2):
            ds = make(small_cache, size=8, logits=False, rank=rank, world_size=2, aug_repeats=2)
            ds.set_epoch(epoch)
            n = 0
            for b in DataLoader(ds, batch_size=50, num_workers=2, collate_fn=collate_rows):
                seen.update(zip(b["tar"].tolist(), b["position"].tolist(), b["view"].tolist(), strict=True))
                n += len(b["key"])
            assert n == ds.num_samples(2)
        assert set(seen.values()) == {1}  # no (sample, view) twice
        assert {(t, p) for t, p, _ in seen} == all_ids(m) and len(seen) == 2 * len(all_ids(m))
    with pytest.raises(ConfigError, match=r"data.aug_repeats=3: the cache serves 2 views per sample"):
        make(small_cache, size=8, logits=False, aug_repeats=3)
    with pytest.raises(ConfigError, match=r"data.aug_repeats=2: the cache serves 1 views"):
        make(small_cache, size=8, logits=False, aug_repeats=2, max_views=1)
    with pytest.raises(ConfigError, match=r"data.aug_repeats=2 needs data.view_policy: cycle"):
        make(small_cache, size=8, logits=False, aug_repeats=2, view_policy="random")


def test_aug_repeats_resume_mid_epoch_is_exact(small_cache):
    def run(ds, stop=None):
        out = []
        for i, b in enumerate(ds.loader(batch_size=40, num_workers=2), start=1):
            out += list(zip(b.tars.tolist(), b.positions.tolist(), b.views.tolist(), strict=True))
            if i == stop:
                break
        return out

    kw = {"size": 8, "logits": False, "seed": 5, "aug_repeats": 2}
    full_ds = make(small_cache, **kw)
    full_ds.set_epoch(1)
    full = run(full_ds)
    ds = make(small_cache, **kw)
    ds.set_epoch(1)
    head = run(ds, stop=9)  # mid-epoch, an odd number of batches (the resumed loader starts at worker 1)
    state = merge_states([ds.state_dict()])
    assert state["aug_repeats"] == 2 and sum(state["consumed"].values()) == len(head) == 360
    resumed = make(small_cache, **kw)
    resumed.load_state_dict(state)
    assert head + run(resumed) == full
    assert len(full) == 2 * small_cache["manifest"].dataset.num_samples == len(set(full))
    with pytest.raises(ConfigError, match="aug_repeats=2, this run has 1"):
        make(small_cache, **{**kw, "aug_repeats": 1}).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "aug_repeats"}  # a state saved before aug_repeats existed
    make(small_cache, **{**kw, "aug_repeats": 1}).load_state_dict(old)


class _Rows(torch.utils.data.Dataset):
    """Rows of three dtypes (fp16 taps, a uint8 code, a scalar) and an image, as a cache's samples carry them."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        g = np.random.default_rng(i)
        return {"tap": g.standard_normal((3, 5, 7)).astype(np.float16), "code": g.integers(0, 255, 4, np.uint8),
                "scalar": np.int64(i), "x": torch.from_numpy(g.standard_normal((3, 4, 4)).astype(np.float32))}


def _stacked(items: list[dict]) -> dict:
    from student.batch import stack

    return {k: stack([it[k] for it in items]) for k in items[0]}


def test_stack_fills_shared_memory_in_a_worker_with_the_rows_stacked_by_numpy():
    """A worker's batch is stacked straight into shared memory (no second copy on its way out), in the main
    process into private memory; either way the values are NumPy's own stack of the rows."""
    from student.batch import stack

    items = [_Rows()[i] for i in range(3)]
    for k in items[0]:
        want = np.stack([np.asarray(it[k]) for it in items])
        for shared in (False, True):
            got = stack([it[k] for it in items], shared)
            assert got.is_shared() == shared and got.dtype == torch.from_numpy(want).dtype
            assert np.array_equal(got.numpy(), want), k
    assert not _stacked(items)["tap"].is_shared()  # outside a worker: private
    worker = next(iter(DataLoader(_Rows(), batch_size=3, num_workers=1, collate_fn=_stacked)))
    main = _stacked(items)
    assert all(torch.equal(worker[k], main[k]) for k in main)
