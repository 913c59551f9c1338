"""``kill -9`` at seeded moments, chosen among the named crash points (:mod:`pipeline.crash_points`) an
uninterrupted run passes: every rerun with ``--resume`` ends as the uninterrupted run did.

The caching job is two CLI commands, a 1-view cache and its growth to 2 views, so kills land in creation,
in a growth and in both processes (the Ray driver, which dies with its job; a Ray actor, which Ray restarts
while the job goes on). The schedule is drawn once from the points of a traced run with a fixed seed; its
first four are one of each kind the issue names (manifest, checksums, completion record, growth), the rest
random. Each costs two CLI runs (~1 min here), so the suite runs the first ``KDCACHE_KILL_POINTS`` (default
3 for the cache: manifest, checksums, record; 2 for the trainer); README's reliability figures come from
``KDCACHE_KILL_POINTS=20 pytest tests/pipeline/test_kill_points.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.crash_points import AT, HOLD_AT, HOLD_UNTIL, MARKER, TRACE
from pipeline.store import CacheNotReadyError, CacheStore
from storage_schemas import layout
from tests.conftest import cache_config
from tests.pipeline.test_job import _actor_pids, data_files
from tests.student.test_trainer import config as train_config

pytestmark = pytest.mark.ray

N = int(os.environ.get("KDCACHE_KILL_POINTS", "0"))
CACHE_N, TRAIN_N = N or 3, N or 2
SEED = 2026
# manifest fields that hold times (they differ between any two runs; so does config.output.url)
TIMED = {"created", "updated", "time", "seconds", "samples_per_second", "checksums_sha256"}


def run(cmd: list[str], env: dict, timeout: float = 300, settle: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, which is killed whole afterwards (a driver killed at a crash point
    leaves its private Ray's processes behind); then (``settle``) waits for orphaned Ray actors to go — not while
    another job's actors are meant to live on (they would hold it up to its 60 s limit)."""
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out, err = p.communicate(timeout=timeout)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 60
    while settle and _actor_pids() and time.time() < deadline:
        time.sleep(0.25)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def traced_points(trace: Path) -> list[tuple[str, int]]:
    """(name, n): the n-th passing of each point within its process, in order; a lease heartbeat only once
    (how many a run writes depends on timing)."""
    seen: Counter = Counter()
    points = []
    for line in trace.read_text().splitlines():
        pid, name = line.split(" ", 1)
        seen[pid, name] += 1
        if name.endswith(":lease.json") and seen[pid, name] > 1:
            continue
        points.append((name, seen[pid, name]))
    return points


def schedule(points: dict[int, list[tuple[str, int]]], count: int, required: list[tuple[int, str]]) -> list:
    """``count`` distinct (stage, name, n), drawn with :data:`SEED`: first one matching each of ``required``
    ((stage, regex) pairs, stage 0 meaning any), then any."""
    rng = np.random.default_rng(SEED)
    pool = [(s, name, n) for s, pts in points.items() for name, n in pts]
    chosen = []
    for stage, pattern in required:
        match = [p for p in pool if (stage in (0, p[0])) and re.search(pattern, p[1]) and p not in chosen]
        assert match, f"no traced point matches {pattern!r} (stage {stage})"
        chosen.append(match[rng.integers(len(match))])
    rest = [p for p in pool if p not in chosen]
    chosen += [rest[i] for i in rng.permutation(len(rest))[: max(0, count - len(chosen))]]
    return chosen[:count]


def normal_manifest(path: Path) -> dict:
    def drop(o):
        if isinstance(o, dict):
            return {k: drop(v) for k, v in o.items() if k not in TIMED}
        return [drop(v) for v in o] if isinstance(o, list) else o

    m = json.loads((path / layout.MANIFEST).read_text())
    m["config"]["output"].pop("url")
    return drop(m)


@pytest.fixture(scope="module")
def cache_runs(small_digits, tiny_teacher, tmp_path_factory):
    """The configs, an uninterrupted traced run of both stages (snapshots after each) and its crash points; over
    ``small_digits`` (the same 4 tars, units and crash points as the digits, a quarter of the samples: ~10 s less
    a run, and each case is two or three runs)."""
    root = tmp_path_factory.mktemp("kill")
    env = {**os.environ, "RAY_ADDRESS": "", TRACE: ""}
    out = root / "ref" / "out.zarr"
    stages, points = {}, {}
    for stage, views in ((1, 1), (2, 2)):
        cfg = cache_config(small_digits, tiny_teacher, "OUT", views__num_views=views, job__lease_ttl_s=2.0)
        stages[stage] = yaml.safe_dump(cfg)
        (root / f"c{stage}.yaml").write_text(stages[stage].replace("OUT", str(out)))
        env[TRACE] = str(root / f"trace{stage}")
        r = run([sys.executable, "-m", "jobs.cli", "cache", str(root / f"c{stage}.yaml"), "--no-progress"], env)
        assert r.returncode == 0, r.stderr[-3000:]
        shutil.copytree(out, root / f"stage{stage}.zarr")
        points[stage] = traced_points(root / f"trace{stage}")
    return {"root": root, "configs": stages, "points": points}


