"""``kdcache verify``: a clean cache passes every check; a flipped byte anywhere is found and named."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from jobs.cli import main as cli
from pipeline.store import CacheStore
from pipeline.verify import verify_cache
from storage_schemas import layout


@pytest.fixture
def copy(small_cache, tmp_path):
    dst = tmp_path / "cache.zarr"
    shutil.copytree(small_cache["path"], dst)
    return dst


def check(path, **kw):
    return verify_cache(CacheStore(str(path), read_only=True), progress=False, **kw)


def test_clean_cache_passes_with_the_live_teacher(copy, small_cache, tiny_teacher):
    rep = check(copy, teacher_checkpoint=tiny_teacher["checkpoint"], samples=24)
    assert rep.ok, rep.problems
    m = small_cache["manifest"]
    units = len(m.dataset.shards) * m.num_views
    assert rep.checked["unit records"] == units and rep.checked["units decoded"] == units
    assert rep.checked["array shards hashed"] == units * len(m.arrays)
    assert rep.checked["teacher views replayed"] == 24 and rep.checked["objects hashed"] > 10


def _flip(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# one object of every kind the store holds; a flipped bit in each must be reported by path
KINDS = {
    "array shard (feature)": lambda root: next((root / "feat_final" / "c").rglob("*")),
    "array shard (logits)": lambda root: sorted(p for p in (root / "logits_topk_values" / "c").rglob("*")
                                                if p.is_file())[-1],
    "array metadata": lambda root: root / "label" / "zarr.json",
    "unit record": lambda root: root / layout.unit_record_path(1, 1),
    "index": lambda root: root / layout.index_path(2),
    "tpp weights": lambda root: root / layout.TPP_WEIGHTS,
    "tpp spec": lambda root: root / layout.TPP_SPEC,
    "manifest": lambda root: root / layout.MANIFEST,
    "manifest sidecar": lambda root: root / layout.MANIFEST_SHA256,
    "checksums": lambda root: root / layout.CHECKSUMS,
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_is_detected_and_named(copy, kind):
    target = KINDS[kind](copy)
    while target.is_dir():
        target = next(p for p in target.iterdir())
    _flip(target)
    rep = check(copy)
    assert not rep.ok
    rel = target.relative_to(copy).as_posix()
    named = {"manifest sidecar": layout.MANIFEST, "manifest": layout.MANIFEST}.get(kind, rel)
    assert any(named in p for p in rep.problems), rep.problems


def test_wrong_teacher_and_tampered_weights_are_refused(copy, tiny_teacher, tmp_path):
    sd = load_file(tiny_teacher["checkpoint"])
    k = next(iter(sd))
    sd[k] = sd[k] + 1e-3
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    rep = check(copy, teacher_checkpoint=str(other), samples=4)
    assert any("weights sha256" in p for p in rep.problems)


def test_a_record_that_disagrees_with_the_manifest_is_reported(copy):
    rec_path = copy / layout.unit_record_path(0, 0)
    rec = json.loads(rec_path.read_text())
    rec["valid"] -= 1
    rec_path.write_text(json.dumps(rec))
    problems = check(copy).problems
    assert any("valid" in p and "s000000-v0000" in p for p in problems)
    assert any(layout.unit_record_path(0, 0) in p and "sha256" in p for p in problems)  # also off its checksum


def test_a_manifest_naming_another_array_is_reported_not_a_crash(copy):
    """A manifest that still parses but whose array table was altered (a renamed array): every record
    disagrees with it, and verify says so instead of failing on the totals it cannot recompute."""
    m = json.loads((copy / layout.MANIFEST).read_text())
    m["arrays"]["lbbel"] = m["arrays"].pop("label")
    (copy / layout.MANIFEST).write_text(json.dumps(m))
    problems = check(copy).problems
    assert any("does not match" in p for p in problems)  # the sidecar
    assert any("records arrays" in p and "s000000-v0000" in p for p in problems)


def test_cli_exit_codes(copy, capsys):
    assert cli(["verify", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    (copy / layout.index_path(0)).write_text('{"url": "x", "keys": []}')
    assert cli(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and layout.index_path(0) in out and "FAILED" in out
