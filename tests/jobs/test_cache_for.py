"""``kdcache cache --for METHODS``: a cache's targets derived from what the methods state they need."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cache_for import resolve_targets_for
from jobs.config_io import ConfigError, load_config
from storage_schemas.config import CacheConfig
from storage_schemas.identity import lineage_key
from storage_schemas.taps import TapSpec

BASE = {"input": {"urls": "x.tar"}, "output": {"url": "out"}, "teacher": {"model": "vit_tiny_patch16_224"},
        "targets": {"features": []}}


def resolved(*sets: str) -> CacheConfig:
    return resolve_targets_for(load_config(CacheConfig, None, list(sets), base=BASE))


def test_for_vitkd_and_scalekd_adds_their_taps_and_tail():
    cfg = resolved("targets.for=[vitkd, scalekd]")
    assert cfg.targets.features == [TapSpec(name="block0", index=0), TapSpec(name="block1", index=1),
                                    TapSpec(name="final", index=-1, norm=True)]
    assert cfg.targets.tpp is not None and cfg.targets.tpp.tail == 1 and cfg.targets.for_methods == []
    # the same targets listed by hand make the same cache: `for` itself is not part of what is stored
    listed = load_config(CacheConfig, None, [
        "targets.features=[{name: block0, index: 0}, {name: block1, index: 1}, {name: final, index: -1, norm: true}]",
        "targets.tpp={tail: 1}"], base=BASE)
    d, e = cfg.public_dict(), listed.public_dict()
    teacher = {"model": "m", "model_kwargs": {}, "weights_sha256": "0", "input_size": 1, "mean": [0] * 3,
               "std": [1] * 3}
    assert d["targets"] == e["targets"]
    assert lineage_key(teacher, d["views"], d["targets"]) == lineage_key(teacher, e["views"], e["targets"])


def test_for_keeps_listed_taps_and_adds_only_what_is_missing():
    cfg = resolved("targets.features=[{name: last, index: -1, norm: true}]", "targets.for=[kd, scalekd]")
    assert [t.name for t in cfg.targets.features] == ["last"]  # the final features are there, under another name
    assert cfg.targets.logits is not None and cfg.targets.tpp is not None


def test_for_refusals_name_the_problem():
    with pytest.raises(ConfigError, match=r"targets.for: unknown KD method\(s\) \['vitk'\]"):
        resolved("targets.for=[vitk]")
    with pytest.raises(ConfigError, match="need the teacher's logits, but targets.logits is null"):
        resolved("targets.for=[kd]", "targets.logits=null")
    with pytest.raises(ConfigError, match=r"names \{name: block0, index: 3\} 'block0'; rename one"):
        resolved("targets.features=[{name: block0, index: 3}]", "targets.for=[vitkd]")


def test_cli_for_with_an_unknown_method_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {{urls: x.tar}}\noutput: {{url: {tmp_path}/o.zarr}}\nteacher: {{model: resnet18}}\n")
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "cache", str(cfg), "--for", "vitkd,nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "kdcache cache: error: targets.for: unknown KD method(s) ['nope'] in 'vitkd+nope'; valid: ce, kd, nkd, "
        "scalekd, vitkd"]
    assert not (tmp_path / "o.zarr").exists()
