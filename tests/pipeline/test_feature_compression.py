"""``output.feature_compression`` (schema 1.7; ``none`` the default since 1.8): the taps' arrays stored without
zstd, everything else as before — the same values, the same identity, a checksum still on every chunk, and an
existing cache keeps the codec chain it was created with; a manifest of 1.7 or earlier that leaves the key out
(zstd was the default then) is read as zstd."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import CacheStore
from pipeline.tars import expand_urls, index_tar
from storage_schemas import SCHEMA_VERSION
from storage_schemas.codecs import tap_codec
from storage_schemas.config import CacheConfig, OutputConfig
from tests.conftest import cache_config


@pytest.fixture(scope="module")
def zstd_cache(small_digits, tiny_teacher, tmp_path_factory):
    """``small_cache``'s config with ``output.feature_compression: zstd``, built in this process."""
    from pipeline.job import build_cache_in_process

    out = tmp_path_factory.mktemp("zstd") / "cache.zarr"
    cfg = CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(out),
                                                  output__feature_compression="zstd"))
    m = build_cache_in_process(cfg, log=lambda s: None)
    return {"cfg": cfg, "manifest": m, "path": out}


@pytest.fixture()
def raw_cache(small_cache):
    """The default cache (``small_cache``): taps without zstd since schema 1.8."""
    assert "feature_compression" not in small_cache["cfg"].output.model_fields_set  # the default, not asked for
    return small_cache


def _codec_names(path, array: str) -> list[str]:
    """The codec chain of ``array`` as its zarr.json on disk spells it: the sharding codec's inner chain."""
    meta = json.loads((path / array / "zarr.json").read_text())
    (sharding,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    return [c["name"] for c in sharding["configuration"]["codecs"]]


def test_only_the_taps_are_stored_without_zstd(raw_cache, zstd_cache):
    m = raw_cache["manifest"]
    taps = {n for f in m.features for n in tap_codec(f).names}  # the tap's arrays, as its codec names them
    assert len(taps) == len(m.features) == 2 and not taps & {"logits_topk", "label", "valid"}
    for name in m.arrays:
        raw, zstd = _codec_names(raw_cache["path"], name), _codec_names(zstd_cache["path"], name)
        assert zstd == ["bytes", "zstd", "crc32c"], (name, zstd)
        assert raw == (["bytes", "crc32c"] if name in taps else ["bytes", "zstd", "crc32c"]), (name, raw)


def test_raw_taps_hold_the_same_values_and_identity(raw_cache, zstd_cache):
    raw, zstd = CacheStore(str(raw_cache["path"]), read_only=True), CacheStore(str(zstd_cache["path"]),
                                                                                read_only=True)
    m_raw, m_zstd = raw.read_manifest(), zstd.read_manifest()
    assert m_raw.identity == m_zstd.identity == m_zstd.content_identity()  # how bytes are stored is not what they are
    for tar in range(len(m_zstd.dataset.shards)):
        for view in range(m_zstd.num_views):
            a, b = raw.read_unit(m_raw, tar, view), zstd.read_unit(m_zstd, tar, view)
            assert set(a) == set(b)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name} t{tar} v{view}")


