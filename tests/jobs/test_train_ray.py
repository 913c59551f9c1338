"""``kdcache train --ray`` through the CLI in subprocesses: the same weights as torchrun, a worker killed mid-epoch
resumes to the same weights, a rerun of a finished run does nothing, and a config error stops before Ray starts.

Each run starts its own private local Ray (the driver's ``init_ray``), 2 CPU workers with gloo, one thread each —
as torchrun's ranks with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.ray  # the runs start Ray (in their own processes)

ROOT = Path(__file__).resolve().parents[2]
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


def write_config(small_cache, path: Path, out: Path, **extra) -> Path:
    cfg = {"cache": {"url": str(small_cache["path"])},
           "student": {"model": "vit_tiny_patch16_224", "model_kwargs": VIT, "input_size": 32,
                       "mean": [0.5] * 3, "std": [0.5] * 3},
           "methods": "ce+kd", "data": {"batch_size": 32, "shuffle_buffer": 64},
           "optim": {"epochs": 2, "lr": 3e-3, "warmup_epochs": 0}, "checkpoint_every": 2, "log_every": 1,
           "output": str(out), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str], **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
         **env}
    e.pop("RAY_ADDRESS", None)  # a private local Ray for each run
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=e, cwd=ROOT)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def torchrun_run(small_cache, tmp_path_factory) -> Path:
    """The reference: torchrun, 2 CPU ranks, same config."""
    tmp = tmp_path_factory.mktemp("torchrun")
    cfg = write_config(small_cache, tmp / "t.yaml", tmp / "run")
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "jobs.cli", "train", str(cfg), "--no-progress"])
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp / "run"


def test_ray_two_workers_give_torchruns_weights_and_a_rerun_does_nothing(small_cache, torchrun_run, tmp_path):
    cfg = write_config(small_cache, tmp_path / "r.yaml", tmp_path / "run")
    r = run([sys.executable, "-m", "jobs.cli", "train", str(cfg), "--ray", "--set", "ray.num_workers=2",
             "--no-progress"])
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "run"
    assert_same_weights(out, torchrun_run)
    final = json.loads((out / "final.json").read_text())
    assert final["epoch"] == json.loads((torchrun_run / "final.json").read_text())["epoch"] == 1
    assert final["step"] == torch.load(torchrun_run / "last.pt", weights_only=True)["step"]
    # Ray Train kept the checkpoints: the last holds the run's result files next to last.pt
    ckpts = sorted(p for p in (out / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert ckpts and {"last.pt", "final.json", "metrics.jsonl", "config.yaml"} <= {p.name for p in ckpts[-1].iterdir()}
    assert torch.equal(torch.load(ckpts[-1] / "last.pt", weights_only=True)["model"]["head.weight"],
                       weights(out)["head.weight"])
    before = (out / "last.pt").read_bytes()
    again = run([sys.executable, "-m", "jobs.cli", "train", str(cfg), "--ray", "--no-progress"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["step"] == final["step"]
    assert (out / "last.pt").read_bytes() == before  # finished: nothing retrained
    assert "holds this run, finished" in again.stderr and "Started a local Ray" not in again.stderr


def test_a_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(small_cache, torchrun_run, tmp_path):
    """One of the two workers kills itself (-9) after step 3 of 2 epochs (checkpoints every 2 steps): Ray restarts
    the group from the step-2 checkpoint, and the run ends with the uninterrupted run's weights."""
    cfg = write_config(small_cache, tmp_path / "r.yaml", tmp_path / "run", ray={"num_workers": 2, "max_failures": 2})
    marker = tmp_path / "killed"
    r = run([sys.executable, "-m", "jobs.cli", "train", str(cfg), "--no-progress"],  # the ray: section alone
            KDCACHE_CRASH_AT="train:step 3#1", KDCACHE_CRASH_MARKER=str(marker))
    assert marker.exists(), "no worker reached the crash point"
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_weights(tmp_path / "run", torchrun_run)


