"""timm's batch Mixup/CutMix with the teacher in the loop on a cache of unmixed views (student/batch_mix.py).

References: timm's own ``Mixup`` run on each input alone after the same NumPy seed, and the live timm teacher on
the batch the student trained on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from storage_schemas.errors import ConfigError
from student.batch_mix import BatchMix
from student.config import OnlineTeacher, check_mix
from student.trainer import Trainer
from tests.student.test_mix_train import _cli_train, train_config


def timm_alone(x: torch.Tensor, labels: torch.Tensor, seed: list[int], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup on one tensor, its λ/mode/box drawn from NumPy seeded as BatchMix seeds it."""
    np.random.seed(seed)
    return Mixup(label_smoothing=0.0, num_classes=10, **kw)(x.clone(), labels)


@pytest.mark.parametrize("kw", [{"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, {"mixup_alpha": 0.0, "cutmix_alpha": 1.0},
                                {"mixup_alpha": 0.2, "cutmix_alpha": 0.0}])
def test_both_inputs_get_the_mix_timm_gives_each_alone(kw):
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    mix = BatchMix(kw["mixup_alpha"], kw["cutmix_alpha"], 10, seed=7, rank=1)
    modes = set()
    for step in range(12):
        np.random.seed(123)
        before = np.random.get_state()[1].copy()
        mx, mxt, soft = mix(x.clone(), xt.clone(), labels, step)
        assert np.array_equal(np.random.get_state()[1], before)  # NumPy's global stream did not move
        ex, ey = timm_alone(x, labels, [7, 1, step], **kw)
        ext, _ = timm_alone(xt, labels, [7, 1, step], **kw)
        torch.testing.assert_close(mx, ex, rtol=0, atol=0)
        torch.testing.assert_close(mxt, ext, rtol=0, atol=0)
        torch.testing.assert_close(soft, ey, rtol=0, atol=0)
        if not torch.equal(mx, x):  # a box pasted from the partner, the rest untouched; or every pixel blended
            modes.add("cutmix" if bool((mx == x).any() and (mx == x.flip(0)).any()) else "mixup")
    assert len(modes) == (2 if kw["mixup_alpha"] and kw["cutmix_alpha"] else 1)
    # another rank, another step: another mix
    assert not torch.equal(mix(x.clone(), xt.clone(), labels, 0)[0], BatchMix(**_kw(kw), seed=7, rank=0)(
        x.clone(), xt.clone(), labels, 0)[0])


def _kw(kw: dict) -> dict:
    return {"mixup": kw["mixup_alpha"], "cutmix": kw["cutmix_alpha"], "num_classes": 10}


def test_an_odd_batch_leaves_its_last_sample_unmixed():
    g = torch.Generator().manual_seed(1)
    x, xt, labels = torch.randn(7, 3, 8, 8, generator=g), torch.randn(7, 3, 8, 8, generator=g), torch.arange(7)
    mx, mxt, soft = BatchMix(0.8, 0.0, 10, seed=0)(x.clone(), xt.clone(), labels, 3)
    ex, ey = timm_alone(x[:6], labels[:6], [0, 0, 3], mixup_alpha=0.8, cutmix_alpha=0.0)
    torch.testing.assert_close(mx[:6], ex, rtol=0, atol=0)
    torch.testing.assert_close(mx[6], x[6], rtol=0, atol=0)
    torch.testing.assert_close(mxt[6], xt[6], rtol=0, atol=0)
    torch.testing.assert_close(soft, torch.cat([ey, mixup_target(labels[6:], 10, 1.0, 0.0)]), rtol=0, atol=0)


def test_check_mix_lets_the_online_teacher_mix_an_unmixed_cache_only():
    from storage_schemas.views import MixRecipe

    assert check_mix("c.zarr", None, 0.8, 1.0, online=True) is True
    assert check_mix("c.zarr", None, None, None, online=True) is False
    mixed = MixRecipe(mixup_alpha=0.8, cutmix_alpha=1.0)
    assert check_mix("c.zarr", mixed, None, None, online=True) is False  # a mixed cache replays its own mixes
    with pytest.raises(ConfigError, match="do not match the cache c.zarr"):
        check_mix("c.zarr", mixed, 0.2, None, online=True)
    with pytest.raises(ConfigError, match="--online-teacher"):
        check_mix("c.zarr", None, 0.8, None)


class _Recorder:
    """Stands in front of a module-like callable and keeps its first argument."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def __call__(self, x, *rest, **kw):
        self.seen.append(x.detach().clone())
        return self.inner(x, *rest, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_online_teacher_and_the_student_train_on_the_same_mixed_batch(small_cache, tiny_teacher, tmp_path):
    from tests.pipeline.test_job import live_teacher

    cfg = train_config(small_cache, tmp_path / "o", mixup=0.8, cutmix=1.0)
    cfg.online_teacher = OnlineTeacher(checkpoint=tiny_teacher["checkpoint"], views="fresh")
    t = Trainer(cfg, progress=False)
    t.dataset.set_epoch(0)
    t.teacher = _Recorder(t.teacher)
    t.ddp = _Recorder(t.ddp)
    losses = []
    for step, batch in enumerate(t.dataset.loader(64)):
        before = batch.x.clone(), batch.x_teacher.clone()
        losses.append(t.train_step(batch))
        ex, ey = timm_alone(before[0], batch.labels, [cfg.seed, 0, step], mixup_alpha=0.8, cutmix_alpha=1.0)
        torch.testing.assert_close(t.ddp.seen[-1], ex, rtol=0, atol=0)
        torch.testing.assert_close(t.teacher.seen[-1], ex, rtol=0, atol=0)  # same size and norm here
        assert not torch.equal(ex, before[0])
        if step == 2:
            break
    # the targets the step used are the live timm teacher's on that mixed batch
    with torch.no_grad():
        probs = live_teacher(tiny_teacher)(t.teacher.seen[-1]).softmax(-1)
    out = t.teacher.inner(t.teacher.seen[-1])
    torch.testing.assert_close(out.logits.softmax(-1), probs, atol=1e-5, rtol=0)
    assert all(np.isfinite(x["loss"]) for x in losses)


def test_batch_mixing_needs_one_input_size(small_cache, tiny_teacher, tmp_path):
    cfg = train_config(small_cache, tmp_path / "o", mixup=0.8)
    cfg.student.input_size, cfg.student.model_kwargs["img_size"] = 24, 24
    cfg.methods, cfg.method_options = "ce+kd", {}
    cfg.online_teacher = OnlineTeacher(checkpoint=tiny_teacher["checkpoint"])
    with pytest.raises(ConfigError, match="the student's input is 24 px, the teacher's 32 px"):
        Trainer(cfg, progress=False)


def test_cli_trains_an_unmixed_cache_with_batch_mixup_and_the_online_teacher(small_cache, tiny_teacher, tmp_path):
    r = _cli_train(str(small_cache["path"]), tmp_path, "data.mixup=0.2", "data.cutmix=1.0",
                   f"online_teacher.checkpoint={tiny_teacher['checkpoint']}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "final.json").exists()
