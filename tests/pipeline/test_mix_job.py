"""Mixed views in the caching job (issue 14 item 2): targets are the teacher's outputs on the mixed image.

The reference is the live teacher (timm, loaded directly) on the mixed input rebuilt from the stored records: the
sample's and its partner's views replayed with ``apply_view`` and mixed with ``mix_views``.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.store import CacheStore
from pipeline.targets import input_fingerprint
from pipeline.tars import Sample, iter_samples
from pipeline.unit import UnitRunner
from pipeline.views import apply_view, mix_block, mix_views, sample_view
from storage_schemas import SCHEMA_VERSION
from storage_schemas import arrays as A
from storage_schemas.config import CacheConfig
from storage_schemas.version import parse_version
from storage_schemas.views import MixRecipe, MixRecord, ViewRecipe
from tests.conftest import MIX, cache_config

from .test_job import data_files, live_teacher


def _build(digits: dict, teacher: dict, out) -> tuple:
    from pipeline.job import build_cache_in_process

    cfg = CacheConfig.model_validate(cache_config(digits, teacher, str(out), views__mix=MIX))
    return cfg, build_cache_in_process(cfg, log=lambda s: None)


def test_mixed_targets_are_the_live_teacher_on_the_mixed_image(mixed_cache, tiny_teacher):
    m, cfg = mixed_cache["manifest"], mixed_cache["cfg"]
    assert m.status == "complete" and set(A.VIEW_MIX_ARRAYS) <= set(m.arrays)
    store = CacheStore(str(mixed_cache["path"]), read_only=True)
    model = live_teacher(tiny_teacher)
    modes: Counter = Counter()
    checked = 0
    for tar in range(len(m.dataset.shards)):
        samples = list(iter_samples(m.dataset.shards[tar].url))
        for view in range(m.num_views):
            rows = store.read_unit(m, tar, view)
            for pos, s in enumerate(samples):
                rec = A.decode_view(rows, pos)
                modes[rec.mix.mode] += 1
                if rec.mix.mode == "none":
                    continue
                q = rec.mix.partner
                assert q != pos and 0 <= q < len(samples) and rows[A.VALID][q] == 1  # same tar, never itself
                assert q in mix_block(pos, len(samples), cfg.views.mix.window)
                kw = dict(size=m.teacher.input_size, mean=m.teacher.mean, std=m.teacher.std)
                x = mix_views(apply_view(s.image, rec, cfg.views, **kw),
                              apply_view(samples[q].image, A.decode_view(rows, q), cfg.views, **kw), rec.mix)[None]
                # the replayed mixed input is the one the teacher saw
                np.testing.assert_array_equal(input_fingerprint(x, cfg.targets.fingerprint_size)[0].numpy(),
                                              rows[A.VIEW_FINGERPRINT][pos])
                if checked < 40:
                    with torch.no_grad():
                        final, _ = model.forward_intermediates(x, indices=[0], output_fmt="NLC")
                        probs = model.forward_head(final)[0].softmax(-1).numpy()
                    np.testing.assert_allclose(rows["feat_final"][pos], final[0, model.num_prefix_tokens:].numpy(),
                                               atol=2e-2, rtol=1e-2)
                    idx = rows["logits_topk_indices"][pos]
                    rebuilt = np.exp(rows["logits_topk_values"][pos].astype(np.float64) - rows["logits_logsumexp"][pos])
                    np.testing.assert_allclose(rebuilt, probs[idx], atol=2e-3)
                    checked += 1
    assert checked == 40 and modes["mixup"] > 50 and modes["cutmix"] > 50 and modes["none"] > 10


def test_mixed_rerun_is_byte_identical(mixed_cache, small_digits, tiny_teacher, tmp_path):
    _, again = _build(small_digits, tiny_teacher, tmp_path / "again.zarr")
    a, b = data_files(mixed_cache["path"]), data_files(tmp_path / "again.zarr")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert again.identity == mixed_cache["manifest"].identity
    # the stored manifest reads back with its mix recipe and recomputes its identity
    stored = CacheStore(str(tmp_path / "again.zarr"), read_only=True).read_manifest()
    assert stored.config.views.mix == MixRecipe(**MIX)
    assert stored.schema_version == SCHEMA_VERSION and parse_version(stored.schema_version) >= (1, 6)
    assert stored.content_identity() == again.identity


# --- the mixing stage on its own: bad and missing partners, memory ------------------------


def _stage(count: int, window: int = 128, prob: float = 1.0):
    recipe = ViewRecipe(randaugment=None, erase=None, mix={"mixup_alpha": 1.0, "cutmix_alpha": 1.0,
                                                             "window": window, "prob": prob})
    runner = UnitRunner.__new__(UnitRunner)  # the stage needs the recipe and the tar's count, no teacher
    runner.cfg = SimpleNamespace(views=recipe)
    runner.m = SimpleNamespace(dataset=SimpleNamespace(shards=[SimpleNamespace(count=count)]))
    views = {}
    for p in range(count):
        rec = sample_view(recipe, tar=0, position=p, view=0, width=8, height=8, count=count)
        views[p] = Sample(key=str(p), position=p, image=object(), label=0, meta=None, record=rec, view=0,
                          x=torch.full((3, 4, 4), float(p)))
    return runner, views


@pytest.mark.parametrize("window", [4, 128])
def test_stage_mixes_with_the_partners_own_view_in_any_order(window):
    runner, views = _stage(12, window)
    out = {s.position: s for s in runner.mixed(iter(views.values()), 0, 0)}
    assert sorted(out) == list(range(12))
    for p, s in out.items():
        assert s.record == views[p].record
        q = s.record.mix.partner
        want = views[p].x if s.record.mix.mode == "none" else mix_views(views[p].x, views[q].x, s.record.mix)
        torch.testing.assert_close(s.x, want, rtol=0, atol=0)


@pytest.mark.parametrize("window", [5, 128])
def test_stage_unmixes_views_whose_partner_is_bad_or_missing(window):
    runner, views = _stage(12, window)
    partners = [v.record.mix.partner for v in views.values() if v.record.mix.mode != "none"]
    bad = Counter(q for q in partners if q < 10).most_common(1)[0][0]
    views[bad] = Sample(key=str(bad), position=bad, image=None, label=None, meta=None, skip_reason="broken")
    truncated = [views[p] for p in range(10)]  # the tar ends early: positions 10 and 11 never come
    out = {s.position: s for s in runner.mixed(iter(truncated), 0, 0)}
    assert sorted(out) == list(range(10)) and out[bad].image is None
    for p, s in out.items():
        if p == bad:
            continue
        drawn = views[p].record.mix
        if drawn.mode != "none" and drawn.partner in (bad, 10, 11):
            assert s.record.mix == MixRecord() and s.x is views[p].x  # unmixed, and the record says so
        else:
            assert s.record == views[p].record


@pytest.mark.parametrize("window", [16, 64])
def test_stage_holds_at_most_one_block_of_views(window):
    """Partners stay in their block, so the stage never holds more than ``window`` own views (a 300-sample tar,
    every view mixed): the bound the docstring of ``UnitRunner.mixed`` states."""
    count = 300
    runner, views = _stage(count, window)
    assert all(v.record.mix.mode != "none" for v in views.values())
    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # own views not yet freed
    peak = 0

    def stream():
        nonlocal peak
        for p in range(count):
            s = views.pop(p)  # the stream owns it from here: nothing outside the stage keeps it
            alive[p] = s.x
            yield s
            del s
            peak = max(peak, len(alive))

    out = 0
    for s in runner.mixed(stream(), 0, 0):
        assert s.record.mix.mode != "none"
        out += 1
        del s
    assert out == count and 0 < peak <= window


# --- the tools on a mixed cache: verify replays the mix, inspect shows it (training: tests/student/test_mix_train.py)


def test_verify_replays_mixed_views(mixed_cache, tiny_teacher, monkeypatch):
    from pipeline import views
    from pipeline.verify import verify_cache

    store = CacheStore(str(mixed_cache["path"]), read_only=True)
    rep = verify_cache(store, teacher_checkpoint=tiny_teacher["checkpoint"], samples=32, progress=False)
    assert rep.ok, rep.problems
    assert rep.checked["teacher views replayed"] == 32
    # the mix is what makes them agree: replayed unmixed, the live teacher differs from the cache
    monkeypatch.setattr(views, "mix_views", lambda x, partner, mix: x)
    rep = verify_cache(store, teacher_checkpoint=tiny_teacher["checkpoint"], samples=32, progress=False)
    assert not rep.ok and any("differs" in p or "agrees" in p for p in rep.problems)


def test_inspect_shows_the_mix_recipe(mixed_cache, small_cache):
    from jobs.report import format_summary

    s = mixed_cache["manifest"].summary()
    assert s["mix"] == MixRecipe(**MIX).model_dump(mode="json")
    text = format_summary(json.loads(json.dumps(s)), "c.zarr")  # as inspect --json would give it
    line = next(x for x in text.splitlines() if x.startswith("mix "))
    assert "mixup_alpha=0.8" in line and "cutmix_alpha=1.0" in line and "window=32" in line
    plain = small_cache["manifest"].summary()
    assert plain["mix"] is None
    assert not any(x.startswith("mix ") for x in format_summary(plain, "c.zarr").splitlines())


def test_supervised_run_refuses_mixed_views():
    from student.config import DataOptions

    with pytest.raises(ValueError, match="data.views.mix: supervised training"):
        DataOptions(train_urls="x.tar", views={"mix": {"mixup_alpha": 0.2}})
    assert DataOptions(train_urls="x.tar", views={}).views.mix is None
    from student.config import TrainConfig

    with pytest.raises(ValueError, match=r"data.mixup=0.8, data.cutmix=None: supervised training .* does not mix"):
        TrainConfig(student={"model": "resnet18"}, data={"train_urls": "x.tar", "mixup": 0.8}, output="o")
