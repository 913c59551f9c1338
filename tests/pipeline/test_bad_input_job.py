"""Bad input through the whole Ray job: a clear error naming shard and key, or a recorded skip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.job import run_cache_job
from pipeline.store import CacheStore
from storage_schemas import arrays as A
from storage_schemas.config import CacheConfig
from tests.conftest import cache_config
from tests.pipeline.test_tars import encode, sample, write_tar

pytestmark = pytest.mark.ray


@pytest.fixture
def bad_shards(tmp_path):
    good = []
    for i in range(6):
        good += sample(f"ok{i:02d}", label=i % 10, colour=(20 * i, 40, 200 - 10 * i))
    write_tar(tmp_path / "in-000000.tar", good)
    bad = sample("a00", 3) + [("broken.png", b"\x89PNG not really"), ("broken.cls", b"4")]
    bad += [("nolabel.png", encode(Image.new("RGB", (5, 5), (1, 2, 3))))] + sample("a01", 5)
    write_tar(tmp_path / "in-000001.tar", bad)
    return str(tmp_path / "in-{000000..000001}.tar")


def _cfg(urls, teacher, out, **kw):
    d = cache_config({"train": urls}, teacher, out, **kw)
    d["targets"]["tpp"] = None
    return CacheConfig.model_validate(d)


def test_bad_sample_error_names_shard_and_key(bad_shards, tiny_teacher, ray_local, tmp_path):
    cfg = _cfg(bad_shards, tiny_teacher, str(tmp_path / "c.zarr"))
    with pytest.raises(Exception) as exc:
        run_cache_job(cfg, progress=False)
    text = str(exc.value)
    assert "in-000001.tar" in text and "key broken" in text
    assert CacheStore(str(tmp_path / "c.zarr")).read_manifest(allow_partial=True).status == "building"


def test_bad_samples_skipped_and_recorded(bad_shards, tiny_teacher, ray_local, tmp_path):
    cfg = _cfg(bad_shards, tiny_teacher, str(tmp_path / "c.zarr"), input__on_bad_sample="skip")
    m = run_cache_job(cfg, progress=False)
    skipped = {s.key: s.reason for s in m.stats.skipped}
    assert set(skipped) == {"broken", "nolabel"} and m.stats.num_skipped == 2
    assert "label" in skipped["nolabel"]
    # positions in shard 1: a00, broken, nolabel, a01 -> rows 1 and 2 empty in every view
    store = CacheStore(str(tmp_path / "c.zarr"), read_only=True)
    for view in range(m.num_views):
        rows = store.read_unit(m, 1, view, [A.VALID, A.LABEL])
        assert rows[A.VALID].tolist() == [1, 0, 0, 1] and rows[A.LABEL].tolist() == [3, -1, -1, 5]
    assert m.stats.num_valid_rows == (6 + 2) * m.num_views
    assert np.isclose(m.summary()["num_samples"], 10)
    # inspect names them: --json as (key, tar, reason), the text summary one line each
    from jobs.report import format_summary

    listed = m.summary()["skipped_samples"]
    assert [(k["key"], k["tar"].rsplit("/", 1)[-1]) for k in listed] == [("broken", "in-000001.tar"),
                                                                          ("nolabel", "in-000001.tar")]
    assert listed[1]["reason"] == skipped["nolabel"]
    text = format_summary(m.summary(), "c.zarr")
    assert "in-000001.tar: key broken: " in text and "in-000001.tar: key nolabel: " in text


def test_truncated_tar_error_or_recorded(bad_shards, tiny_teacher, ray_local, tmp_path):
    from pathlib import Path

    first = Path(bad_shards.replace("{000000..000001}", "000000"))
    data = first.read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])  # mid-member
    cfg = _cfg(str(cut), tiny_teacher, str(tmp_path / "e.zarr"))
    with pytest.raises(Exception, match="cut-000000.tar"):
        run_cache_job(cfg, progress=False)
    cfg = _cfg(str(cut), tiny_teacher, str(tmp_path / "s.zarr"), input__on_bad_sample="skip")
    m = run_cache_job(cfg, progress=False, log=lambda s: None)
    shard = m.dataset.shards[0]
    assert shard.truncated and 0 < shard.count < 6
    assert m.summary()["truncated_shards"][0]["url"].endswith("cut-000000.tar")
    assert m.stats.num_valid_rows == shard.count * m.num_views


def test_empty_shard_is_cached_as_empty_and_trains(bad_shards, tiny_teacher, ray_local, tmp_path):
    """An empty tar among the inputs: the job completes, records 0 samples for it, verify passes,
    and a student's epoch sees every sample of the other tars exactly once."""
    from pipeline.verify import verify_cache
    from student.data import CacheDataset

    write_tar(tmp_path / "in-000002.tar", [])  # beside the fixture's two tars
    urls = bad_shards.replace("{000000..000001}", "{000000..000002}")
    cfg = _cfg(urls, tiny_teacher, str(tmp_path / "c.zarr"), input__on_bad_sample="skip")
    m = run_cache_job(cfg, progress=False, log=lambda s: None)
    assert m.status == "complete" and [s.count for s in m.dataset.shards] == [6, 4, 0]
    assert verify_cache(CacheStore(str(tmp_path / "c.zarr"), read_only=True), progress=False).ok
    ds = CacheDataset(str(tmp_path / "c.zarr"), size=16, mean=(0.5,) * 3, std=(0.5,) * 3, logits=False)
    seen = sorted((s.tar, s.position) for s in ds)
    assert seen == [(0, p) for p in range(6)] + [(1, 0), (1, 3)]


