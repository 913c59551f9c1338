"""The teacher's stochastic depth (issue 13 item 7; reference/methods.md, "teacher mode"): drop-path on as
in the official train-mode teacher, each view's decisions seeded by (seed, tar, position, view).

The reference computation is written here from the definitions, not through the code under test: a
ViT forward block by block (``x + m · branch(x)``, m = 0 or 1/keep per sample) with the keep decisions
drawn from the documented per-view stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pipeline.teacher import Teacher
from storage_schemas.config import TeacherConfig

VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2, num_classes=10, drop_path_rate=0.6)
SEED = 7


def teacher(stochastic_depth: bool = True) -> Teacher:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **VIT)
    cfg = TeacherConfig(model="vit_tiny_patch16_224", model_kwargs=VIT, input_size=32, mean=(0.5,) * 3,
                        std=(0.5,) * 3, stochastic_depth=stochastic_depth)
    return Teacher(cfg, model=model)


def keep_decisions(key: tuple[int, int, int, int], n: int) -> np.ndarray:
    """The documented stream: SeedSequence([0x5DD0, seed, tar, position, view]), one uniform per DropPath
    module in module order (block i: drop_path1, then drop_path2)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([0x5DD0, *key]))).random(n)


def by_hand(model: torch.nn.Module, x: torch.Tensor, keys: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Logits of a timm ViT with drop-path applied per sample, block by block."""
    rates = np.linspace(0, VIT["drop_path_rate"], VIT["depth"])  # timm's stochastic depth decay rule
    probs = np.repeat(rates[1:], 2)  # block 0's rate is 0: no active module there
    u = np.stack([keep_decisions(k, len(probs)) for k in keys])
    scale = torch.from_numpy(np.where(u < 1 - probs, 1 / (1 - probs), 0.0)).float()
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        for i, blk in enumerate(model.blocks):
            m1, m2 = (torch.ones(len(x)), torch.ones(len(x))) if i == 0 else scale[:, 2 * i - 2: 2 * i].T
            h = h + m1[:, None, None] * blk.ls1(blk.attn(blk.norm1(h)))
            h = h + m2[:, None, None] * blk.ls2(blk.mlp(blk.norm2(h)))
        return model.head(model.norm(h)[:, 0])


def test_teacher_drop_path_matches_a_forward_written_by_hand():
    t = teacher()
    assert len(t.stochastic_depth.modules) == 4  # blocks 1 and 2, two branches each
    x = torch.randn(6, 3, 32, 32)
    keys = [(SEED, 0, p, v) for p, v in [(0, 0), (1, 0), (2, 0), (0, 1), (5, 3), (9, 2)]]
    got = t(x, keys).logits
    torch.testing.assert_close(got, by_hand(t.model, x, keys), atol=1e-5, rtol=1e-5)
    eval_logits = teacher(stochastic_depth=False)(x).logits
    assert not torch.allclose(got, eval_logits, atol=1e-3)  # some branch was dropped at rate 0.3-0.6
    # off: the eval-mode forward whatever the rate in model_kwargs (the project's default)
    torch.testing.assert_close(eval_logits, t.model.forward_head(t.model.forward_features(x)))


def test_a_views_decisions_do_not_depend_on_its_batch_and_drop_at_timms_rates():
    t = teacher()
    x = torch.randn(5, 3, 32, 32)
    keys = [(SEED, 1, p, 0) for p in range(5)]
    together = t(x, keys).logits
    alone = torch.cat([t(x[i:i + 1], keys[i:i + 1]).logits for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t(x, [(SEED + 1, *k[1:]) for k in keys]).logits, together)  # the seed counts
    masks = t.stochastic_depth.view_masks([(SEED, 0, p, v) for p in range(2000) for v in range(2)]).numpy()
    probs = np.repeat(np.linspace(0, VIT["drop_path_rate"], VIT["depth"])[1:], 2)
    dropped = (masks == 0).mean(0)
    # 4000 draws: 5 binomial standard deviations
    assert np.all(np.abs(dropped - probs) < 5 * np.sqrt(probs * (1 - probs) / 4000)), (dropped, probs)
    np.testing.assert_allclose(masks.max(0), 1 / (1 - probs), rtol=1e-6)
    with pytest.raises(ValueError, match="give the \\(seed, tar, position, view\\)"):
        t(x)


def test_stochastic_depth_needs_a_drop_path_rate_and_says_so_from_the_cli(tmp_path):
    with pytest.raises(ValueError, match="teacher.model_kwargs.drop_path_rate"):
        TeacherConfig(model="vit_tiny_patch16_224", stochastic_depth=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: {urls: x.tar}\noutput: {url: out.zarr}\n"
                   "teacher: {model: vit_tiny_patch16_224, stochastic_depth: true}\n")
    kdcache = str(Path(sys.executable).with_name("kdcache"))  # the installed command
    r = subprocess.run([kdcache, "cache", str(cfg)], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[0].startswith("kdcache cache: error:") and "invalid config" in lines[0], lines[0]
    assert lines[-1].startswith("  teacher: ") and "set teacher.model_kwargs.drop_path_rate" in lines[-1], lines[-1]


def test_a_cache_of_a_stochastic_depth_teacher_is_its_own_and_verifies(small_digits, tiny_teacher, tmp_path):
    """The job stores the drop-path teacher's outputs (not the eval teacher's), under another identity;
    ``kdcache verify`` replays its views through the live teacher with the same decisions."""
    from pipeline.job import build_cache_in_process
    from pipeline.store import CacheStore
    from pipeline.verify import verify_cache
    from storage_schemas import arrays as A
    from storage_schemas.codecs import LOGITS_FULL
    from storage_schemas.config import CacheConfig
    from tests.conftest import cache_config

    kw = {**tiny_teacher["model_kwargs"], "drop_path_rate": 0.5}
    common = dict(views__num_views=1, targets__features=[], targets__tpp=None,
                  targets__logits={"mode": "full"}, teacher__model_kwargs=kw)
    sd = CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(tmp_path / "sd.zarr"),
                                                 teacher__stochastic_depth=True, **common))
    ev = CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(tmp_path / "ev.zarr"), **common))
    m_sd, m_ev = (build_cache_in_process(c, log=lambda s: None) for c in (sd, ev))
    assert m_sd.teacher.stochastic_depth and not m_ev.teacher.stochastic_depth
    assert m_sd.identity != m_ev.identity and m_sd.content_identity() == m_sd.identity
    a, b = (CacheStore(str(tmp_path / n)).read_unit(m, 0, 0) for n, m in (("sd.zarr", m_sd), ("ev.zarr", m_ev)))
    valid = a[A.VALID].reshape(-1)
    differ = np.abs(a[LOGITS_FULL][valid] - b[LOGITS_FULL][valid]).max(1) > 1e-2
    assert differ.mean() > 0.9  # a kept branch is scaled by 1/keep, a dropped one zeroed: every view moves
    rep = verify_cache(CacheStore(str(tmp_path / "sd.zarr"), read_only=True),
                       teacher_checkpoint=tiny_teacher["checkpoint"], samples=24, progress=False)
    assert rep.ok, rep.problems
    # the trainer's online teacher reproduces the cached drop-path targets of the same views (and an eval-mode
    # cache's are far from them)
    from student.config import OnlineTeacher, TrainConfig
    from student.trainer import Trainer

    def trainer(cache: str, out: str, online: bool) -> Trainer:
        cfg = TrainConfig.model_validate({
            "cache": {"url": cache}, "methods": "ce+kd", "output": str(tmp_path / out),
            "student": {"model": "resnet18", "model_kwargs": {"num_classes": 10}, "input_size": 32,
                        "mean": [0.5] * 3, "std": [0.5] * 3},
            "data": {"batch_size": 64, "val_urls": small_digits["val"]}, "optim": {"epochs": 1}})
        if online:
            cfg.online_teacher = OnlineTeacher(checkpoint=tiny_teacher["checkpoint"], views="cached")
        t = Trainer(cfg, progress=False)
        t.dataset.set_epoch(0)
        return t

    cached, online = trainer(str(tmp_path / "sd.zarr"), "c", False), trainer(str(tmp_path / "sd.zarr"), "o", True)
    a, b = next(iter(cached.dataset.loader(64))), next(iter(online.dataset.loader(64)))
    assert a.keys == b.keys
    live = online.targets(b).logits
    torch.testing.assert_close(live, a.targets.logits, atol=2e-2, rtol=1e-2)  # fp16 storage
    c = next(iter(trainer(str(tmp_path / "ev.zarr"), "e", False).dataset.loader(64)))
    assert c.keys == a.keys and (c.targets.logits - live).abs().amax() > 0.1