def test_a_config_error_stops_before_ray_starts(small_cache, tmp_path):
    cfg = write_config(small_cache, tmp_path / "r.yaml", tmp_path / "run", methods="ce+vitkd",
                       method_options={"vitkd": {"shallow_taps": [{"name": "block1", "index": 1}],
                                                 "student_shallow": [0]}})
    r = run([sys.executable, "-m", "jobs.cli", "train", str(cfg), "--ray", "--no-progress"])
    assert r.returncode == 2, r.stderr[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdcache train: error:") and "block1" in last
    assert "Started a local Ray instance" not in r.stderr and not (tmp_path / "run").exists()


# --- kdcache sweep ---------------------------------------------------------------------------------------------


def write_sweep(small_cache, tmp_path: Path, trials: list[dict]) -> Path:
    write_config(small_cache, tmp_path / "base.yaml", tmp_path / "unused", checkpoint_every=None,
                 optim={"epochs": 1, "lr": 3e-3, "warmup_epochs": 0},
                 data={"batch_size": 32, "shuffle_buffer": 64, "val_urls": small_cache["digits"]["val"],
                       "eval_crop_pct": 1.0})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output": str(tmp_path / "sweep"), "trials": trials,
                                    "resources": {"CPU": 1}, "max_retries": 0}))
    return path


def test_sweep_writes_the_table_reports_a_failed_trial_and_a_rerun_does_nothing(small_cache, tmp_path):
    from student.config import TrainConfig
    from student.trainer import Trainer

    trials = [{"methods": "ce", "seed": 0}, {"methods": "ce+kd", "seed": 0}, {"methods": "ce+kd", "seed": 1}]
    # with a fourth trial that fails: it is reported, the others finish
    sweep = write_sweep(small_cache, tmp_path, [*trials, {"student.model": "no_such_model"}])
    # Ray's deduplicated log lines ("[repeated 2x across cluster]") held back longer than the sweep takes to end:
    # without the driver stopping Ray first they would come after the sweep's last line
    r = run([sys.executable, "-m", "jobs.cli", "sweep", str(sweep)], RAY_DEDUP_LOGS="1",
            RAY_DEDUP_LOGS_AGG_WINDOW_S="120")
    assert r.returncode == 1, r.stderr[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdcache sweep: 1 of 4 trials failed") and "rerun the sweep" in last
    *table, bad = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert bad["status"] == "failed" and "no_such_model" in bad["error"]
    assert [(t["methods"], t["overrides"]["seed"], t["status"]) for t in table] == [
        ("ce", 0, "done"), ("ce+kd", 0, "done"), ("ce+kd", 1, "done")]
    assert (tmp_path / "sweep" / "results.png").stat().st_size > 1000
    for t in table:  # each row is its run folder's result
        assert t["top1"] == json.loads((Path(t["output"]) / "final.json").read_text())["val_top1"]
        assert f"| {t['trial']} |" in r.stdout
    # a trial is the plain trainer: the same config trained here, on one thread as the trial was, ends the same
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = yaml.safe_load((Path(table[1]["output"]) / "config.yaml").read_text())
        Trainer(TrainConfig.model_validate({**cfg, "output": str(tmp_path / "direct")}), progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(tmp_path / "direct", Path(table[1]["output"]))
    stamps = {t["trial"]: (Path(t["output"]) / "last.pt").stat().st_mtime_ns for t in table}
    write_sweep(small_cache, tmp_path, trials)  # the failed trial taken out
    again = run([sys.executable, "-m", "jobs.cli", "sweep", str(sweep)])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "3 trials, 3 finished before, 0 to run" in again.stderr and "Started a local Ray" not in again.stderr
    assert {t["trial"]: (Path(t["output"]) / "last.pt").stat().st_mtime_ns for t in table} == stamps
    assert [t["status"] for t in json.loads((tmp_path / "sweep" / "results.json").read_text())] == ["done before"] * 3
