"""The trainer on the reference cache: it learns, checkpoints load without pickle, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from storage_schemas import layout
from student.config import OnlineTeacher, TrainConfig
from student.trainer import Trainer

pytestmark = pytest.mark.ray  # the reference cache is built with Ray

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


def config(reference, digits, out, **kw) -> TrainConfig:
    d = {"cache": {"url": str(reference["path"])},
         "student": {"model": "vit_tiny_patch16_224", "model_kwargs": VIT, "input_size": 32,
                     "mean": [0.5] * 3, "std": [0.5] * 3},
         "methods": "ce+kd+vitkd",
         "method_options": {"vitkd": {"shallow_taps": [{"name": "block0", "index": 0}], "student_shallow": [0]}},
         "data": {"batch_size": 128, "shuffle_buffer": 256, "val_urls": digits["val"], "eval_crop_pct": 1.0},
         "optim": {"epochs": 1, "lr": 3e-3, "warmup_epochs": 0}, "output": str(out), "log_every": 1}
    for k, v in kw.items():
        section, key = k.split("__")
        d[section][key] = v
    return TrainConfig.model_validate(d)


def test_fit_logs_checkpoints_and_learns(reference, digits, tmp_path):
    cfg = config(reference, digits, tmp_path / "run")
    result = Trainer(cfg, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"loss_ce", "loss_kd", "loss_vitkd_lr", "loss_vitkd_gen"} <= set(steps[0])
    for r in steps:  # the total is the sum of the named, weighted components
        parts = sum(v for k, v in r.items() if k.startswith("loss_"))
        assert r["loss"] == pytest.approx(parts, rel=1e-5)
    assert steps[-1]["loss_ce"] < steps[0]["loss_ce"]
    n_train = reference["manifest"].stats.num_valid_rows // reference["manifest"].num_views
    assert len(steps) == -(-n_train // 128)  # one epoch = every cached sample once
    assert result["val_n"] == 360 and result["val_top1"] > 10.0
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # no pickle needed
    assert ck["epoch"] == 1 and ck["step"] == len(steps) and ck["data"] is None
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert "mask_token" in "".join(ck["methods"])  # projectors and mask token are checkpointed
    assert not any("tail" in k for k in ck["methods"])  # the frozen teacher tail comes from the cache


def test_mid_epoch_resume_gives_identical_weights(reference, digits, tmp_path):
    """Crash after 3 steps (checkpoint every 2), resume: same final weights as one straight run."""
    straight = Trainer(config(reference, digits, tmp_path / "a", data__val_urls=None), progress=False)
    straight.fit()
    crashing = Trainer(config(reference, digits, tmp_path / "b", data__val_urls=None,
                              **{"optim__epochs": 1}), progress=False)
    crashing.cfg.checkpoint_every = 2
    real_step = crashing.train_step

    def step_then_crash(batch):
        if crashing.step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(batch)

    crashing.train_step = step_then_crash
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 2
    resumed = Trainer(config(reference, digits, tmp_path / "b", data__val_urls=None), progress=False)
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_scalekd_cap_norm_starts_from_the_caches_tail_stats(reference, digits, tmp_path):
    base = config(reference, digits, tmp_path / "s").model_dump()
    cfg = TrainConfig.model_validate({**base, "methods": "ce+scalekd",
                                      "method_options": {"scalekd": {"cap_norm_init": "tail_stats"}}})
    scalekd = Trainer(cfg, progress=False).model.methods[1]
    stats = load_file(str(reference["path"] / layout.TPP_STATS))
    for v in ("spat", "freq"):
        assert torch.equal(scalekd.s3[v].norm.weight.cpu(), stats["std"])
        assert torch.equal(scalekd.s3[v].norm.bias.cpu(), stats["mean"])


def test_mixup_refused_before_work(reference, digits, tmp_path):
    with pytest.raises(ValueError, match="data.mixup=0.8, data.cutmix=0.0: the cache .* holds unmixed views"):
        Trainer(config(reference, digits, tmp_path / "m", data__mixup=0.8), progress=False)


def test_missing_tap_named_before_step_0(reference, digits, tmp_path):
    cfg = config(reference, digits, tmp_path / "x")
    cfg.method_options = {}  # default ViTKD wants block1, which the reference cache lacks
    with pytest.raises(ValueError, match="block1"):
        Trainer(cfg, progress=False)


def test_ddp_two_ranks_gloo(reference, digits, tmp_path):
    """torchrun, 2 CPU ranks (gloo): trains, evaluates over both ranks' val shares, checkpoints once."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = config(reference, digits, tmp_path / "ddp", data__val_urls=digits["val"])
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    import socket

    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port,
                        "-m", "jobs.cli", "train", str(path), "--no-progress"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["val_n"] == 360  # both ranks' shares of the val tars, summed
    ck = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    # 4 tars over 2 ranks: each rank steps over its own two tars only
    n_train = reference["manifest"].stats.num_valid_rows // reference["manifest"].num_views
    assert 0 < ck["step"] < -(-n_train // 128)


def test_cached_and_online_teacher_give_the_same_targets_and_losses(reference, digits, tiny_teacher, tmp_path):
    cached = Trainer(config(reference, digits, tmp_path / "c"), progress=False)
    cfg = config(reference, digits, tmp_path / "o")
    cfg.online_teacher = OnlineTeacher(checkpoint=tiny_teacher["checkpoint"], views="cached")
    online = Trainer(cfg, progress=False)
    for t in (cached, online):
        t.dataset.set_epoch(0)
    compared = 0
    for a, b in zip(cached.dataset.loader(64), online.dataset.loader(64), strict=False):
        assert a.keys == b.keys and torch.equal(a.x, b.x)
        ta, tb = a.targets, online.targets(b)
        for tap in ("block0", "final"):
            torch.testing.assert_close(ta.features[tap], tb.features[tap], atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ta.topk.values, tb.topk.values, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ta.topk.logsumexp, tb.topk.logsumexp, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            la = cached.model(a.x, ta, a.labels, 0)
            lb = online.model(b.x, tb, b.labels, 0)
        for k in ("loss", "loss_ce", "loss_kd", "loss_vitkd_lr", "loss_vitkd_gen"):
            assert float(la[k]) == pytest.approx(float(lb[k]), rel=1e-3, abs=1e-6), k
        compared += 1
        if compared == 2:
            break
    assert compared == 2


def test_online_teacher_must_be_the_cached_one_and_fresh_views_differ(reference, digits, tiny_teacher, tmp_path):
    import timm
    from safetensors.torch import save_file

    other = timm.create_model(tiny_teacher["model"], **tiny_teacher["model_kwargs"])
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    cfg = config(reference, digits, tmp_path / "x")
    cfg.online_teacher = OnlineTeacher(checkpoint=str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="the cache was built from"):
        Trainer(cfg, progress=False)
    cfg.online_teacher = OnlineTeacher(checkpoint=tiny_teacher["checkpoint"], views="fresh")
    fresh = Trainer(cfg, progress=False)
    cached = Trainer(config(reference, digits, tmp_path / "y"), progress=False)
    for t in (fresh, cached):
        t.dataset.set_epoch(0)
    a = next(iter(cached.dataset.loader(16)))
    b = next(iter(fresh.dataset.loader(16)))
    assert a.keys == b.keys and not torch.equal(a.x, b.x)  # same samples, new views
    assert b.x_teacher is not None and fresh.targets(b).features["final"].shape == a.targets.features["final"].shape
