"""Sharing caches: identity, growth (views, tars), ``--root`` reuse, ``kdcache ls``, configs by identity.

Growth is checked against an independent build: a cache grown from 3 tars × 1 view to 4 tars ×
2 views must hold exactly the bytes of the session's reference cache, built in one go.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml

from jobs.cli import main as cli
from pipeline.catalog import find_cache
from pipeline.store import CacheStore
from pipeline.tars import expand_urls
from pipeline.verify import verify_cache
from storage_schemas import layout
from storage_schemas.manifest import Manifest
from tests.conftest import cache_config
from tests.pipeline.test_job import data_files

pytestmark = pytest.mark.ray


def write_yaml(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def records(root: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((root / layout.UNITS_DIR).glob("*.json"))}


def test_grown_cache_equals_one_built_in_one_go(reference, digits, tiny_teacher, ray_local, tmp_path, capsys):
    tars = expand_urls(digits["train"])
    out = tmp_path / "grown.zarr"
    base = cache_config(digits, tiny_teacher, str(out))
    base["input"]["urls"] = tars[:3]
    base["views"]["num_views"] = 1
    assert cli(["cache", write_yaml(tmp_path / "c.yaml", base), "--no-progress"]) == 0
    first = {n: (out / layout.UNITS_DIR / n).stat().st_mtime_ns for n in records(out)}
    assert len(first) == 3

    # more views: only view 1 of each tar is computed, view 0 is left alone
    assert cli(["cache", str(tmp_path / "c.yaml"), "--set", "views.num_views=2", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "views 1 → 2" in log and "only the 3 new units are computed" in log
    assert {n: (out / layout.UNITS_DIR / n).stat().st_mtime_ns for n in first} == first
    assert len(records(out)) == 6 and not (out / layout.GROWTH).exists()

    # more tars of the same dataset: only the new tar's two units are computed
    base["input"]["urls"], base["views"]["num_views"] = tars, 2
    assert cli(["cache", write_yaml(tmp_path / "c4.yaml", base), "--no-progress"]) == 0
    assert "tars 3 → 4; only the 2 new units are computed" in capsys.readouterr().out
    assert {n: (out / layout.UNITS_DIR / n).stat().st_mtime_ns for n in first} == first

    ref_path = reference["path"]
    assert data_files(out) == data_files(ref_path)  # arrays, index, TPP pack and stats: byte for byte
    want = {n: r["array_sha256"] for n, r in records(ref_path).items()}
    assert {n: r["array_sha256"] for n, r in records(out).items()} == want
    m = CacheStore(str(out), read_only=True).read_manifest()
    ref = reference["manifest"]
    assert m.identity == ref.identity == ref.content_identity()
    assert (m.dataset, m.stats.num_valid_rows, m.stats.bytes_total) == (ref.dataset, ref.stats.num_valid_rows,
                                                                        ref.stats.bytes_total)
    assert [(h.action, tuple(h.views), len(h.shards_added)) for h in m.history] == [
        ("create", (0, 1), 3), ("grow", (1, 2), 0), ("grow", (2, 2), 1)]
    assert m.history[-1].shards_added == [tars[3]] and m.history[-1].identity == m.identity
    assert m.history[0].identity == m.history[1].identity != m.history[2].identity  # views keep it, tars change it
    rep = verify_cache(CacheStore(str(out), read_only=True), progress=False)
    assert rep.ok, rep.problems
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask}  # readable by other teams as a plain open() would make it, not 0600

    # fewer views than the cache has: reused as is; other tars in front: refused, naming what differs
    assert cli(["cache", str(tmp_path / "c4.yaml"), "--set", "views.num_views=1", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    base["input"]["urls"] = tars[1:]
    assert cli(["cache", write_yaml(tmp_path / "bad.yaml", base), "--no-progress"]) == 2
    assert "input tars" in capsys.readouterr().err


def test_identity_is_the_documented_content_key(reference, digits):
    """Recomputed by hand from its definition: teacher fields, tars (url, size, sample count), recipe
    without num_views, targets."""
    m, cfg = reference["manifest"], reference["cfg"].public_dict()

    def key(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    rows = []
    for url in expand_urls(digits["train"]):
        with tarfile.open(url) as tf:
            n = len({Path(t.name).name.split(".")[0] for t in tf.getmembers() if t.isfile()})
        rows.append([url, os.path.getsize(url), n])
    fingerprint = key(rows)
    t = m.teacher
    teacher = {"model": t.model, "model_kwargs": t.model_kwargs, "weights_sha256": t.weights_sha256,
               "input_size": t.input_size, "mean": list(t.mean), "std": list(t.std)}
    views = {k: v for k, v in cfg["views"].items() if k != "num_views"}
    lineage = key({"teacher": teacher, "views": views, "targets": cfg["targets"]})
    assert m.dataset.fingerprint == fingerprint
    assert m.identity == key({"lineage": lineage, "dataset": fingerprint})
    assert json.loads(m.model_dump_json())["identity"] == m.identity  # stored, and shown by inspect:
    assert Manifest.model_validate_json(m.model_dump_json()).summary()["identity"] == m.identity


def small(digits, teacher, tars, views=1, **targets) -> dict:
    cfg = cache_config(digits, teacher, "unused")
    cfg["input"]["urls"] = tars
    cfg["views"]["num_views"] = views
    cfg["targets"] = {"logits": {"mode": "topk", "k": 3}, "features": [], **targets}
    return cfg


def s3_objects(fs, url: str) -> dict[str, str]:
    return {p: d["ETag"] for p, d in fs.find(url, detail=True).items()}


def test_root_reuse_grow_extend_and_ls_on_s3(moto_s3, digits, tiny_teacher, ray_local, tmp_path, capsys):
    """Several caches under one s3:// root: ``cache --root`` creates, reuses (nothing written),
    grows, extends or creates anew and says which; ``ls`` lists them all; a student config finds one
    by identity."""
    import s3fs

    opts = moto_s3["storage_options"]
    fs = s3fs.S3FileSystem(**opts)
    root = f"s3://{moto_s3['bucket']}/teams"
    so = ["--storage-option", f"endpoint_url={moto_s3['endpoint']}", "--storage-option", "key=testing",
          "--storage-option", f"secret={opts['secret']}"]
    tars = expand_urls(digits["train"])

    def cache(cfg: dict, name: str) -> str:
        cfg = {**cfg, "output": {"root": root, "storage_options": opts}}
        assert cli(["cache", write_yaml(tmp_path / name, cfg), "--no-progress"]) == 0
        return capsys.readouterr().out

    a = small(digits, tiny_teacher, tars[:2])
    log = cache(a, "a.yaml")
    assert "creating a new cache at s3://kdcache/teams/vit_tiny_patch16_224-" in log
    url_a = next(line.split()[-1] for line in log.splitlines() if line.startswith("cache "))
    before = s3_objects(fs, url_a)
    assert "nothing to compute" in cache(a, "a.yaml")  # the same request: reused, not a byte written
    assert s3_objects(fs, url_a) == before

    assert "adding views 1..1 only" in cache(small(digits, tiny_teacher, tars[:2], views=2), "a2.yaml")
    log = cache(small(digits, tiny_teacher, tars[:3], views=2), "a3.yaml")
    assert "extending cache" in log and url_a in log and "1 new tar(s)" in log
    b = small(digits, tiny_teacher, tars[:1], feature_dtype="int8", features=[{"name": "block0", "index": 0}])
    assert "creating a new cache" in cache(b, "b.yaml")  # other targets: another identity

    fs.pipe(f"{root}/starting.zarr/{layout.LEASE}", json.dumps({"job_id": "j1", "host": "h", "started": "t"}).encode())
    fs.pipe(f"{root}/nested/old.zarr/{layout.MANIFEST}", json.dumps({"schema_version": "9.0"}).encode())

    assert cli(["ls", root, "--json", *so]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_status = sorted((e["status"], e["num_views"], e["num_shards"]) for e in listing)
    assert by_status == [("complete", 1, 1), ("complete", 2, 3), ("starting", 0, 0), ("unreadable", 0, 0)]
    for e in listing:
        if e["status"] == "complete":
            m = CacheStore(e["url"], opts, read_only=True).read_manifest()
            assert e["identity"] == m.identity == m.content_identity() and e["bytes_total"] > 0
    assert "9.0" in next(e["problem"] for e in listing if e["status"] == "unreadable")
    assert opts["secret"] not in json.dumps(listing)
    assert cli(["ls", root, *so]) == 0
    text = capsys.readouterr().out
    assert all(e["identity"][:12] in text for e in listing if e["identity"])

    # a student config names the cache by identity under the root
    from student.config import TrainConfig
    from student.trainer import Trainer

    ident = next(e["identity"] for e in listing if e["num_shards"] == 3)
    assert find_cache(root, ident[:8], opts).url == url_a
    cfg = TrainConfig.model_validate({
        "cache": {"root": root, "id": ident[:8], "storage_options": opts},
        "student": {"model": "resnet18", "model_kwargs": {"num_classes": 10}, "input_size": 32},
        "methods": "ce+kd", "output": str(tmp_path / "run")})
    assert Trainer(cfg, progress=False).cache_url == url_a
    with pytest.raises(FileNotFoundError, match="no cache with identity 0000000"):
        find_cache(root, "0000000", opts)
    with pytest.raises(ValueError, match="at least 6 hex digits"):
        find_cache(root, "abc", opts)
