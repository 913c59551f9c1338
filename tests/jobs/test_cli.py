"""The kdcache command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.cli import main
from storage_schemas import layout


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_explains_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("data", "cache", "inspect", "verify", "train", "sweep", "eval", "demo"):
        assert cmd in r.stdout
    r = run("cache", "--help")
    assert "--set" in r.stdout and "RAY_ADDRESS" in r.stdout and "resume" in r.stdout
    r = run("train", "--help")
    assert "Mixup/CutMix come from the cache" in r.stdout and "--online-teacher" in r.stdout and "torchrun" in r.stdout
    assert "--ray" in r.stdout and "ray job submit" in r.stdout
    r = run("sweep", "--help")
    assert "grid" in r.stdout and "rerun skips finished trials" in r.stdout


def test_data_digits(tmp_path):
    r = run("data", "digits", "--out", str(tmp_path), "--train-shards", "2", "--val-shards", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"]["train"] + out["counts"]["val"] == 1797
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                              "val-000000.tar"]


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "never.zarr"
    cfg.write_text(f"input: {{urls: x.tar}}\noutput: {{url: {out}}}\nteacher: {{model: resnet18}}\n"
                   "targets: {logits: {mode: topk, kk: 3}}\n")
    assert main(["cache", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "targets.logits.kk: unknown key" in err
    assert not out.exists()
    assert main(["cache", str(cfg), "--set", "job.batch_size=-1"]) == 2
    assert "job.batch_size" in capsys.readouterr().err


def test_bad_method_options_are_one_line_at_the_shell(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"cache: {{url: {tmp_path / 'none.zarr'}}}\nstudent: {{model: resnet18}}\nmethods: ce+vitkd\n"
                   "method_options: {vitkd: {shallow_taps: [{name: block0, index: 0}], student_shallow: [0, 1], "
                   f"alfa: 1}}}}\noutput: {tmp_path / 'run'}\n")
    r = run("train", str(cfg), "--no-progress")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("kdcache train: error: method_options.vitkd: ")
    assert "alfa: unknown key" in lines[0] and "must pair up one to one" not in lines[0]  # field errors first
    cfg.write_text(cfg.read_text().replace(", alfa: 1", ""))
    r = run("train", str(cfg), "--no-progress")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "must pair up one to one" in r.stderr and "pydantic" not in r.stderr


def test_missing_input_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {{urls: '{tmp_path}/nope-{{0..3}}.tar'}}\noutput: {{url: {tmp_path}/o.zarr}}\n"
                   "teacher: {model: resnet18}\n")
    assert main(["cache", str(cfg), "--no-progress"]) == 2
    assert "nope-0.tar" in capsys.readouterr().err


def test_inspect_json_and_text(small_cache, capsys):
    """On the reference config's cache built in process (the Ray job writes the same bytes: test_job.py)."""
    url = str(small_cache["path"])
    assert main(["inspect", url, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    m = small_cache["manifest"]
    assert s["status"] == "complete" and s["num_views"] == 2
    assert s["num_samples"] == sum(sh.count for sh in m.dataset.shards)
    assert s["teacher"]["model"] == "vit_tiny_patch16_224"
    for name in ("logits", "feature:block0", "feature:final"):
        t = s["targets"][name]
        assert t["bytes"] > 0 and t["dtype"] and t["fidelity"]["cosine_mean"] > 0.5
    files = sum(p.stat().st_size for p in small_cache["path"].rglob("*") if p.is_file()
                and (p.parent.name == "c" or "/c/" in p.as_posix()))
    assert s["bytes_total"] >= files * 0.5  # arrays dominate; manifest/records are not counted
    assert main(["inspect", url]) == 0
    text = capsys.readouterr().out
    assert "complete (8/8 units)" in text and "feature:final" in text


def test_inspect_refuses_non_cache_and_partial(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / layout.MANIFEST).write_text('{"schema_version": "3.0"}')
    assert main(["inspect", str(tmp_path)]) == 2
    assert "Upgrade kdcache" in capsys.readouterr().err


def test_train_without_progress_bars_prints_a_line_per_epoch(small_cache, tmp_path):
    """A batch job's log (``--no-progress``): one line per epoch on stderr, the final metrics as JSON on stdout."""
    from pathlib import Path

    import yaml

    from tests.conftest import TINY_VIT

    cfg = {"cache": {"url": str(small_cache["path"])}, "methods": "ce+kd", "output": str(tmp_path / "run"),
           "student": {k: TINY_VIT[k] for k in ("model", "model_kwargs", "input_size", "mean", "std")},
           "data": {"batch_size": 128, "val_urls": small_cache["digits"]["val"]}, "optim": {"epochs": 2}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    kdcache = str(Path(sys.executable).with_name("kdcache"))
    r = subprocess.run([kdcache, "train", str(tmp_path / "t.yaml"), "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"], r.stderr[-3000:]
    final = json.loads(r.stdout)
    assert f"val top-1 {final['val_top1']:.2f}%" in lines[-1] and "samples/s" in lines[-1]


def test_a_cache_without_a_valid_view_has_no_teacher_accuracy(small_cache):
    """0 cached views: inspect shows '-' for the teacher's top-1, not 0.00 %."""
    from jobs.report import format_summary
    from pipeline.plan import summarize

    m = small_cache["manifest"]
    empty = m.model_copy(update={"stats": summarize(m, [], None)})
    assert empty.summary()["teacher"]["top1"] is None
    assert "top-1 on cached views -" in format_summary(empty.summary(), "c.zarr")
    assert "top-1 on cached views -" not in format_summary(m.summary(), "c.zarr")


def test_an_output_this_user_cannot_write_is_one_line(small_cache, tmp_path):
    """Issue 16, item 5: a place the user may not write (/sys: EPERM even for root) ends with one line, exit 2."""
    from pathlib import Path

    import yaml

    from tests.conftest import TINY_VIT, cache_config

    digits = small_cache["digits"]
    teacher = {**TINY_VIT, "checkpoint": small_cache["cfg"].teacher.checkpoint}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cache_config(digits, teacher, "/sys/kdcache-test/c.zarr")))
    train = {"cache": {"url": str(small_cache["path"])}, "methods": "ce", "output": "/sys/kdcache-test/run",
             "student": {k: TINY_VIT[k] for k in ("model", "model_kwargs", "input_size", "mean", "std")},
             "optim": {"epochs": 1}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(train))
    kdcache = str(Path(sys.executable).with_name("kdcache"))
    for cmd, cfg in (("cache", "c.yaml"), ("train", "t.yaml")):
        r = subprocess.run([kdcache, cmd, str(tmp_path / cfg), "--no-progress"], capture_output=True, text=True,
                           timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith(f"kdcache {cmd}: error: /sys/kdcache-test") and "choose a URL" in lines[0]


def test_an_internal_error_is_one_line_and_its_traceback_is_on_demand(monkeypatch, capsys):
    """A bug (not a KDCacheError): exit status 1 and one line; the traceback with --debug or KDCACHE_DEBUG=1."""
    import jobs.cli as cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    monkeypatch.delenv("KDCACHE_DEBUG", raising=False)
    assert main(["inspect", "somewhere.zarr"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdcache inspect: internal error: RuntimeError: boom")
    assert "--debug" in err[0]
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "inspect", "somewhere.zarr"])
    monkeypatch.setenv("KDCACHE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["inspect", "somewhere.zarr"])


@pytest.mark.parametrize("address", [None, "10.255.255.1:6379"])
def test_ray_that_cannot_start_or_attach_is_one_line(address, small_cache, tmp_path, monkeypatch, capsys):
    """Ray failing to start (a loaded machine: 'The current node timed out during startup') or to attach: one
    line naming what to do, exit 2 (ray.init made to fail as Ray does; starting it for real here takes minutes)."""
    import ray
    import yaml

    from tests.conftest import TINY_VIT, cache_config

    def failing_init(*args, **kwargs):
        raise (ConnectionError("could not connect to the GCS") if kwargs.get("address") != "local"
               else RuntimeError("The current node timed out during startup."))

    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    teacher = {**TINY_VIT, "checkpoint": small_cache["cfg"].teacher.checkpoint}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cache_config(small_cache["digits"], teacher,
                                                                 str(tmp_path / "c.zarr"))))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["cache", str(tmp_path / "c.yaml"), "--no-progress"] + (["--address", address] if address else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if address:
        assert err.startswith(f"kdcache cache: error: Ray at {address} (--address or RAY_ADDRESS): cannot attach")
    else:
        assert err.startswith("kdcache cache: error: a local Ray instance did not start: The current node timed out")


def test_a_user_error_in_a_dataloader_worker_is_its_one_line(small_cache, tmp_path):
    """torch re-raises a DataLoader worker's exception with the worker's traceback as its message (and as
    RuntimeError when the type takes more than one string, as BadSampleError does): the CLI still prints the
    original one line. Here a tap shard of a copy of the digits cache fails its crc32c in a real worker."""

    import numpy as np
    from torch.utils.data import DataLoader

    from jobs.failures import user_error
    from pipeline.tars import BadSampleError
    from student.data import CacheDataset
    from tests.conftest import damaged_copy

    path = tmp_path / "c.zarr"
    shard = damaged_copy(small_cache, path)
    t = small_cache["manifest"].teacher
    ds = CacheDataset(str(path), size=t.input_size, mean=t.mean, std=t.std, logits=False, taps=["final"],
                      shuffle=False)
    with pytest.raises(Exception) as e:
        list(DataLoader(ds, batch_size=8, num_workers=1, collate_fn=lambda b: len(b)))
    assert "Original Traceback" in str(e.value)  # what torch hands the main process
    msg = user_error(e.value)
    assert msg is not None and "\n" not in msg, msg
    assert msg.startswith(f"{shard}: inner chunk 0 does not match its crc32c checksum") and "kdcache verify" in msg

    def bad_sample(_):
        raise BadSampleError("s3://b/train-000000.tar", "k7", "not a JPEG")

    with pytest.raises(RuntimeError) as e:
        list(DataLoader(np.arange(2), num_workers=1, collate_fn=bad_sample))
    assert user_error(e.value) == str(BadSampleError("s3://b/train-000000.tar", "k7", "not a JPEG"))
    assert user_error(RuntimeError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback "
                                    "(most recent call last):\nValueError: a bug")) is None