def _cache_schedule(cache_runs) -> list:
    return schedule(cache_runs["points"], CACHE_N, [
        (1, r"^(write|rename|wrote):manifest\.json"),  # the building or the complete manifest, or its sidecar
        (0, r"^(write|rename|wrote):checksums\.json"),
        (0, r"^(write|rename):units/"),  # a unit's completion record (in an actor)
        (2, r"^(write|rename|wrote|remove|removed):growth\.json|^grow:|^(write|rename):index/"),
    ])


@pytest.mark.parametrize("case", range(CACHE_N))
def test_cache_killed_at_a_crash_point_resumes_to_the_same_cache(cache_runs, case, tmp_path):
    stage, name, n = _cache_schedule(cache_runs)[case]
    root = cache_runs["root"]
    out = tmp_path / "out.zarr"
    if stage == 2:
        shutil.copytree(root / "stage1.zarr", out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(cache_runs["configs"][stage].replace("OUT", str(out)))
    cmd = [sys.executable, "-m", "jobs.cli", "cache", str(cfg), "--no-progress"]
    marker = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != TRACE} | {"RAY_ADDRESS": ""}
    r = run(cmd, env | {AT: f"{name}#{n}", MARKER: str(marker)})
    assert marker.exists(), f"stage {stage}: {name}#{n} was never passed; stderr: {r.stderr[-2000:]}"
    # the driver dies with SIGKILL; an actor killed mid-unit is restarted by Ray and the job finishes
    assert r.returncode in (0, -signal.SIGKILL), r.stderr[-3000:]
    if (out / layout.MANIFEST).exists() and '"status": "building"' in (out / layout.MANIFEST).read_text():
        with pytest.raises(CacheNotReadyError, match="--allow-partial"):  # readers are told, not served half
            CacheStore(str(out), read_only=True).read_manifest()
    time.sleep(2.5)  # a dead driver's lease expires (job.lease_ttl_s = 2)
    if (out / layout.LEASE).exists():  # the driver died holding it: refused until the user says --resume
        refused = run(cmd, env)
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 2 and "abandoned lease" in last and "--resume" in last, refused.stderr[-2000:]
    again = run(cmd + ["--resume"], env)
    assert again.returncode == 0, f"{name}#{n}: the rerun failed: {again.stderr[-3000:]}"
    want = root / f"stage{stage}.zarr"
    a, b = data_files(want), data_files(out)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == [], f"{name}#{n}: bytes differ"
    assert normal_manifest(out) == normal_manifest(want), f"{name}#{n}: manifests differ"
    assert CacheStore(str(out)).objects(debris=True) == []
    v = run([sys.executable, "-m", "jobs.cli", "verify", str(out)], env)
    assert v.returncode == 0, f"{name}#{n}: verify: {v.stdout[-2000:]} {v.stderr[-2000:]}"


@pytest.fixture(scope="module")
def train_runs(reference, digits, tmp_path_factory):
    """An uninterrupted, traced ``kdcache train`` (2 epochs, a checkpoint every 2 steps) and its points."""
    root = tmp_path_factory.mktemp("killtrain")
    cfg = train_config(reference, digits, "OUT", data__val_urls=None, optim__epochs=2).model_dump(mode="json")
    cfg["checkpoint_every"] = 2
    text = yaml.safe_dump(cfg)
    (root / "t.yaml").write_text(text.replace("OUT", str(root / "ref")))
    r = run([sys.executable, "-m", "jobs.cli", "train", str(root / "t.yaml"), "--no-progress"],
            {**os.environ, TRACE: str(root / "trace")})
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "config": text, "points": {1: traced_points(root / "trace")}}


@pytest.mark.parametrize("case", range(TRAIN_N))
def test_train_killed_at_a_crash_point_resumes_to_the_same_weights(train_runs, case, tmp_path):
    """Weights bit-identical to the uninterrupted run's, and final.json reports the same last epoch."""
    _, name, n = schedule(train_runs["points"], TRAIN_N, [
        (1, r"^rename:last\.pt"),  # between a checkpoint's temporary copy and its rename
        (1, r"^train:step"),
        (1, r"^(write|rename|wrote):final\.json"),
    ])[case]
    out = tmp_path / "run"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(train_runs["config"].replace("OUT", str(out)))
    cmd = [sys.executable, "-m", "jobs.cli", "train", str(cfg), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != TRACE}
    marker = tmp_path / "killed"
    r = run(cmd, env | {AT: f"{name}#{n}", MARKER: str(marker)})
    assert marker.exists() and r.returncode == -signal.SIGKILL, f"{name}#{n}: {r.returncode} {r.stderr[-2000:]}"
    again = run(cmd, env)
    assert again.returncode == 0, again.stderr[-3000:]
    ref = train_runs["root"] / "ref"
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=f"{name}#{n}: {k}")
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (ref, out))
    assert (fa["epoch"], fa["step"]) == (fb["epoch"], fb["step"]), f"{name}#{n}: final.json {fb}"


