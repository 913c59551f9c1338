"""``kdcache export-wds``: the exported tars, read back with plain webdataset, hold exactly the input
tars' image bytes and the cache's rows (read here through zarr directly); reruns keep finished tars;
another cache's export is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from PIL import Image

from jobs.cli import main as cli
from pipeline.job import run_cache_job
from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import Manifest
from storage_schemas.views import RAND_OPS
from tests.conftest import cache_config, damaged_copy
from tests.pipeline.test_tars import encode, sample, write_tar

pytestmark = pytest.mark.ray
RECORD = {A.VIEW_CROP, A.VIEW_FLIP, A.VIEW_OPS, A.VIEW_OP_MAGS, A.VIEW_ERASE, A.VIEW_NOISE_SEED}


BAD = [("broken.png", b"\x89PNG not really"), ("broken.cls", b"4"), ("nolabel.png", encode(Image.new("RGB", (5, 5))))]


@pytest.fixture(scope="module")
def skip_cache(tiny_teacher, ray_local, tmp_path_factory) -> Path:
    """A second cache: a JPEG, a key in a folder, a metadata member, and two samples the job skipped."""
    d = tmp_path_factory.mktemp("skipin")
    jpg = encode(Image.new("RGB", (6, 4), (200, 10, 30)), "JPEG", quality=90)
    write_tar(d / "in-000000.tar", sample("ok00", 2) + [("dir/j01.cls", b"7"), ("dir/j01.jpg", jpg)]
              + sample("ok02", 4) + [("ok02.json", b'{"source": "x"}')])
    write_tar(d / "in-000001.tar", sample("a00", 3) + BAD + sample("a01", 5))
    cfg = cache_config({"train": str(d / "in-{000000..000001}.tar")}, tiny_teacher, str(d / "c.zarr"),
                       input__on_bad_sample="skip")
    cfg["targets"]["tpp"] = None
    run_cache_job(CacheConfig.model_validate(cfg), progress=False, log=lambda s: None)
    return d / "c.zarr"


def read_export(out: Path) -> list[dict]:
    """The export as plain webdataset reads it: json, cls and npy decoded, images left as bytes."""
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def tar_members(url: str) -> dict[str, bytes]:
    with tarfile.open(url) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isreg()}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_export(cache: Path, out: Path) -> dict:
    """Every valid sample exported once, in tar order, equal to the input member bytes and the zarr rows."""
    m = Manifest.model_validate_json((cache / layout.MANIFEST).read_text())
    g = zarr.open_group(str(cache), mode="r")
    arrays = {n: g[n] for n in m.arrays}
    got = read_export(out)
    targets = set(m.arrays) - RECORD - {A.LABEL, A.VALID}
    assert {A.PRED_TOP1, A.VIEW_FINGERPRINT} <= targets and any(n.startswith("feat_") for n in targets)
    by_url = {}
    for s in got:
        by_url.setdefault(Path(s["__url__"]).name, []).append(s)
    exp = json.loads((out / "export.json").read_text())
    V, S, skipped = m.num_views, m.rows_per_shard, 0
    for i, sh in enumerate(m.dataset.shards):
        tar = out / f"shard-{i:06d}.tar"
        assert exp["shards"][i]["sha256"] == sha(tar) and exp["shards"][i]["bytes"] == tar.stat().st_size
        with tarfile.open(tar) as t:
            assert not any(mi.pax_headers for mi in t.getmembers())  # plain ustar members for these keys
        members = tar_members(sh.url)
        keys = json.loads((cache / layout.index_path(i)).read_text())["keys"]
        rows = {n: a[i * S:i * S + sh.count, :] for n, a in arrays.items()}
        valid = [p for p in range(sh.count) if rows[A.VALID][p].all()]
        skipped += sh.count - len(valid)
        samples = by_url.get(tar.name, [])
        assert [s["__key__"] for s in samples] == [keys[p] for p in valid]
        for s, p in zip(samples, valid, strict=True):
            key = s["__key__"]
            images = {e: s[e] for e in ("jpg", "jpeg", "png", "webp") if e in s}
            (ext, data), = images.items()
            assert data == members[f"{key}.{ext}"]  # the input's bytes, not re-encoded
            assert s.get("json") == (json.loads(members[f"{key}.json"]) if f"{key}.json" in members else None)
            assert s["cls"] == int(members[f"{key}.cls"]) == rows[A.LABEL][p, 0]
            assert {k[:-4] for k in s if k.endswith(".npy")} == targets
            for n in targets:
                a = s[f"{n}.npy"]
                assert a.dtype == arrays[n].dtype and a.shape == (V, *arrays[n].shape[2:])
                assert a.tobytes() == rows[n][p].tobytes()  # exact, NaN-safe
            views = s["views.json"]
            assert len(views) == V
            for v, rec in enumerate(views):
                assert np.array_equal(np.float32(rec["crop"]), rows[A.VIEW_CROP][p, v])
                assert rec["flip"] == bool(rows[A.VIEW_FLIP][p, v])
                assert rec["noise_seed"] == int(rows[A.VIEW_NOISE_SEED][p, v])
                codes = rows[A.VIEW_OPS][p, v]
                assert [o["name"] for o in rec["ops"]] == [RAND_OPS[c] for c in codes if c >= 0]
                assert np.array_equal(np.float32([o["magnitude"] for o in rec["ops"]]),
                                      rows[A.VIEW_OP_MAGS][p, v][codes >= 0])
                boxes = rows[A.VIEW_ERASE][p, v]
                assert np.array_equal(np.float32(rec["erase"]).reshape(-1, 4), boxes[boxes[:, 2] > 0])
        assert exp["shards"][i]["samples"] == len(valid) and exp["shards"][i]["skipped"] == sh.count - len(valid)
    assert len(got) == m.stats.num_valid_rows // V and skipped == m.stats.num_skipped
    assert exp["identity"] == m.identity and exp["num_views"] == V and exp["missing"] == []
    cached = Manifest.model_validate_json((out / "cache-manifest.json").read_text())
    assert cached.model_dump() == m.model_dump()
    return exp


def test_export_equals_input_tars_and_cache(reference, tmp_path):
    out = tmp_path / "wds"
    assert cli(["export-wds", str(reference["path"]), str(out), "--no-progress"]) == 0
    exp = check_export(reference["path"], out)
    assert sum(s["samples"] for s in exp["shards"]) == reference["manifest"].dataset.num_samples
    assert not list(out.glob(".tmp-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # readable by other teams


def test_skipped_samples_left_out_and_originals_kept(skip_cache, tmp_path):
    out = tmp_path / "wds"
    assert cli(["export-wds", str(skip_cache), str(out), "--no-progress"]) == 0
    exp = check_export(skip_cache, out)
    assert [(s["samples"], s["skipped"]) for s in exp["shards"]] == [(3, 0), (2, 2)]
    keys = [s["__key__"] for s in read_export(out)]
    assert keys == ["ok00", "dir/j01", "ok02", "a00", "a01"]


def test_rerun_keeps_tars_and_another_cache_is_refused(reference, skip_cache, tmp_path, capsys):
    out = tmp_path / "wds"
    assert cli(["export-wds", str(reference["path"]), str(out), "--no-progress"]) == 0
    tars = sorted(out.glob("shard-*"))
    before = {p.name: (p.stat().st_mtime_ns, sha(p)) for p in tars}
    assert cli(["export-wds", str(reference["path"]), str(out), "--no-progress"]) == 0
    assert {p.name: (p.stat().st_mtime_ns, sha(p)) for p in tars} == before
    assert "already exported" in capsys.readouterr().out
    damaged = out / "shard-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])  # cut short: its sha256 no longer matches
    assert cli(["export-wds", str(reference["path"]), str(out), "--no-progress"]) == 0
    assert sha(damaged) == before[damaged.name][1]  # rewritten, to the same bytes
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before["shard-000000.tar"][0]

    capsys.readouterr()
    assert cli(["export-wds", str(skip_cache), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    ref_id = reference["manifest"].identity
    other = Manifest.model_validate_json((skip_cache / layout.MANIFEST).read_text()).identity
    assert "already holds an export" in err and ref_id[:12] in err and other[:12] in err
    assert str(reference["path"]) in err and str(skip_cache) in err
    assert {p.name: sha(p) for p in tars} == {k: v[1] for k, v in before.items()}


def test_partial_cache_needs_allow_partial(reference, tmp_path, capsys):
    cache = tmp_path / "partial.zarr"
    shutil.copytree(reference["path"], cache)
    raw = json.loads((cache / layout.MANIFEST).read_text())
    (cache / layout.MANIFEST).write_text(json.dumps({**raw, "status": "building"}))
    (cache / layout.unit_record_path(1, 1)).unlink()
    out = tmp_path / "wds"
    assert cli(["export-wds", str(cache), str(out), "--no-progress"]) == 2
    assert "--allow-partial" in capsys.readouterr().err and not out.exists()
    assert cli(["export-wds", str(cache), str(out), "--no-progress", "--allow-partial"]) == 0
    exp = json.loads((out / "export.json").read_text())
    shards = reference["manifest"].dataset.shards
    assert [s["tar"] for s in exp["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(shards)) if i != 1]
    assert exp["missing"] == [shards[1].url] and exp["cache_status"] == "building"


def test_export_to_s3(reference, moto_s3, tmp_path):
    import s3fs

    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/exports/ref-wds"
    so = ["--out-storage-option", f"key={opts['key']}", "--out-storage-option", f"secret={opts['secret']}",
          "--out-storage-option", f"client_kwargs={json.dumps(opts['client_kwargs'])}"]
    assert cli(["export-wds", str(reference["path"]), url, "--no-progress", *so]) == 0
    local = tmp_path / "local"
    assert cli(["export-wds", str(reference["path"]), str(local), "--no-progress"]) == 0
    fs = s3fs.S3FileSystem(**opts)
    down = tmp_path / "down"
    down.mkdir()
    for p in fs.ls(url.removeprefix("s3://")):
        fs.get_file(p, str(down / Path(p).name))
    tars = sorted(p.name for p in local.glob("shard-*.tar"))
    assert tars and [p.name for p in sorted(down.glob("shard-*.tar"))] == tars
    assert all((down / t).read_bytes() == (local / t).read_bytes() for t in tars)  # deterministic bytes
    assert json.loads((down / "export.json").read_text())["shards"] == json.loads(
        (local / "export.json").read_text())["shards"]
    assert len(read_export(down)) == reference["manifest"].dataset.num_samples


def test_changed_input_tar_is_named(skip_cache, tmp_path, capsys):
    cache = tmp_path / "c.zarr"
    shutil.copytree(skip_cache, cache)
    moved = write_tar(tmp_path / "in-000001.tar", sample("a01", 5) + BAD + sample("a00", 3))  # same size, reordered
    raw = json.loads((cache / layout.MANIFEST).read_text())
    raw["dataset"]["shards"][1]["url"] = moved
    (cache / layout.MANIFEST).write_text(json.dumps(raw))
    assert cli(["export-wds", str(cache), str(tmp_path / "wds"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert moved in err and "key a01" in err and "changed since it was cached" in err
    left = sorted(p.name for p in (tmp_path / "wds").iterdir())  # tar 0 done; no half tar 1, no export.json
    assert left == ["cache-manifest.json", "shard-000000.json", "shard-000000.tar"]


def test_a_damaged_shard_is_one_line_naming_it_and_nothing_half_written(small_cache, tmp_path):
    """Rows are read as the student reads them (``CacheStore.read_unit``): a tap shard that fails its crc32c
    ends ``kdcache export-wds`` with one line naming the shard and `kdcache verify`, and leaves no tar behind."""
    cache = tmp_path / "c.zarr"
    shard = damaged_copy(small_cache, cache, view=1)
    out = tmp_path / "wds"
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "export-wds", str(cache), str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"kdcache export-wds: error: {shard}: inner chunk 0 does not match its crc32c")
    assert "kdcache verify" in lines[0]
    assert not list(out.glob("shard-*.tar")) and not list(out.glob(".tmp-*")) and not (out / "export.json").exists()
