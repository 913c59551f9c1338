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
CONFIGS = [p for p in ALL if p not in TRAIN and p.name != "demo_students.yaml"]  # that one: test_demo.py


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
