"""Caches written before the target-contract reshape (schema 1.2, ``tests/fixtures/legacy``, made by
``make.py`` at commit 337f13e) still parse, verify against their teacher, serve the live teacher's
targets and train; and today's job, given the same config, writes the very same bytes — but for the last bits of
the teacher's float outputs on a CPU of another kind than the one that made the fixture (see
:func:`test_todays_job_writes_the_same_bytes`)."""

from __future__ import annotations

import filecmp
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from safetensors.torch import load_file

from pipeline.store import CacheStore
from pipeline.verify import verify_cache
from pipeline.views import apply_view
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import Manifest
from student.data import CacheDataset

FIXTURE = Path(__file__).parent.parent / "fixtures" / "legacy"
ROOT = Path("/tmp/kdcache-legacy-v1.2")  # where make.py wrote them: a manifest records absolute input URLs
NAMES = ("topk_fp16", "full_int8")
VOLATILE = {"created", "updated", "library_versions", "schema_version", "checksums_sha256", "history"}


@pytest.fixture(scope="module")
def legacy() -> Path:
    """The fixture at the absolute path its manifests name: copied there whole (a fresh copy renamed into
    place) unless an identical copy is there already."""
    if ROOT.exists():
        cmp = filecmp.dircmp(FIXTURE, ROOT, ignore=["make.py"])
        if _same(cmp):
            return ROOT
        shutil.rmtree(ROOT)
    tmp = ROOT.with_name(f"{ROOT.name}.tmp-{uuid.uuid4().hex}")
    shutil.copytree(FIXTURE, tmp, ignore=shutil.ignore_patterns("make.py", "__pycache__"))
    try:
        tmp.rename(ROOT)
    except OSError:  # another test process put it there first
        shutil.rmtree(tmp)
    return ROOT


def _same(cmp: filecmp.dircmp) -> bool:
    return (not cmp.left_only and not cmp.right_only and not cmp.diff_files and not cmp.funny_files
            and all(_same(sub) for sub in cmp.subdirs.values()))


def manifest(root: Path, name: str) -> Manifest:
    return Manifest.parse((root / f"{name}.zarr" / layout.MANIFEST).read_text(), where=name)


def live_teacher(root: Path) -> torch.nn.Module:
    m = manifest(root, NAMES[0])
    model = timm.create_model(m.teacher.model, **m.teacher.model_kwargs)
    model.load_state_dict(load_file(str(root / "teacher.safetensors")))
    return model.eval()


def test_legacy_manifests_read_typed(legacy):
    for name in NAMES:
        raw = json.loads((legacy / f"{name}.zarr" / layout.MANIFEST).read_text())
        m = manifest(legacy, name)
        assert raw["schema_version"] == "1.2" and m.teacher.num_levels is None
        # typed, and dumped back to the same JSON, plus the key schema 1.8 always writes: zstd, as the taps are
        # stored (their zarr.json's chain, the independent witness)
        raw["config"]["output"]["feature_compression"] = "zstd"
        assert m.config.public_dict() == raw["config"]
        for tap in m.features:
            meta = json.loads((legacy / f"{name}.zarr" / f"feat_{tap.name}" / "zarr.json").read_text())
            assert "zstd" in json.dumps(meta["codecs"]) and m.compressed(f"feat_{tap.name}")
        assert m.content_identity() == raw["identity"]
        assert m.num_levels == 3  # derived from a tap asked for with a negative index
    assert [c.label() for c in manifest(legacy, "topk_fp16").codecs()] == [
        "logits:top5", "feature:block0:fp16", "feature:final:fp16"]
    assert [c.label() for c in manifest(legacy, "full_int8").codecs()] == [
        "logits:all", "feature:block1:int8", "feature:last:int8"]


@pytest.mark.parametrize("name", NAMES)
def test_legacy_cache_verifies_against_its_teacher(legacy, name):
    rep = verify_cache(CacheStore(str(legacy / f"{name}.zarr"), read_only=True),
                       teacher_checkpoint=str(legacy / "teacher.safetensors"), samples=16, progress=False)
    assert rep.ok, rep.problems
    assert rep.checked["teacher views replayed"] == 16 and rep.checked["array shards hashed"] > 40


