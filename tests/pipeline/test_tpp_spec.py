"""The TPP pack's typed spec: ``tpp/spec.json`` keeps today's bytes for every family, the manifest
embeds it without ``weights_sha256`` in today's key order, old specs parse, unknown keys are refused."""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch

from pipeline.store import CacheStore
from pipeline.tpp import extract_tail, load_pack, save_pack
from storage_schemas.layout import TPP_SPEC, TPP_WEIGHTS
from storage_schemas.manifest import TPPInfo
from storage_schemas.tpp_spec import TPPSpec
from tests.pipeline.test_tpp import EVA02, SWIN, VIT, make_teacher

EVA02_NO_ROPE = (EVA02[0], {**EVA02[1], "use_rot_pos_emb": False})


def tokens(grid: tuple[int, int], dim: int, prefix: int) -> dict:
    """A ViT/EVA token description as the spec writes it (input and output alike)."""
    return {"format": "NLC", "tokens": prefix + grid[0] * grid[1], "grid": list(grid), "dim": dim,
            "prefix_tokens": prefix}


def vit_input(grid, dim, prefix, index, dynamic=False) -> dict:
    tap = {"indices": [index], "norm": False, "output_fmt": "NLC", "return_prefix_tokens": prefix > 0}
    return {**tokens(grid, dim, prefix), "accepts_without_prefix": True, "dynamic_img_size": dynamic, "tap": tap,
            "assemble": "torch.cat([prefix, spatial], 1)" if prefix else "spatial"}


# Written by hand from each architecture (pipeline/tpp.py at the reshape's parent wrote these
# bytes); what the live model decides (parameter count, tensors, sha, versions) is added in the test.
SPEC_CASES = {
    # VIT: 32 px / patch 4 = 8x8 grid, width 192, one cls token, 4 blocks
    "vit": (VIT, 1, {
        "family": "vit", "depth": 4, "unit": "block", "indices": [3], "input_index": 2,
        "input": vit_input((8, 8), 192, 1, 2),
        "output": {**tokens((8, 8), 192, 1), "final_norm": "LayerNorm"},
        "modules": ["blocks.3", "norm"]}),
    # EVA02-tiny: 28 px / patch 14 = 2x2 grid, width 192; final norm is Identity (fc_norm pools)
    "eva": (EVA02, 2, {
        "family": "eva", "depth": 4, "unit": "block", "indices": [2, 3], "input_index": 1,
        "input": vit_input((2, 2), 192, 1, 1),
        "output": {**tokens((2, 2), 192, 1), "final_norm": "Identity"},
        "rope": {"type": "RotaryEmbeddingCat", "mixed": False, "feat_shape": [2, 2]},
        "modules": ["blocks.2", "blocks.3", "norm", "rope"]}),
    "eva_no_rope": (EVA02_NO_ROPE, 1, {
        "family": "eva", "depth": 4, "unit": "block", "indices": [3], "input_index": 2,
        "input": vit_input((2, 2), 192, 1, 2),
        "output": {**tokens((2, 2), 192, 1), "final_norm": "Identity"},
        "rope": None,
        "modules": ["blocks.3", "norm"]}),
    # SWIN: 32 px / patch 2 = 16x16, then 8x8x48 into stage 2 (2 blocks, the second shifted by
    # window 2 // 2), 4x4x96 into stage 3 (1 block: grid 2x2 = window, no shift), out 2x2x192
    "swin": (SWIN, 2, {
        "family": "swin", "depth": 4, "unit": "stage", "indices": [2, 3], "input_index": 1,
        "input": {"format": "NLC", "tokens": 64, "grid": [8, 8], "dim": 48, "prefix_tokens": 0,
                  "tap": {"indices": [1], "norm": False, "output_fmt": "NCHW", "return_prefix_tokens": False},
                  "assemble": "x.flatten(2).transpose(1, 2)"},
        "output": {"format": "NLC", "tokens": 4, "grid": [2, 2], "dim": 192, "prefix_tokens": 0,
                   "final_norm": "LayerNorm"},
        "windows": [[[2, 2], [0, 0]], [[2, 2], [1, 1]], [[2, 2], [0, 0]]],
        "modules": ["layers.2", "layers.3", "norm"]}),
}