def test_raw_taps_take_their_dtype_bytes_and_the_rest_stays_compressed(raw_cache, zstd_cache):
    st_raw, st_zstd = raw_cache["manifest"].stats, zstd_cache["manifest"].stats
    m = raw_cache["manifest"]
    # by hand: a unit stores its chunks that hold a sample, whole (padding rows too), at 2 bytes (fp16) a value,
    # plus 4 bytes of checksum a chunk and 16 of shard index a chunk of the shard
    counts = [s.count for s in m.dataset.shards]
    chunks = [-(-c // m.chunk_rows) for c in counts]
    for f in m.features:
        per_chunk = m.chunk_rows * f.tokens * f.dim * 2 + 4
        stored = sum(n * per_chunk + 16 * (m.rows_per_shard // m.chunk_rows) + 4 for n in chunks) * m.num_views
        assert st_raw.bytes_per_view[f.target] == pytest.approx(stored / (sum(counts) * m.num_views), rel=1e-3)
        assert st_raw.bytes_per_view[f.target] > st_zstd.bytes_per_view[f.target]
    assert st_raw.bytes_per_view["logits"] == st_zstd.bytes_per_view["logits"]


def test_the_manifest_always_says_which(raw_cache, zstd_cache):
    raw = json.loads((raw_cache["path"] / "manifest.json").read_text())
    zstd = json.loads((zstd_cache["path"] / "manifest.json").read_text())
    assert raw["schema_version"] == zstd["schema_version"] == SCHEMA_VERSION == "1.8"
    assert raw["config"]["output"]["feature_compression"] == "none"
    assert zstd["config"]["output"]["feature_compression"] == "zstd"  # since 1.8 written either way


def _as_written_by(path: Path, version: str, compression: str | None) -> None:
    """Rewrite the manifest of the cache at ``path`` as kdcache ``version`` wrote it: without
    ``output.feature_compression`` when ``compression`` is None (1.7 left out zstd, earlier minors knew no key)."""
    raw = json.loads((path / "manifest.json").read_text())
    raw["schema_version"] = version
    raw["config"]["output"].pop("feature_compression")
    if compression is not None:
        raw["config"]["output"]["feature_compression"] = compression
    data = json.dumps(raw, indent=1).encode()
    (path / "manifest.json").write_bytes(data)
    (path / "manifest.json.sha256").write_text(hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("version,key", [("1.7", None), ("1.6", None), ("1.7", "none")])
def test_an_older_manifest_reads_as_its_arrays_are_stored(zstd_cache, raw_cache, tmp_path, version, key):
    """A cache of schema 1.7 or earlier without the key stored its taps with zstd (the default then): this
    reader says so, its arrays read, and a 1.8 job growing it (asking for the new default) keeps zstd; a 1.7
    manifest that says none stays none. The chain on disk (zarr.json) is the independent witness."""
    from pipeline.plan import grown_manifest

    src = zstd_cache if key is None else raw_cache
    path = tmp_path / "old.zarr"
    shutil.copytree(src["path"], path)
    _as_written_by(path, version, key)
    store = CacheStore(str(path), read_only=True)
    m = store.read_manifest()
    want = "zstd" if key is None else key
    assert m.config.output.feature_compression == want
    taps = {n for f in m.features for n in tap_codec(f).names}
    for name in m.arrays:
        assert m.compressed(name) == ("zstd" in _codec_names(path, name)), name
    assert {m.compressed(n) for n in taps} == {want == "zstd"}
    a = store.read_unit(m, 0, 0)
    b = CacheStore(str(src["path"]), read_only=True).read_unit(src["manifest"], 0, 0)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    tars = [index_tar(u) for u in expand_urls(src["cfg"].input.urls)]
    asks_default = src["cfg"].model_copy(update={"output": OutputConfig(url=str(path))})  # the key left out
    assert asks_default.output.feature_compression == "none"
    assert grown_manifest(m, asks_default, tars, m.num_views + 1).config.output.feature_compression == want


def test_verify_passes_on_raw_taps(raw_cache):
    from pipeline.verify import verify_cache

    rep = verify_cache(CacheStore(str(raw_cache["path"]), read_only=True), progress=False)
    assert not rep.problems, rep.problems


def test_a_grown_cache_keeps_its_codec_chain(raw_cache, zstd_cache):
    from pipeline.plan import grown_manifest

    cfg = raw_cache["cfg"]
    tars = [index_tar(u) for u in expand_urls(cfg.input.urls)]
    asks_zstd = cfg.model_copy(update={"output": cfg.output.model_copy(update={"feature_compression": "zstd"})})
    grown = grown_manifest(raw_cache["manifest"], asks_zstd, tars, raw_cache["manifest"].num_views + 1)
    assert grown.config.output.feature_compression == "none"
    assert all(grown.compressed(n) == raw_cache["manifest"].compressed(n) for n in grown.arrays)
    m = zstd_cache["manifest"]
    asks_raw = m.config.model_copy(update={"output": m.config.output.model_copy(update={"feature_compression": "none"})})
    assert grown_manifest(m, asks_raw, tars, m.num_views + 1).config.output.feature_compression == "zstd"


def test_an_unknown_compression_is_refused_naming_the_choices(small_digits, tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="feature_compression") as e:
        CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(tmp_path / "c.zarr"),
                                                output__feature_compression="lz4"))
    assert "'zstd'" in str(e.value) and "'none'" in str(e.value)


def test_inspect_says_the_taps_are_stored_without_zstd(raw_cache, zstd_cache):
    """Through the installed CLI, as a user reads it."""
    kdcache = str(Path(sys.executable).with_name("kdcache"))
    raw, zstd = (subprocess.run([kdcache, "inspect", str(c["path"])], capture_output=True, text=True, timeout=120)
                 for c in (raw_cache, zstd_cache))
    assert raw.returncode == zstd.returncode == 0, raw.stderr + zstd.stderr
    tap_lines = [line for line in raw.stdout.splitlines() if line.startswith("feature:")]
    assert len(tap_lines) == 2 and all("no zstd" in line for line in tap_lines), raw.stdout
    assert "no zstd" not in zstd.stdout