@pytest.mark.parametrize("name", NAMES)
def test_legacy_cache_serves_the_live_teachers_targets(legacy, name):
    """Decoded through today's codecs, an old cache's rows are the teacher's outputs on the replayed views
    (timm called directly): logits and tokens within the stored precision."""
    m = manifest(legacy, name)
    teacher = live_teacher(legacy)
    taps = [t.name for t in m.features]
    ds = CacheDataset(str(legacy / f"{name}.zarr"), size=32, mean=m.teacher.mean, std=m.teacher.std, taps=taps)
    samples = list(ds)
    assert len(samples) == m.dataset.num_samples - m.stats.num_skipped == 32
    batch = ds.collate(samples)
    x = torch.stack([apply_view(s.image, s.record, m.config.views, size=32, mean=m.teacher.mean, std=m.teacher.std)
                     for s in samples])
    torch.testing.assert_close(x, batch.x)
    with torch.no_grad():
        final, inters = teacher.forward_intermediates(x, indices=[0, 1, 2], output_fmt="NLC",
                                                      return_prefix_tokens=True)
        logits = teacher.forward_head(final)
    t = batch.targets
    if m.logits.mode == "topk":
        values, idx = logits.topk(5, -1)
        assert torch.equal(t.topk.indices, idx)
        torch.testing.assert_close(t.topk.values, values, atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(t.topk.logsumexp, logits.logsumexp(-1))
    else:
        torch.testing.assert_close(t.logits, logits, atol=1e-2, rtol=1e-3)
    for tap in m.features:
        spatial, prefix = inters[tap.index]
        want = final if tap.norm else torch.cat([prefix, spatial], 1)
        want = want[:, prefix.shape[1]:] if tap.prefix_tokens == 0 else want
        scale = want.abs().amax(-1, keepdim=True) / 127 if tap.dtype == "int8" else 1e-3 * want.abs().amax()
        assert torch.all((t.features[tap.name] - want).abs() <= scale + 1e-3), tap.name


def test_legacy_cache_trains(legacy, tmp_path):
    from student.config import TrainConfig
    from student.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "cache": {"url": str(legacy / "topk_fp16.zarr")},
        "student": {"model": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 4,
                                                                       "embed_dim": 32, "num_heads": 2,
                                                                       "num_classes": 10}},
        "methods": "ce+kd+scalekd", "data": {"batch_size": 16}, "optim": {"epochs": 1, "warmup_epochs": 0},
        "output": str(tmp_path / "run"), "log_every": 1,
    })
    result = Trainer(cfg, progress=False).fit()
    assert result["step"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_scalekd_s4_spat"]) and r["loss_kd"] > 0 for r in logged if "loss" in r)


# The arrays of the teacher's outputs (its target codecs' arrays): the same bytes on the same kind of CPU; on
# another, its float kernels round differently (rebuilt on an AMD EPYC of family 26, 2026-12-02, where torch runs
# its AVX-512 kernels, not the kind of CPU that made the fixture, on which the test had passed until then: 39 of
# 49,152 fp16 block0 values and 65 of final's were one fp16 step apart or, near zero, a few; 754 of 1,632 int8
# scales a few float32 steps; no int8 code). Their integer arrays (top-k indices) must not change at all.
TPP_STATS = "tpp/input_stats.safetensors"


def _within_rounding(name: str, old: np.ndarray, new: np.ndarray) -> None:
    """``new`` is ``old`` up to float32 rounding in the forward: a value stored coarser than the forward (fp16, an
    int8 code) differs in at most 1 % of the values, each by one step of its dtype (fp16: or, for a value near zero,
    where the forward's float32 differences are no longer below fp16's step, half a step at its row's largest
    magnitude); a float32 value by at most 1e-5 of the array's largest magnitude. A wrong view, tap or codec moves
    most values by far more."""
    assert old.shape == new.shape and old.dtype == new.dtype, name
    diff = np.abs(new.astype(np.float64) - old.astype(np.float64))
    if old.dtype == np.float32:
        assert diff.max() <= 1e-5 * np.abs(old).max(), (name, diff.max())
        return
    assert old.dtype in (np.int8, np.float16), (name, old.dtype)  # not an index: those stay the same bytes
    if old.dtype == np.int8:
        step = 1.0
    else:
        wide = np.maximum(np.abs(old), np.abs(new)).astype(np.float64)
        step = np.maximum(np.spacing(wide.astype(np.float16)), 2**-11 * wide.max(axis=-1, keepdims=True))
    assert np.all(diff <= step), (name, diff.max())
    assert np.count_nonzero(diff) <= 0.01 * diff.size, (name, np.count_nonzero(diff), diff.size)


def _close(a, b, rtol: float) -> bool:
    """Two JSON values equal, their floats up to ``rtol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return isinstance(b, float) and abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_todays_job_writes_the_same_bytes(legacy, name, tmp_path):
    """Every object an old cache holds is written again byte for byte, except the manifest (timestamps,
    versions) and what hashes it; the completion records differ in their timing only. Since schema 1.4 a
    top-k cache also stores the teacher's rest mass (``logits_rest_logmass``): the only new objects, and the
    only new entries in the records and the manifest. Built in process (``tests/pipeline/test_job.py`` shows
    the Ray job writes what the in-process build writes).

    On a CPU of another kind than the fixture's the teacher's float kernels round differently, so the arrays of its
    float outputs (the arrays of its target codecs), the TPP input statistics and the records' hashes of those arrays, sums
    and fidelity figures may differ in their last bits there (:func:`_within_rounding`); everything else — the
    arrays' metadata, labels, view records, fingerprints, top-k indices, predictions, the TPP pack, the index —
    is still the same bytes."""
    from safetensors.numpy import load as load_safetensors

    from pipeline.job import build_cache_in_process

    old = manifest(legacy, name)
    out = tmp_path / f"{name}.zarr"
    # its config as it reads today (1.2 knew one chain: zstd; since 1.8 the default is none, so it is asked for)
    cfg = CacheConfig.model_validate({**old.config.public_dict(), "output": {
        "url": str(out), "feature_compression": old.config.output.feature_compression}})
    new = build_cache_in_process(cfg, log=lambda s: None)
    src = legacy / f"{name}.zarr"
    a = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    b = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rest = "logits_rest_logmass"
    added = {k for k in b.keys() - a.keys()}
    assert a.keys() <= b.keys() and len(a) > 40
    assert all(k.split("/")[0] == rest for k in added) and bool(added) == (old.logits.mode == "topk")
    timed = {layout.MANIFEST, layout.MANIFEST_SHA256, layout.CHECKSUMS}
    differ = [k for k in a if k not in timed and not k.startswith(layout.UNITS_DIR) and a[k] != b[k]]
    teacher = {n for c in old.codecs() for n in c.names}
    chunks = [k for k in differ if k.split("/")[0] in teacher and not k.endswith("/zarr.json")]  # never metadata
    assert [k for k in differ if k not in chunks and k != TPP_STATS] == []
    rounded = {k.split("/")[0] for k in chunks}
    za, zb = (zarr.open_group(str(root), mode="r") for root in (src, out))
    for arr in rounded:
        _within_rounding(arr, za[arr][...], zb[arr][...])
    if TPP_STATS in differ:
        sa, sb = (load_safetensors(x[TPP_STATS]) for x in (a, b))
        assert sa.keys() == sb.keys() and all(np.allclose(sa[k], sb[k], rtol=1e-5, atol=0) for k in sa)
    for k in (k for k in a if k.startswith(layout.UNITS_DIR)):
        ra, rb = json.loads(a[k]), json.loads(b[k])
        for f in ("array_sha256", "array_bytes"):
            rb[f].pop(rest, None)
            # a shard of rounded values has another hash (and, through zstd, maybe another size)
            ra[f], rb[f] = ({n: v for n, v in r[f].items() if n not in rounded} for r in (ra, rb))
        assert {f for f in ra if ra[f] != rb[f]} - {"seconds"} <= {"fidelity", "tpp_input_sum", "tpp_input_sumsq"}, k
        assert all(_close(ra[f], rb[f], rtol=1e-3 if f == "fidelity" else 1e-5) for f in
                   ("fidelity", "tpp_input_sum", "tpp_input_sumsq")), k
    ma, mb = (json.loads(x[layout.MANIFEST]) for x in (a, b))
    assert {f for f in ma.keys() | mb.keys() if ma.get(f) != mb.get(f)} - VOLATILE <= {
        "config", "teacher", "stats", "logits", "arrays"}
    assert {k for k in ma["config"] if ma["config"][k] != mb["config"][k]} == {"output"}
    assert mb["teacher"] == {**ma["teacher"], "num_levels": 3}
    assert mb["logits"] == {**ma["logits"], "rest_logmass": old.logits.mode == "topk"}
    assert {k: v for k, v in mb["arrays"].items() if k != rest} == ma["arrays"]
    assert {k for k in ma["stats"] if ma["stats"][k] != mb["stats"][k]} <= {
        "seconds", "samples_per_second", "bytes_total", "bytes_per_target", "bytes_per_view", "fidelity"}
    assert _close(ma["stats"]["fidelity"], mb["stats"]["fidelity"], rtol=1e-3)
    assert new.identity == old.identity  # the targets asked for are the same


def test_a_later_minor_with_fields_this_reader_does_not_know_is_read(legacy):
    """A manifest of schema 1.<later> may add optional fields anywhere; this reader ignores them (and still
    refuses unknown fields at its own version, where they mean damage)."""
    raw = json.loads((legacy / "topk_fp16.zarr" / layout.MANIFEST).read_text())
    want = Manifest.parse(json.dumps(raw), "same")
    later = json.loads(json.dumps(raw))
    later["schema_version"] = "1.99"
    later["config"]["output"]["feature_compression"] = "zstd"  # written by every writer since 1.8
    later["new_top_level"] = {"a": 1}
    later["teacher"]["new_teacher_field"] = 3
    later["config"]["targets"]["new_option"] = True
    later["config"]["views"]["crop"]["new_crop_field"] = 0.5
    later["features"][0]["new_tap_field"] = "x"
    later["arrays"]["label"]["new_array_field"] = [1]
    later["tpp"]["spec"]["input"]["new_spec_field"] = 1
    got = Manifest.parse(json.dumps(later), "later")
    assert got.model_dump(exclude={"schema_version"}) == want.model_dump(exclude={"schema_version"})
    raw["teacher"]["new_teacher_field"] = 3
    with pytest.raises(ValueError, match="new_teacher_field"):
        Manifest.parse(json.dumps(raw), "same version, unknown field")
