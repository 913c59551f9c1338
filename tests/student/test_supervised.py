"""Training without a cache: the trainer on plain tars, a fresh view of the recipe per sample and epoch
(the demo's teacher, a no-KD baseline)."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.config_io import ConfigError
from pipeline.tars import expand_urls, iter_samples
from pipeline.views import apply_view, sample_view
from storage_schemas.views import ViewRecipe
from student.config import TrainConfig
from student.data import TarDataset
from student.trainer import Trainer
from tests.conftest import TINY_VIT

RECIPE = ViewRecipe(seed=7, crop={"scale": (0.5, 1.0)}, randaugment="rand-m5-n1", erase={"prob": 0.5})


def test_epoch_e_replays_view_e_of_every_sample_once(digits):
    urls = digits["train"].replace("{000000..000003}", "{000000..000001}")
    ds = TarDataset(urls, recipe=RECIPE, size=16, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle_buffer=64)
    images = {(t, s.position): s.image for t, u in enumerate(expand_urls(urls)) for s in iter_samples(u)}
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        got = list(ds)
        assert sorted((s.tar, s.position) for s in got) == sorted(images) and {s.view for s in got} == {epoch}
        for s in got[:20]:  # by hand: the recipe's record for (tar, position, view = epoch), applied at 16 px
            img = images[(s.tar, s.position)]
            rec = sample_view(RECIPE, tar=s.tar, position=s.position, view=epoch, width=img.width, height=img.height)
            assert torch.equal(s.x, apply_view(img, rec, RECIPE, size=16, mean=(0.5,) * 3, std=(0.5,) * 3))


def config(digits, out, val: bool = True, **kw) -> TrainConfig:
    return TrainConfig.model_validate({
        "student": {k: TINY_VIT[k] for k in ("model", "model_kwargs", "input_size", "mean", "std")},
        "methods": "ce", "data": {"train_urls": digits["train"].replace("{000000..000003}", "{000000..000001}"),
                                  "val_urls": digits["val"] if val else None, "batch_size": 64,
                                  "views": RECIPE.model_dump(mode="json")},
        "optim": {"epochs": 2, "lr": 3e-3}, "output": str(out), "checkpoint_every": 5, **kw})


def test_trains_without_a_cache_and_resumes_exactly(digits, tmp_path):
    full = Trainer(config(digits, tmp_path / "full"), progress=False)
    result = full.fit()
    # 718 samples / 64 per step; chance is 10 % (360 val samples: 15 % is 3 standard deviations above)
    assert result["cache"] is None and result["step"] == 2 * 12 and result["val_top1"] > 15
    # stop at step 5 (mid-epoch 0) with a checkpoint, rerun: the same weights as the
    # uninterrupted run
    cut = Trainer(config(digits, tmp_path / "cut", val=False), progress=False)
    cut.dataset.set_epoch(0)
    for batch in cut.dataset.loader(64):
        cut.train_step(batch)
        if cut.step == 5:
            cut.save(cut.out / "last.pt", epoch_done=False)
            break
    cut.out.mkdir(parents=True, exist_ok=True)
    resumed = Trainer(config(digits, tmp_path / "cut", val=False), progress=False)
    resumed.fit()
    for a, b in zip(full.model.student.state_dict().values(), resumed.model.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if "val_top1" in r] == [0, 1]


def test_methods_that_need_a_teacher_are_refused_without_a_cache(digits, tmp_path):
    with pytest.raises(ConfigError, match="methods 'ce\\+kd' need a teacher's targets, and this run has no cache"):
        Trainer(config(digits, tmp_path / "o", methods="ce+kd"), progress=False)
    with pytest.raises(ValueError, match="give either cache"):
        TrainConfig.model_validate({"student": {"model": "resnet18"}, "output": "o"})


def test_the_students_own_no_weight_decay_list_is_kept(digits, tmp_path):
    """A ViT student's pos_embed and cls_token are not decayed, as timm's optimiser does for the bare model
    (DeiT / ViTKD recipes): the trainer hands timm the student inside a wrapper, which must pass its list on."""
    from timm.optim import create_optimizer_v2

    t = Trainer(config(digits, tmp_path / "run", val=False), progress=False)
    names = {id(p): n for n, p in t.model.named_parameters()}
    undecayed = {names[id(p)] for g in t.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    bare = create_optimizer_v2(t.model.student, opt=t.cfg.optim.opt, lr=1e-3, weight_decay=t.cfg.optim.weight_decay)
    student_names = {id(p): n for n, p in t.model.student.named_parameters()}
    expected = {f"student.{student_names[id(p)]}" for g in bare.param_groups if g["weight_decay"] == 0.0
                for p in g["params"]}
    assert {"student.pos_embed", "student.cls_token"} <= expected
    assert {n for n in undecayed if n.startswith("student.")} == expected