def test_a_reader_during_a_growth_reads_the_previous_extent(cache_runs, small_digits, tmp_path):
    """A second team reads while the owner grows the cache, held mid-unit (new shards half written): through
    the CLI, ``inspect`` sees the complete 1-view cache and a student trained from it ends with the weights of
    one trained from a copy taken before the growth (no torn read); the growth then finishes and verifies."""
    root = cache_runs["root"]
    out, before = tmp_path / "out.zarr", tmp_path / "before.zarr"
    shutil.copytree(root / "stage1.zarr", out)
    shutil.copytree(root / "stage1.zarr", before)
    cfg = tmp_path / "c2.yaml"
    cfg.write_text(cache_runs["configs"][2].replace("OUT", str(out)))
    hold = next(f"{name}#{n}" for name, n in cache_runs["points"][2] if name.startswith("shard:"))
    trace, release = tmp_path / "trace", tmp_path / "release"
    env = {k: v for k, v in os.environ.items() if k != TRACE} | {"RAY_ADDRESS": ""}
    owner = subprocess.Popen([sys.executable, "-m", "jobs.cli", "cache", str(cfg), "--no-progress"],
                             env=env | {TRACE: str(trace), HOLD_AT: hold, HOLD_UNTIL: str(release)},
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (trace.exists() and hold.split("#")[0] in trace.read_text()) and time.time() < deadline:
            assert owner.poll() is None, owner.communicate()[1][-3000:]
            time.sleep(0.2)
        assert (out / layout.GROWTH).exists(), "the owner is not held inside its growth"
        # the owner's actors live on while it is held: the reader's runs do not wait for them to go
        seen = run([sys.executable, "-m", "jobs.cli", "inspect", str(out), "--json"], env, settle=False)
        assert seen.returncode == 0, seen.stderr[-2000:]
        info = json.loads(seen.stdout)
        assert (info["status"], info["num_views"]) == ("complete", 1), {k: info.get(k) for k in ("status", "num_views")}
        weights = {}
        for name, cache in (("during", out), ("before", before)):
            tcfg = train_config({"path": cache}, small_digits, tmp_path / name,
                                data__val_urls=None).model_dump(mode="json")
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tcfg))
            r = run([sys.executable, "-m", "jobs.cli", "train", str(tmp_path / f"{name}.yaml"), "--no-progress"], env,
                    settle=False)
            assert r.returncode == 0, r.stderr[-3000:]
            weights[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
            if name == "during":
                assert owner.poll() is None and (out / layout.GROWTH).exists(), "the growth ended before the reader"
        for k in weights["before"]:
            torch.testing.assert_close(weights["during"][k], weights["before"][k], rtol=0, atol=0, msg=k)
    finally:
        release.touch()
    _, err = owner.communicate(timeout=300)
    assert owner.returncode == 0, err[-3000:]
    v = run([sys.executable, "-m", "jobs.cli", "verify", str(out)], env)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    a, b = data_files(root / "stage2.zarr"), data_files(out)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


# decode once (issue 15 item 2; tests/pipeline/test_decode_once.py): a kill between two views of one task


def test_actor_killed_between_two_views_of_a_task_resumes_to_the_reference(reference, digits, tiny_teacher,
                                                                            tmp_path):
    """The Ray job on the reference config (2 views a tar, one task each): the actor is killed after the first
    array shard of view 1 of tar 0, its task's view 0 complete. Ray retries the task, which skips view 0 (its record
    is there) and redoes view 1 whole; the cache is the reference byte for byte, and verifies."""
    out = tmp_path / "out.zarr"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(cache_config(digits, tiny_teacher, str(out), job__lease_ttl_s=2.0)))
    first = next(iter(reference["manifest"].arrays))
    marker = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": "", AT: f"shard:{first} t0 v1#1", MARKER: str(marker)}
    cmd = [sys.executable, "-m", "jobs.cli", "cache", str(cfg), "--no-progress"]
    r = run(cmd, env)
    assert marker.exists(), r.stderr[-2000:]
    assert r.returncode in (0, -signal.SIGKILL), r.stderr[-3000:]
    if r.returncode != 0:  # the driver went down with its actor: resume
        time.sleep(2.5)  # the dead driver's lease expires
        r = run(cmd + ["--resume"], {k: v for k, v in env.items() if k not in (AT, MARKER)})
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = data_files(reference["path"]), data_files(out)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    v = run([sys.executable, "-m", "jobs.cli", "verify", str(out)], env)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    assert np.all([(out / layout.unit_record_path(t, w)).exists() for t in range(4) for w in range(2)])