def expected_spec(model: torch.nn.Module, case: tuple, tail: int, arch: dict) -> dict:
    """The full spec dict (no weights_sha256) from the hand-written part and the live model."""
    prefixes = tuple(m + "." for m in arch["modules"])
    return {  # in the order today's code inserts the keys
        "spec_version": 1, "method": "ScaleKD teacher parameter perception (TPP)", "family": arch["family"],
        "model_name": case[0], "model_kwargs": json.loads(json.dumps(case[1])), "tail": tail, **arch,
        "num_params": sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefixes)),
        "num_tensors": sum(1 for k in model.state_dict() if k.startswith(prefixes)),
        "dtype": "float32", "timm_version": timm.__version__, "torch_version": torch.__version__.split("+")[0],
    }


@pytest.mark.parametrize("family", sorted(SPEC_CASES))
def test_spec_json_bytes_are_todays(tmp_path, family):
    case, tail, arch = SPEC_CASES[family]
    model = make_teacher(*case)
    tensors, spec = extract_tail(model, tail, model_name=case[0], model_kwargs=case[1])
    root = tmp_path / "cache"
    save_pack(CacheStore(str(root)), tensors, spec)
    want = expected_spec(model, case, tail, arch)
    stored = (root / TPP_SPEC).read_bytes()
    sha = hashlib.sha256((root / TPP_WEIGHTS).read_bytes()).hexdigest()
    assert stored == json.dumps({**want, "weights_sha256": sha}, indent=1, sort_keys=True).encode()
    # the spec the manifest embeds: the same fields, without weights_sha256, in the order today's
    # code inserted them (the manifest is dumped unsorted)
    info = TPPInfo(family=arch["family"], num_params=1, bytes=1, spec=spec).model_dump(mode="json")
    assert json.dumps(info["spec"]) == json.dumps(want)
    parsed = TPPSpec.parse(stored, "spec.json")
    assert parsed.weights_sha256 == sha and parsed.to_json_bytes() == stored


def test_old_specs_parse_and_unknown_keys_are_refused(tmp_path):
    case, tail, arch = SPEC_CASES["eva"]
    old = expected_spec(make_teacher(*case), case, tail, arch)
    # an old manifest's tpp: the spec dict without weights_sha256; it dumps back unchanged
    info = TPPInfo.model_validate({"family": "eva", "num_params": 1, "bytes": 1, "spec": old})
    assert info.spec.weights_sha256 is None and info.spec.rope.feat_shape == [2, 2]
    assert json.dumps(info.model_dump(mode="json")["spec"]) == json.dumps(old)
    with pytest.raises(ValueError, match=r"caches/a/tpp/spec\.json: not a valid TPP pack spec.*\n.*colour"):
        TPPSpec.parse(json.dumps({**old, "colour": "red"}), "caches/a/tpp/spec.json")
    # a key of another family (absent and null differ): eva without "rope", vit with one
    no_rope = {k: v for k, v in old.items() if k != "rope"}
    with pytest.raises(ValueError, match=r"a eva spec lacks \['rope'\]"):
        TPPSpec.parse(json.dumps(no_rope), "spec.json")
    with pytest.raises(ValueError, match=r"a vit spec has \['rope'\], which only other families have"):
        TPPSpec.parse(json.dumps({**old, "family": "vit"}), "spec.json")
    # load_pack names the file it refuses
    model = make_teacher(*VIT)
    tensors, spec = extract_tail(model, 1, model_name=VIT[0], model_kwargs=VIT[1])
    store = CacheStore(str(tmp_path / "cache"))
    save_pack(store, tensors, spec)
    store.write_bytes(TPP_SPEC, json.dumps({**json.loads(store.read_bytes(TPP_SPEC)), "extra": 1}).encode())
    with pytest.raises(ValueError, match=rf"{tmp_path}/cache/{TPP_SPEC}: not a valid TPP pack spec"):
        load_pack(store)
