"""Training from a cache of mixed views (issue 14, item 3): the student's batch holds the mixed image the teacher
saw, its label is timm's ``mixup_target`` with the recorded λ, and ``data.mixup``/``data.cutmix`` may only restate
the cache's mix.

References are independent of the trainer's data path: the two samples decoded from the tar, their records read
from the store, the mix done here by hand from the recorded λ and box; timm's ``mixup_target`` and losses; the live
timm teacher on the batch's image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from pipeline.store import CacheStore
from pipeline.tars import Sample, iter_samples
from pipeline.views import apply_view, mix_block, sample_mix, sample_view
from storage_schemas import arrays as A
from storage_schemas.errors import CacheError
from storage_schemas.views import MixRecord, ViewRecord
from student.batch import mix_labels
from student.config import OnlineTeacher, TrainConfig
from student.data import CacheDataset
from student.stream import with_partners
from student.trainer import Trainer
from tests.conftest import MIX, TINY_VIT

ROOT = Path(__file__).resolve().parents[2]
NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


def by_hand(own: torch.Tensor, partner: torch.Tensor, mix: MixRecord) -> torch.Tensor:
    """timm's ``Mixup._mix_elem`` for one element, written out: λ·a + (1−λ)·b, or b's box pasted into a."""
    if mix.mode == "mixup":
        return own * mix.lam + partner * (1.0 - mix.lam)
    h, w = own.shape[-2:]
    x0, y0, bw, bh = mix.box
    yl, yh = int(np.clip(round(y0 * h), 0, h)), int(np.clip(round((y0 + bh) * h), 0, h))
    xl, xh = int(np.clip(round(x0 * w), 0, w)), int(np.clip(round((x0 + bw) * w), 0, w))
    out = own.clone()
    out[:, yl:yh, xl:xh] = partner[:, yl:yh, xl:xh]
    # the recorded λ is the pasted area's complement, up to the edges' rounding (< 1 pixel per side) at this size
    assert abs((1 - (yh - yl) * (xh - xl) / (h * w)) - mix.lam) <= (h + w + 1) / (h * w)
    return out


class Tars:
    """Decoded samples and stored unit rows, read directly (not through the student's data path)."""

    def __init__(self, cache: dict) -> None:
        self.m, self.recipe = cache["manifest"], cache["cfg"].views
        self.store = CacheStore(str(cache["path"]), read_only=True)
        self.images = {t: [s.image for s in iter_samples(sh.url)] for t, sh in enumerate(self.m.dataset.shards)}
        self.labels = {t: [s.label for s in iter_samples(sh.url)] for t, sh in enumerate(self.m.dataset.shards)}
        self.units: dict = {}

    def rows(self, tar: int, view: int) -> dict:
        if (tar, view) not in self.units:
            self.units[tar, view] = self.store.read_unit(self.m, tar, view)
        return self.units[tar, view]


@pytest.fixture(scope="module")
def tars(mixed_cache) -> Tars:
    return Tars(mixed_cache)


@pytest.mark.parametrize("policy", ["cycle", "random"])
def test_batch_holds_the_mix_rebuilt_by_hand_and_its_mixed_label(mixed_cache, tars, policy):
    """Every sample of an epoch, at a student size (24) unlike the teacher's (32): the batch's image is the
    sample's and its partner's stored views (each by its own record of the sample's view) mixed by hand with the
    recorded λ and box; the batch's λ and partner label are the record's."""
    m = mixed_cache["manifest"]
    ds = CacheDataset(str(mixed_cache["path"]), size=24, view_policy=policy, seed=3, shuffle_buffer=64, **NORM)
    ds.set_epoch(1)
    modes: Counter = Counter()
    for batch in ds.loader(50):
        soft = batch.soft_labels(m.teacher.num_classes)
        for i in range(len(batch.keys)):
            t, p, v = int(batch.tars[i]), int(batch.positions[i]), int(batch.views[i])
            rows = tars.rows(t, v)
            rec = A.decode_view(rows, p)
            own = apply_view(tars.images[t][p], rec, tars.recipe, size=24, **NORM)
            mix = rec.mix
            modes[mix.mode] += 1
            y = tars.labels[t][p]
            if mix.mode == "none":
                torch.testing.assert_close(batch.x[i], own, rtol=0, atol=0)
                assert float(batch.lam[i]) == 1.0 and int(batch.partner_labels[i]) == y
                want = torch.nn.functional.one_hot(torch.tensor(y), 10).float()
            else:
                q = mix.partner
                assert q != p and q in mix_block(p, m.dataset.shards[t].count, MIX["window"])
                # the partner by its record of *this* view (under policy random it may be drawn with another)
                partner = apply_view(tars.images[t][q], A.decode_view(rows, q), tars.recipe, size=24, **NORM)
                torch.testing.assert_close(batch.x[i], by_hand(own, partner, mix), rtol=0, atol=2e-6)
                assert float(batch.lam[i]) == mix.lam and int(batch.partner_labels[i]) == tars.labels[t][q]
                want = torch.zeros(10)
                want[y] += mix.lam
                want[tars.labels[t][q]] += 1 - mix.lam
            torch.testing.assert_close(soft[i], want, rtol=0, atol=1e-6)
    assert sum(modes.values()) == m.stats.num_valid_rows // m.num_views
    assert modes["mixup"] > 50 and modes["cutmix"] > 50 and modes["none"] > 10


def test_partner_classes_are_as_independent_as_timms_reversed_batch_pairs(mixed_cache, tars):
    """timm pairs sample i with sample B-1-i of a shuffled batch, so a partner's class is independent of the
    sample's: a share sum_c p_c^2 of the pairs share a class. Our partner comes from the sample's block of
    ``window`` positions of its tar: the same holds as far as the tar is not ordered by class. Measured on the
    digits cache against timm's reversal on shuffled batches of its labels; and a tar sorted by class fails it."""
    m = mixed_cache["manifest"]
    same = []
    for t, sh in enumerate(m.dataset.shards):
        for v in range(m.num_views):
            rows = tars.rows(t, v)
            for p in range(sh.count):
                mix = A.decode_view(rows, p).mix
                if mix.mode != "none":
                    same.append(tars.labels[t][p] == tars.labels[t][mix.partner])
    labels = np.concatenate([tars.labels[t] for t in range(len(m.dataset.shards))])
    rng = np.random.default_rng(0)
    timm_same = []
    for _ in range(100):  # timm: batches of 64 of a shuffled epoch, each sample mixed with its reversed-order twin
        order = labels[rng.permutation(len(labels))]
        for b in range(len(order) // 64):
            batch = order[b * 64:(b + 1) * 64]
            timm_same += list(batch == batch[::-1])
    prior = float(((np.bincount(labels) / len(labels)) ** 2).sum())  # ~0.1 for 10 balanced classes
    assert abs(np.mean(timm_same) - prior) < 0.01
    assert len(same) > 500 and abs(np.mean(same) - np.mean(timm_same)) < 0.05  # ~4 binomial s.d. of ours
    # the same draw on a tar written in class order: the partner mostly shares the class
    sorted_labels = np.repeat(np.arange(10), 100)
    recipe = mixed_cache["cfg"].views
    partners = [sample_mix(recipe, tar=0, position=p, view=v, count=1000) for p in range(1000) for v in range(2)]
    assert np.mean([sorted_labels[p // 2] == sorted_labels[r.partner] for p, r in enumerate(partners)
                    if r.mode != "none"]) > 0.5


def test_random_policy_mixes_with_the_partners_record_of_the_same_view(mixed_cache, tars):
    """Under policy ``random`` a sample and its partner are often drawn with different views this epoch; the mix
    must still use the partner's record of the sample's view (the one the teacher saw)."""
    ds = CacheDataset(str(mixed_cache["path"]), size=32, view_policy="random", seed=5, shuffle=False, **NORM)
    ds.set_epoch(0)
    drawn = {(s.tar, s.position): s.view for s in ds}
    crossed = 0
    for s in ds:
        if s.partner is None:
            continue
        if drawn[s.tar, s.partner.position] != s.view:
            crossed += 1
        assert s.partner.record == A.decode_view(tars.rows(s.tar, s.view), s.partner.position)
    assert crossed > 30


def test_mixed_labels_are_timms_mixup_target_and_ce_bce_are_timms_losses():
    g = torch.Generator().manual_seed(0)
    B, C = 64, 10
    y_a, y_b = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g)
    lam[:5] = 1.0  # unmixed views
    z = torch.randn(B, C, generator=g)

    def timm_target(smoothing: float) -> torch.Tensor:  # timm pairs i with B-1-i: one 2-batch per element
        return torch.stack([mixup_target(torch.stack([y_a[i], y_b[i]]), C, float(lam[i]), smoothing)[0]
                            for i in range(B)])

    ours = mix_labels(y_a, y_b, lam, C)
    torch.testing.assert_close(ours, timm_target(0.0), rtol=0, atol=1e-7)
    import timm

    from student.methods import TeacherContext, build_methods, student_info
    from student.methods.base import StudentOutput
    from student.targets import TeacherTargets

    info = student_info(timm.create_model(TINY_VIT["model"], **TINY_VIT["model_kwargs"]), 32)
    out, none = StudentOutput(logits=z), TeacherTargets(C)
    for eps in (0.0, 0.1):
        ce = build_methods("ce", {"ce": {"label_smoothing": eps}}, info, TeacherContext(C))[0]
        want = SoftTargetCrossEntropy()(z, timm_target(eps))
        torch.testing.assert_close(ce(out, none, ours)["loss_ce"], want, rtol=1e-6, atol=1e-7)
        for thresh, bce_sum in ((None, False), (0.2, True)):
            opts = {"label_smoothing": eps, "loss": "bce", "bce_target_thresh": thresh, "bce_sum": bce_sum}
            bce = build_methods("ce", {"ce": opts}, info, TeacherContext(C))[0]
            # timm's train.py with mixup: smoothing in the target, BinaryCrossEntropy on the dense target
            want = BinaryCrossEntropy(target_threshold=thresh, sum_classes=bce_sum)(z, timm_target(eps))
            torch.testing.assert_close(bce(out, none, ours)["loss_ce"], want, rtol=1e-6, atol=1e-7)


def test_nkd_takes_the_dominant_class_of_a_mixed_label():
    """NKD needs a target class: with mixed labels it takes the argmax (the official code's choice), i.e. the
    class with the larger λ share, so it equals NKD on those hard labels."""
    import timm

    from student.methods import TeacherContext, build_methods, student_info
    from student.methods.base import StudentOutput
    from student.targets import TeacherTargets

    g = torch.Generator().manual_seed(1)
    B, C = 16, 10
    y_a, y_b = torch.randint(0, C, (B,), generator=g), (torch.arange(B) + 3) % C
    lam = torch.rand(B, generator=g)
    info = student_info(timm.create_model(TINY_VIT["model"], **TINY_VIT["model_kwargs"]), 32)
    nkd = build_methods("nkd", {}, info, TeacherContext(C))[0]
    out = StudentOutput(logits=torch.randn(B, C, generator=g))
    targets = TeacherTargets(C, logits=torch.randn(B, C, generator=g))
    dominant = torch.where(lam >= 0.5, y_a, y_b)
    torch.testing.assert_close(nkd(out, targets, mix_labels(y_a, y_b, lam, C))["loss_nkd"],
                               nkd(out, targets, dominant)["loss_nkd"])


# --- the trainer: online teacher on the mixed views, fresh mixed views ----------------------------------------


def train_config(cache: dict, out: Path, **data) -> TrainConfig:
    return TrainConfig.model_validate({
        "cache": {"url": str(cache["path"])},
        "student": {"model": TINY_VIT["model"], "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                    "model_kwargs": {**TINY_VIT["model_kwargs"], "embed_dim": 32}},
        "methods": "ce+kd+vitkd",
        "method_options": {"vitkd": {"shallow_taps": [{"name": "block0", "index": 0}], "student_shallow": [0]}},
        "data": {"batch_size": 64, "shuffle_buffer": 128, **data},
        "optim": {"epochs": 1, "lr": 3e-3, "warmup_epochs": 0}, "output": str(out), "log_every": 1})


def test_online_teacher_on_the_mixed_views_reproduces_the_cached_targets(mixed_cache, tiny_teacher, tmp_path):
    """The extension of tests/student/test_trainer.py's equivalence test to a mixed cache: same batches, same
    mixed images, the live teacher on them gives the cached targets (fp16 rounding), and the losses agree."""
    from tests.pipeline.test_job import live_teacher

    cached = Trainer(train_config(mixed_cache, tmp_path / "c"), progress=False)
    cfg = train_config(mixed_cache, tmp_path / "o")
    cfg.online_teacher = OnlineTeacher(checkpoint=tiny_teacher["checkpoint"], views="cached")
    online = Trainer(cfg, progress=False)
    model = live_teacher(tiny_teacher)
    for t in (cached, online):
        t.dataset.set_epoch(0)
    compared = mixed = 0
    for a, b in zip(cached.dataset.loader(64), online.dataset.loader(64), strict=True):
        assert a.keys == b.keys and torch.equal(a.x, b.x) and torch.equal(a.lam, b.lam)
        torch.testing.assert_close(b.x_teacher, a.x, rtol=0, atol=0)  # the student's size and norm are the teacher's
        mixed += int((a.lam < 1).sum())
        ta, tb = a.targets, online.targets(b)
        for tap in ("block0", "final"):
            torch.testing.assert_close(ta.features[tap], tb.features[tap], atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ta.topk.values, tb.topk.values, atol=2e-2, rtol=1e-2)
        # the timm teacher itself, on the trainer's mixed image: its probabilities are the cached ones
        with torch.no_grad():
            probs = model(a.x).softmax(-1)
        cached_p = (ta.topk.values - ta.topk.logsumexp[:, None]).exp()
        torch.testing.assert_close(cached_p, probs.gather(1, ta.topk.indices.long()), atol=2e-3, rtol=0)
        with torch.no_grad():
            la = cached.model(a.x, ta, cached.labels(a), 0)
            lb = online.model(b.x, tb, online.labels(b), 0)
        assert cached.labels(a).shape == (len(a.keys), 10)
        for k in ("loss", "loss_ce", "loss_kd", "loss_vitkd_lr", "loss_vitkd_gen"):
            assert float(la[k]) == pytest.approx(float(lb[k]), rel=1e-3, abs=1e-6), k
        compared += 1
        if compared == 3:
            break
    assert compared == 3 and mixed > 100


def test_fresh_views_of_a_mixed_cache_are_fresh_mixes(mixed_cache, tars, tiny_teacher):
    """``--online-views fresh``: each sample gets view ``num_views + epoch`` drawn from the recipe, mixed too, with
    a partner among the cached samples of its block, replayed for student and teacher alike."""
    m, recipe = mixed_cache["manifest"], mixed_cache["cfg"].views
    ds = CacheDataset(str(mixed_cache["path"]), size=24, fresh_views=True, teacher_input=(32, *NORM.values()),
                      shuffle=False, **NORM)
    ds.set_epoch(2)
    fresh = m.num_views + 2
    modes: Counter = Counter()
    for s in ds:
        t, p, count = s.tar, s.position, m.dataset.shards[s.tar].count
        valid = tars.rows(t, 0)[A.VALID].astype(bool).tolist()
        img = tars.images[t][p]
        assert s.record == sample_view(recipe, tar=t, position=p, view=fresh, width=img.width, height=img.height,
                                       count=count, valid=valid)
        modes[s.record.mix.mode] += 1
        own = apply_view(img, s.record, recipe, size=24, **NORM)
        if s.record.mix.mode == "none":
            assert s.partner is None
            torch.testing.assert_close(s.x, own, rtol=0, atol=0)
            continue
        q = s.record.mix.partner
        qimg = tars.images[t][q]
        assert valid[q] and s.partner.position == q and s.partner.image.tobytes() == qimg.tobytes()
        assert s.partner.record == sample_view(recipe, tar=t, position=q, view=fresh, width=qimg.width,
                                               height=qimg.height, count=count, valid=valid)
        partner = apply_view(qimg, s.partner.record, recipe, size=24, **NORM)
        torch.testing.assert_close(s.x, by_hand(own, partner, s.record.mix), rtol=0, atol=2e-6)
        assert s.x_teacher.shape == (3, 32, 32)
        cached = A.decode_view(tars.rows(t, s.view), p)
        assert s.record != cached
    assert modes["mixup"] > 50 and modes["cutmix"] > 50


# --- the partner stage on its own: memory, a damaged cache -------------------------------------------------


class _Image:  # a stand-in image that weakref can follow
    width = height = 8


def _next_in_block(p: int, count: int, window: int) -> int:
    start = p // window * window
    return start + (p - start + 1) % min(window, count - start)


def _samples(count: int, partner_of) -> list[Sample]:
    return [Sample(key=str(p), position=p, image=_Image(), label=p % 10, meta=None, view=0,
                   record=ViewRecord(crop=(0, 0, 1, 1), mix=MixRecord(partner=partner_of(p), mode="mixup", lam=0.5)))
            for p in range(count)]


def test_partner_stage_holds_one_block_and_keeps_the_order():
    count, window = 300, 16
    samples = _samples(count, lambda p: _next_in_block(p, count, window))
    records = {s.position: s.record for s in samples}
    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    peak = 0

    def stream():
        nonlocal peak
        for p in range(count):
            s = samples[p]
            samples[p] = None  # the stream owns it from here
            alive[p] = s.image
            yield s
            del s
            peak = max(peak, len(alive))

    order = []
    for s in with_partners(stream(), count=count, window=window, record_of=lambda s, v: records[s.position],
                           where="t.tar"):
        assert s.partner.position == records[s.position].mix.partner and s.partner.record is records[s.partner.position]
        order.append(s.position)
        del s
    assert order == list(range(count)) and 0 < peak <= window + 1


def test_partner_stage_names_a_partner_the_tar_does_not_hold():
    samples = _samples(8, lambda p: p ^ 1)
    del samples[3]  # position 3 was not cached as valid, yet position 2 is recorded mixed with it
    with pytest.raises(CacheError, match=r"t.tar: key 2 \(position 2, view 0\) is cached mixed with position 3"):
        list(with_partners(iter(samples), count=8, window=4, record_of=lambda s, v: s.record, where="t.tar"))


# --- through the CLI: a mixed cache trains; a mix the cache does not hold is refused ---------------------------


def _cli_train(cache_url: str, tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    cfg = {"cache": {"url": cache_url}, "student": {k: TINY_VIT[k] for k in TINY_VIT}, "methods": "ce+kd",
           "method_options": {"ce": {"loss": "bce", "label_smoothing": 0.0}},
           "data": {"batch_size": 64}, "optim": {"epochs": 1, "warmup_epochs": 0}, "output": str(tmp_path / "run"),
           "log_every": 1}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "jobs.cli", "train", str(path), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_from_a_mixed_cache_with_its_own_mix(mixed_cache, tmp_path):
    r = _cli_train(str(mixed_cache["path"]), tmp_path, "data.mixup=0.8", "data.cutmix=1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "loss" in x]
    assert steps and all(np.isfinite(x["loss_ce"]) and x["loss_ce"] > 0 for x in steps)
    assert json.loads((tmp_path / "run" / "final.json").read_text())["epoch"] == 0


def test_cli_refuses_a_mix_the_cache_does_not_hold(mixed_cache, small_cache, tmp_path):
    url = str(mixed_cache["path"])
    r = _cli_train(url, tmp_path / "a", "data.mixup=0.2")
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdcache train: error: data.mixup=0.2, data.cutmix=1.0 do not match the cache {url}, "
                           "which replays the mixes it was built with (views.mix: mixup_alpha=0.8, cutmix_alpha=1.0,")
    assert last.endswith("leave data.mixup and data.cutmix out (= as cached), or build a cache with views.mix: "
                         "{mixup_alpha: 0.2, cutmix_alpha: 1.0} in its caching config")
    plain = str(small_cache["path"])
    r = _cli_train(plain, tmp_path / "b", "data.cutmix=1.0")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"kdcache train: error: data.mixup=0.0, data.cutmix=1.0: the cache {plain} holds unmixed views (its caching "
        "config has no views.mix), and the teacher's outputs on a mixed image are not a mix of its outputs on the "
        "two: build a cache with views.mix: {mixup_alpha: 0.0, cutmix_alpha: 1.0} in its caching config, train with "
        "the teacher in the loop (--online-teacher, which mixes each batch as timm does), or leave data.mixup and "
        "data.cutmix out")
    assert not (tmp_path / "a" / "run").exists() and not (tmp_path / "b" / "run").exists()


# --- export-wds: the mix fields in views.json ---------------------------------------------------------------


def test_export_writes_the_mix_fields_in_views_json(mixed_cache, tars, tmp_path):
    from pipeline.export_wds import export_wds

    m = mixed_cache["manifest"]
    export_wds(str(mixed_cache["path"]), str(tmp_path / "wds"), progress=False, log=lambda s: None)
    checked: Counter = Counter()
    for t, sh in enumerate(m.dataset.shards):
        keys = [s.key for s in iter_samples(sh.url)]
        with tarfile.open(tmp_path / "wds" / f"shard-{t:06d}.tar") as tf:
            views = {x.name[:-len(".views.json")]: json.loads(tf.extractfile(x).read())
                     for x in tf.getmembers() if x.name.endswith(".views.json")}
        for p, key in enumerate(keys):
            if key not in views:
                continue
            assert len(views[key]) == m.num_views
            for v, got in enumerate(views[key]):
                mix = A.decode_view(tars.rows(t, v), p).mix
                assert got["mix"] == {"partner": mix.partner, "mode": mix.mode, "lam": mix.lam, "box": list(mix.box)}
                assert ViewRecord.model_validate(got) == A.decode_view(tars.rows(t, v), p)  # reads back as stored
                checked[mix.mode] += 1
    assert checked["mixup"] > 50 and checked["cutmix"] > 50 and checked["none"] > 10


# --- workers and ranks: every sample once, the same mixes as one process --------------------------------------

RECORDER = '''
import sys, torch
from jobs.config_io import load_config
from student.config import TrainConfig
from student.trainer import Trainer

cfg = load_config(TrainConfig, sys.argv[1])
trainer = Trainer(cfg, progress=False)
seen, step = [], trainer.train_step


def record(batch):
    for i, key in enumerate(batch.keys):
        seen.append((trainer.epoch, key, int(batch.views[i]), batch.x[i].clone(), float(batch.lam[i]), int(batch.partner_labels[i]),
                     batch.targets.topk.values[i].float().clone()))
    return step(batch)


trainer.train_step = record
trainer.fit()
torch.save(seen, f"{cfg.output}/seen-rank{trainer.rank}.pt")
'''


def _train_and_record(cfg: TrainConfig, tmp_path: Path, nproc: int = 1) -> list[tuple]:
    """Train ``cfg`` in ``nproc`` processes (torchrun and gloo when 2) and return what every training step's batch
    held, per sample: (epoch, key, view, image, λ, partner label, cached top-k logits)."""
    script, path = tmp_path / "record.py", tmp_path / f"{Path(cfg.output).name}.yaml"
    script.write_text(RECORDER)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if nproc == 1:
        args = [sys.executable, str(script), str(path)]
    else:
        import socket

        with socket.socket() as sock:  # a free loopback port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        args = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port, str(script), str(path)]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = []
    for rank in range(nproc):
        out += torch.load(Path(cfg.output) / f"seen-rank{rank}.pt", weights_only=True)
    return out


def test_workers_and_ranks_train_every_sample_once_with_the_mixes_of_one_process(mixed_cache, tmp_path):
    """Training from the mixed cache with 2 DataLoader workers, and with 2 DDP ranks (torchrun, gloo) x 2 workers:
    every sample of the tars is trained on exactly once in the epoch, and each sample's image (its mix with its
    partner), λ, partner label and cached targets are those of the same epoch in one process without workers."""
    keys = {s.key for sh in mixed_cache["manifest"].dataset.shards for s in iter_samples(sh.url)}  # from the tars
    assert len(keys) == mixed_cache["manifest"].dataset.num_samples == 359  # keys are unique across tars

    def by_key(seen: list[tuple], epoch: int) -> dict:
        this = [rest for e, *rest in seen if e == epoch]
        counts = Counter(k for k, *_ in this)
        assert set(counts) == keys and set(counts.values()) == {1}, counts.most_common(3)
        assert {v for _, v, *_ in this} == {epoch % 2}  # policy cycle on the 2-view cache: view e % 2 in epoch e
        return {k: rest for k, *rest in this}

    runs = {}
    for name, workers, nproc in (("w0", 0, 1), ("w2", 2, 1), ("ddp", 2, 2)):
        cfg = train_config(mixed_cache, tmp_path / name, num_workers=workers)
        cfg.optim.epochs, cfg.log_every = 2, 100
        runs[name] = _train_and_record(cfg, tmp_path, nproc)
        assert len(runs[name]) == 2 * 359, name
    mixed = 0
    for epoch in (0, 1):
        ref = by_key(runs["w0"], epoch)
        for name in ("w2", "ddp"):
            got = by_key(runs[name], epoch)
            for k, (view, x, lam, partner, topk) in ref.items():
                v2, x2, lam2, partner2, topk2 = got[k]
                assert (v2, lam2, partner2) == (view, lam, partner), (name, epoch, k)
                assert torch.equal(x2, x) and torch.equal(topk2, topk), (name, epoch, k)
        mixed += sum(lam < 1 for _, _, lam, _, _ in ref.values())
    assert mixed > 500  # prob 0.9 over 2 x 359 views: most are mixed