@pytest.mark.parametrize("case", ["bad sample in a unit", "duplicate key in the index pass"])
def test_bad_input_ends_the_cli_with_one_line(case, bad_shards, tiny_teacher, tmp_path):
    """What the shell shows (issue 16): exit 2 and one last line ``kdcache cache: error: TAR: key KEY: …``,
    whether the error was raised in a Ray Data actor (a unit) or a Ray task (the index pass), no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    urls, key = bad_shards, "broken"
    if case.startswith("duplicate"):
        write_tar(tmp_path / "dup-000000.tar", sample("d00", 1) + sample("d01", 2) + sample("d00", 3))
        urls, key = str(tmp_path / "dup-000000.tar"), "d00"
    d = cache_config({"train": urls}, tiny_teacher, str(tmp_path / "cli.zarr"))
    d["targets"]["tpp"] = None
    d["job"]["cpus_per_actor"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    kdcache = str(Path(sys.executable).with_name("kdcache"))
    r = subprocess.run([kdcache, "cache", str(tmp_path / "c.yaml"), "--no-progress"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "RAY_ADDRESS": ""})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith("kdcache cache: error: ") and f"key {key}" in last and ".tar" in last, last
    assert "Traceback" not in r.stderr and "\x1b[" not in last and "ray::" not in last, r.stderr[-3000:]


CHATTY = """
import sys, time
from pathlib import Path
import ray
from jobs import cli, console
from pipeline.job import init_ray
from storage_schemas.errors import CacheError

@ray.remote(num_cpus=0)
def chatter(started):
    Path(started).touch()
    for _ in range(3000):  # a minute of a worker's lines (the raylet's disk warnings on CI came the same way)
        print("a worker's line", file=sys.stderr, flush=True)
        time.sleep(0.02)

def failing_command(args):  # `kdcache ls` made into a command that fails while Ray's output still flows
    init_ray(None, num_cpus=1)
    ref = chatter.remote(sys.argv[1])
    for _ in range(600):
        if Path(sys.argv[1]).exists():
            break
        time.sleep(0.1)
    time.sleep(2)  # its lines reach this process's stderr through Ray's log thread
    raise CacheError("the error line")

cli.cmd_ls = failing_command
console.main(["ls", "."])
"""


def test_the_error_line_stays_last_while_ray_processes_still_print(tmp_path):
    """The error line is the shell's last line even while Ray's processes are still writing: on CI a raylet
    warning ("… is over 95% full …") arrived after it. Here a Ray task prints every 20 ms when the command fails."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CHATTY, str(tmp_path / "started")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert any("a worker's line" in x for x in lines), r.stderr[-3000:]  # Ray's output did flow to the shell
    assert lines[-1] == "kdcache ls: error: the error line", r.stderr[-3000:]


def test_a_callers_own_ray_is_left_running_after_an_error(ray_local, tmp_path):
    """Called in-process by a program with its own Ray up, ``jobs.cli.main`` says the error and leaves that Ray
    alone (only a Ray the command itself started is stopped before the line)."""
    from jobs.cli import main

    assert main(["cache", str(tmp_path / "missing.yaml")]) == 2
    assert ray_local.is_initialized()


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tiny_teacher, small_digits, tmp_path):
    """Issue 16: the writer's disk fills up mid-job (a 1 MB tmpfs): one line naming the cache, exit 2, no unit
    recorded that is not whole; with space again the rerun finishes the cache and it verifies."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        d = cache_config(small_digits, tiny_teacher, str(disk / "c.zarr"))  # ~2.5 MB: more than the disk
        d["job"]["cpus_per_actor"] = 1
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
        kdcache = str(Path(sys.executable).with_name("kdcache"))

        def cache() -> subprocess.CompletedProcess:
            return subprocess.run([kdcache, "cache", str(tmp_path / "c.yaml"), "--no-progress"], capture_output=True,
                                  text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})

        r = cache()
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2, r.stderr[-3000:]
        assert last.startswith("kdcache cache: error: ") and "No space left on device" in last, last
        assert "Traceback" not in r.stderr
        store = CacheStore(str(disk / "c.zarr"), read_only=True)
        m = store.read_manifest(allow_partial=True)
        assert m.status == "building" and len(store.completed_units()) < m.units_total
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = cache()
        assert r.returncode == 0, r.stderr[-3000:]
        from pipeline.verify import verify_cache

        assert verify_cache(CacheStore(str(disk / "c.zarr"), read_only=True), progress=False).ok
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
