"""Every shipped config validates, and its taps resolve on the named timm architecture."""

from pathlib import Path

import pytest
import timm
import torch

from jobs.config_io import load_config
from pipeline.teacher import num_feature_levels
from storage_schemas.config import CacheConfig

ALL = sorted((Path(__file__).parents[2] / "jobs" / "configs").glob("*.yaml"))
TRAIN = [p for p in ALL if p.name.startswith("train_")]
SWEEPS = [p for p in ALL if p.name.startswith("sweep_")]
CONFIGS = [p for p in ALL if p not in TRAIN + SWEEPS and p.name != "demo_students.yaml"]  # that one: test_demo.py


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_train_config_validates_and_names_real_methods(path):
    from student.config import TrainConfig
    from student.methods import method_names

    cfg = load_config(TrainConfig, path)
    names = cfg.methods.split("+") if isinstance(cfg.methods, str) else cfg.methods
    assert set(names) <= set(method_names()) and set(cfg.method_options) <= set(names)
    timm.create_model(cfg.student.model, pretrained=False, **cfg.student.model_kwargs)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_taps_exist(path):
    cfg = load_config(CacheConfig, path)
    name = cfg.teacher.model.split(".")[0]
    with torch.device("meta"):  # architecture only: no weights, no hub
        model = timm.create_model(name, pretrained=False, **cfg.teacher.model_kwargs)
    levels = num_feature_levels(model)
    for tap in cfg.targets.features:
        idx = tap.index + levels if tap.index < 0 else tap.index
        assert 0 <= idx < levels, f"{path.name}: tap {tap.name} index {tap.index} outside {levels} levels"
        assert not tap.norm or idx == levels - 1
    if cfg.targets.tpp:
        assert cfg.targets.tpp.tail < levels


# Each shipped training config, and the shipped cache config that provides what it needs.
PAIRS = {
    "train_demo_scalekd_resnet.yaml": "demo.yaml",
    "train_demo_vitkd.yaml": "demo.yaml",
    "train_scalekd_swinl_resnet50.yaml": "scalekd_swin_large_traditional.yaml",
    "train_scalekd_swinl_resnet50d_advanced.yaml": "scalekd_swin_large.yaml",
    "train_scalekd_swinl_deitb_advanced.yaml": "scalekd_swin_large_deit.yaml",
    "train_vanillakd_a1_beitv2b_resnet50.yaml": "vanillakd_a1_beitv2b.yaml",
    "train_vanillakd_a2_beitv2b_resnet50.yaml": "vanillakd_a2_beitv2b.yaml",
    "train_vitkd_deit3b_deits.yaml": "vitkd_deit3_base.yaml",
}


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_train_config_is_served_by_its_cache_config(path):
    """What the training config's methods need (logits, taps by the point they name, the TPP tail), the cache
    config it names in its header caches — resolved on the teacher's architecture (meta device, no weights) —
    the student predicts the teacher's classes, its data.mixup / data.cutmix are the cache's views.mix (as the
    trainer checks against the manifest before step 0) and it repeats no more views than the cache holds."""
    from student.config import TrainConfig, check_mix
    from student.methods import needs_of

    assert path.name in PAIRS, f"{path.name}: say in PAIRS which shipped cache config serves it"
    cache_path = path.parent / PAIRS[path.name]
    assert f"jobs/configs/{cache_path.name}" in path.read_text(), f"{path.name}: name its cache config in the header"
    train, cache = load_config(TrainConfig, path), load_config(CacheConfig, cache_path)
    needs = needs_of(train.methods, train.method_options)
    with torch.device("meta"):
        teacher = timm.create_model(cache.teacher.model.split(".")[0], pretrained=False, **cache.teacher.model_kwargs)
    levels = num_feature_levels(teacher)
    cached = {(t.resolve(levels), t.norm) for t in cache.targets.features}
    for spec in needs.taps:
        assert (spec.resolve(levels), spec.norm) in cached, f"{cache_path.name} lacks tap {spec.yaml()}"
    assert not needs.logits or cache.targets.logits is not None, f"{cache_path.name} caches no logits"
    assert not needs.tpp or cache.targets.tpp is not None, f"{cache_path.name} has no TPP pack"
    classes = train.student.model_kwargs.get("num_classes")
    assert classes == teacher.num_classes, f"student predicts {classes} classes, the teacher {teacher.num_classes}"
    check_mix(cache_path.name, cache.views.mix, train.data.mixup, train.data.cutmix)
    views = min(cache.views.num_views, train.data.max_views or cache.views.num_views)
    assert train.data.aug_repeats <= views, f"aug_repeats {train.data.aug_repeats} > {views} cached views"
    assert train.data.aug_repeats == 1 or train.data.view_policy == "cycle"


def test_every_config_the_help_and_readme_cite_exists():
    import re

    root = Path(__file__).parents[2]
    cited = set()
    for doc in (root / "README.md", root / "jobs" / "cli.py", *ALL):
        cited |= set(re.findall(r"jobs/configs/([\w.-]+\.yaml)", doc.read_text()))
    assert cited and sorted(c for c in cited if not (root / "jobs" / "configs" / c).exists()) == []


def test_the_demo_sweep_trains_what_the_demo_trains():
    """sweep_demo.yaml's 24 trials are the configs `kdcache demo --seeds 0 1 2` builds from demo_students.yaml
    (jobs.demo_students: line-up, baselines, epochs, seeds), all but the output folder."""
    from jobs.demo_students import baseline_of, load_students, run_config
    from jobs.sweep import load_sweep, trial_configs
    from student.config import TrainConfig

    cache, val = "kdcache-demo/cache.zarr", "kdcache-demo/data/val-{000000..000001}.tar"
    spec = load_students()
    demo = []
    for run in spec.runs:
        c = spec.config(run, quick=False)
        for seed in (0, 1, 2):
            for cfg in (c, baseline_of(c)):
                d = run_config(cfg, cache_url=cache, val_urls=val, runs_dir=Path("x"), epochs=run.epochs["full"],
                               seed=seed, teacher_sha256="")
                demo.append(TrainConfig.model_validate(d).model_dump(mode="json", exclude={"output"}))
    sweep = [TrainConfig.model_validate(c).model_dump(mode="json", exclude={"output"})
             for _, _, c in trial_configs(load_sweep(Path(__file__).parents[2] / "jobs/configs/sweep_demo.yaml"))]
    key = lambda d: (d["student"]["model"], str(d["methods"]), d["seed"])  # noqa: E731
    assert len(sweep) == len(demo) == 24
    assert sorted(sweep, key=key) == sorted(demo, key=key)
