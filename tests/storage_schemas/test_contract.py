"""The storage contract: config validation, schema versions, array table, view records."""

import numpy as np
import pytest

from jobs.config_io import ConfigError, load_config
from storage_schemas import arrays as A
from storage_schemas.codecs import LogitsInfo, codecs_of
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import Manifest
from storage_schemas.taps import TapInfo
from storage_schemas.version import IncompatibleSchemaError, check_compatible
from storage_schemas.views import RandAugmentRecipe, ViewRecipe, ViewRecord

BASE = {"input": {"urls": "x.tar"}, "output": {"url": "out"}, "teacher": {"model": "resnet18"}}


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: {urls: x.tar}\noutput: {url: o}\nteacher: {model: resnet18}\nviews: {num_view: 3}\n")
    with pytest.raises(ConfigError, match=r"views\.num_view: unknown key"):
        load_config(CacheConfig, p)


def test_wrong_type_is_named_with_value():
    with pytest.raises(ConfigError, match=r"job\.batch_size: .*got 'many'"):
        load_config(CacheConfig, None, ["job.batch_size=many"], base=BASE)


def test_set_overrides_nested_values():
    cfg = load_config(CacheConfig, None, ["views.num_views=8", "targets.logits.k=3", "views.randaugment=null"],
                      base=BASE)
    assert cfg.views.num_views == 8 and cfg.targets.logits.k == 3 and cfg.views.randaugment is None


def test_credentials_are_never_dumped_and_come_back_with_secrets():
    opts = {"secret": "S3CR3T"}
    cfg = CacheConfig.model_validate({**BASE, "output": {"url": "s3://b/c", "storage_options": opts},
                                      "teacher": {"model": "resnet18", "checkpoint_storage_options": opts}})
    assert "S3CR3T" not in str(cfg.public_dict()) and "S3CR3T" not in cfg.model_dump_json()
    stored = CacheConfig.model_validate_json(cfg.model_dump_json())  # as a manifest holds it
    assert stored.output.storage_options == {} and stored.teacher.checkpoint_storage_options == {}
    back = stored.with_secrets(cfg.secrets())
    assert back.output.storage_options == opts and back.teacher.checkpoint_storage_options == opts


def test_targets_for_is_not_stored():
    cfg = load_config(CacheConfig, None, ["targets.for=[vitkd, scalekd]"], base=BASE)
    assert cfg.targets.for_methods == ["vitkd", "scalekd"] and "for" not in str(cfg.public_dict()["targets"])


def test_feature_dtype_names_the_known_codecs():
    with pytest.raises(ConfigError, match=r"feature_dtype 'fp8': expected one of fp16, int8"):
        load_config(CacheConfig, None, ["targets.feature_dtype=fp8"], base=BASE)


def test_timm_randaugment_string():
    r = RandAugmentRecipe.from_timm_string("rand-m7-mstd0.5-n3-inc1")
    assert (r.magnitude, r.magnitude_std, r.num_ops, r.increasing) == (7, 0.5, 3, True)
    assert "PosterizeIncreasing" in r.op_names
    assert "Posterize" in RandAugmentRecipe.from_timm_string("rand-m9").op_names
    with pytest.raises(ValueError, match="unknown RandAugment option 'q3'"):
        RandAugmentRecipe.from_timm_string("rand-m9-q3")


@pytest.mark.parametrize("found,ok", [("1.0", True), ("1.7", True), ("2.0", False), ("0.3", False)])
def test_schema_compatibility(found, ok):
    if ok:
        check_compatible(found)
    else:
        with pytest.raises(IncompatibleSchemaError, match="reads 1.x only"):
            check_compatible(found)


def test_manifest_refuses_unknown_major_before_fields():
    with pytest.raises(IncompatibleSchemaError, match="Upgrade kdcache"):
        Manifest.parse('{"schema_version": "9.0", "whatever": 1}', where="s3://b/c")


def test_array_table_shapes_and_rows_per_shard():
    assert A.rows_per_shard(300, 128) == 384 and A.rows_per_shard(0, 64) == 64
    recipe = ViewRecipe(randaugment="rand-m9-n3", erase={"max_count": 2})
    final = TapInfo(name="final", index=11, norm=True, tokens=49, dim=96, grid=(7, 7), prefix_tokens=0, dtype="int8")
    codecs = codecs_of(LogitsInfo(mode="topk", k=5, num_classes=10), [final])
    specs = {s.name: s for s in A.cache_arrays(recipe, codecs, fingerprint_size=4)}
    assert specs[A.VIEW_OPS].inner == (3,) and specs[A.VIEW_ERASE].inner == (2, 4)
    assert specs["feat_final"].dtype == "int8" and specs["feat_final"].target == "feature:final"
    assert specs["feat_final_scale"].inner == (49,)
    assert specs["logits_topk_indices"].dtype == "int16" and specs["logits_topk_values"].inner == (5,)
    s = specs["feat_final"]
    assert s.shape(768, 4) == (768, 4, 49, 96) and s.shard_shape(384) == (384, 1, 49, 96)
    assert list(specs)[:3] == [A.LABEL, A.VALID, A.PRED_TOP1] and list(specs)[-2:] == ["feat_final", "feat_final_scale"]


def test_view_records_round_trip_through_arrays():
    recipe = ViewRecipe(randaugment="rand-m9-n2", erase={"max_count": 2})
    recs = [
        ViewRecord(crop=(0.125, 0.25, 0.5, 0.75), flip=True, ops=[{"name": "Rotate", "magnitude": -4.5}],
                   erase=[(0.1, 0.2, 0.3, 0.4)], noise_seed=123),
        None,
        ViewRecord(crop=(0.0, 0.0, 1.0, 1.0)),
    ]
    rows = A.encode_views(recs, recipe)
    assert rows[A.VIEW_OPS][1].tolist() == [-1, -1]
    assert A.decode_view(rows, 2) == recs[2]
    back = A.decode_view(rows, 0)
    assert back.ops == recs[0].ops and back.flip and back.noise_seed == 123
    np.testing.assert_allclose(back.erase[0], recs[0].erase[0], rtol=1e-7)
