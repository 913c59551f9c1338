"""ScaleKD TPP pack: extract a teacher's tail, round-trip it through a cache store, rebuild it with timm."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

from pipeline.store import CacheStore
from pipeline.tpp import (
    TailInputStats,
    TeacherTail,
    build_tail,
    extract_tail,
    load_input_stats,
    load_pack,
    save_input_stats,
    save_pack,
    tail_family,
    tail_input_index,
)
from storage_schemas.layout import TPP_SPEC, TPP_STATS, TPP_WEIGHTS
from storage_schemas.tpp_spec import TPPSpec

VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4, num_classes=10))
DEIT = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4, num_classes=10))
DEIT_DIST = ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=4, depth=3, num_classes=10))
DEIT3 = ("deit3_small_patch16_224", dict(img_size=32, patch_size=4, depth=3, num_classes=10))
EVA02 = ("eva02_tiny_patch14_224", dict(img_size=28, depth=4, num_classes=10))
# Eva-family rope variants: per-block learnable rope (freqs packed) and DINOv3 rope with 4 register tokens
ROPE_MIXED = ("vit_small_patch16_rope_mixed_224",
              dict(img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2, num_classes=10))
DINOV3 = ("vit_base_patch16_dinov3", dict(img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2, num_classes=10))
SWIN = (
    "swin_tiny_patch4_window7_224",
    dict(img_size=32, patch_size=2, window_size=2, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
         num_classes=10),
)
CASES = [
    pytest.param(*VIT, 1, 3, id="vit-tail1"),
    pytest.param(*VIT, 2, 3, id="vit-tail2"),
    pytest.param(*DEIT, 2, 3, id="deit-tail2"),
    pytest.param(*DEIT_DIST, 1, 3, id="deit_distilled-tail1"),
    pytest.param(*DEIT3, 2, 3, id="deit3-tail2"),
    pytest.param(*EVA02, 1, 3, id="eva02-tail1"),
    pytest.param(*EVA02, 3, 3, id="eva02-tail3"),
    pytest.param(*ROPE_MIXED, 2, 2, id="eva_rope_mixed-tail2"),
    pytest.param(*DINOV3, 1, 2, id="eva_dinov3-tail1"),
    pytest.param(*SWIN, 1, 3, id="swin-tail1"),
    pytest.param(*SWIN, 2, 3, id="swin-tail2"),  # stage 2 has a shifted block: attn_mask rebuilt
]


def make_teacher(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # move off the init values (LN 1/0, zero biases) so key mix-ups show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def teacher_io(model: torch.nn.Module, tail: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tail input [B, N, C] with prefix tokens first, final features [B, N', C'])."""
    idx = tail_input_index(model, tail)
    if tail_family(model) == "swin":
        final, inters = model.forward_intermediates(x, indices=[idx], norm=False, output_fmt="NCHW")
        return inters[0].flatten(2).transpose(1, 2), final.reshape(final.shape[0], -1, final.shape[-1])
    # Eva.forward_intermediates fails on return_prefix_tokens=True without prefix tokens
    prefix = model.num_prefix_tokens > 0
    final, inters = model.forward_intermediates(
        x, indices=[idx], norm=False, output_fmt="NLC", return_prefix_tokens=prefix
    )
    return (torch.cat([inters[0][1], inters[0][0]], 1) if prefix else inters[0]), final


def roundtrip(tmp_path, tensors: dict, spec: TPPSpec) -> tuple[TeacherTail, int]:
    root = tmp_path / "cache"
    n = save_pack(CacheStore(str(root)), tensors, spec)
    assert n == (root / TPP_WEIGHTS).stat().st_size + (root / TPP_SPEC).stat().st_size
    return load_pack(CacheStore(str(root), read_only=True)), n


@pytest.mark.parametrize("name,kwargs,tail,batch", CASES)
def test_rebuilt_tail_matches_teacher(tmp_path, name, kwargs, tail, batch):
    model = make_teacher(name, kwargs)
    size = model.pretrained_cfg["input_size"][1:] if "img_size" not in kwargs else (kwargs["img_size"],) * 2
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        tin, final = teacher_io(model, tail, x)
    tensors, spec = extract_tail(model, tail, model_name=name, model_kwargs=kwargs)
    assert spec.input.tokens == tin.shape[1] and spec.input.dim == tin.shape[2]
    assert spec.output.tokens == final.shape[1] and spec.output.dim == final.shape[2]
    assert spec.input_index == tail_input_index(model, tail)

    rebuilt, _ = roundtrip(tmp_path, tensors, spec)
    with torch.no_grad():
        out = rebuilt(tin)
    assert out.shape == final.shape
    torch.testing.assert_close(out, final, atol=1e-5, rtol=0)


def test_eva_rope_is_rebuilt_and_used(tmp_path):
    model = make_teacher(*EVA02)
    assert model.rope is not None
    tensors, spec = extract_tail(model, 2, model_name=EVA02[0], model_kwargs=EVA02[1])
    assert spec.rope.type == "RotaryEmbeddingCat"
    rebuilt, _ = roundtrip(tmp_path, tensors, spec)
    torch.testing.assert_close(rebuilt.rope.get_embed(), model.rope.get_embed(), atol=0, rtol=0)
    # without the rope the same weights give a different answer, so the check above matters
    tin = torch.randn(2, spec.input.tokens, spec.input.dim)
    with torch.no_grad():
        with_rope = rebuilt(tin)
        x = tin
        for blk in rebuilt.blocks.values():
            x = blk(x, rope=None)
        assert not torch.allclose(rebuilt.norm(x), with_rope, atol=1e-3)


@pytest.mark.parametrize("case,no_prefix", [
    (VIT, dict(class_token=False, global_pool="avg", fc_norm=False)),
    (EVA02, dict(class_token=False)),  # EVA02 pools with avg already (its norm is fc_norm, not in the tail)
], ids=["vit", "eva02"])
def test_without_prefix_tokens_equals_prefix_free_teacher(tmp_path, case, no_prefix):
    """Grid tokens only (ScaleKD s3 CAP output): same as a teacher that never had prefix tokens."""
    name, kwargs = case
    model = make_teacher(name, kwargs)
    free_kwargs = {**kwargs, **no_prefix}  # same tail modules (final norm kept), no cls token
    free = timm.create_model(name, pretrained=False, **free_kwargs).eval()
    tensors, spec = extract_tail(model, 2, model_name=name, model_kwargs=kwargs)
    _, free_spec = extract_tail(free, 2, model_name=name, model_kwargs=free_kwargs)
    assert free_spec.input.prefix_tokens == 0 and spec.input.prefix_tokens == 1

    tail = build_tail(tensors, spec)
    reference = build_tail(tensors, free_spec)  # same block weights, blocks built for no prefix
    grid = torch.randn(2, spec.input.tokens - 1, spec.input.dim)
    with torch.no_grad():
        out = tail(grid)
        ref = reference(grid)
    assert out.shape == grid.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [SWIN, EVA02], ids=["swin", "eva02"])
def test_frozen_but_gradients_reach_input(tmp_path, case):
    model = make_teacher(*case)
    tensors, spec = extract_tail(model, 2, model_name=case[0], model_kwargs=case[1])
    tail, _ = roundtrip(tmp_path, tensors, spec)
    assert all(not p.requires_grad for p in tail.parameters())
    tail.train()  # a student's .train() must not switch the frozen teacher to training mode
    assert not any(m.training for m in tail.modules())
    tin = torch.randn(2, spec.input.tokens, spec.input.dim, requires_grad=True)
    (tail(tin) ** 2).sum().backward()
    assert tin.grad is not None and tin.grad.abs().sum() > 0
    assert all(p.grad is None for p in tail.parameters())


@pytest.mark.parametrize("case,tail,prefixes", [
    (VIT, 2, ("blocks.2.", "blocks.3.", "norm.")),
    (EVA02, 1, ("blocks.3.", "norm.")),
    (SWIN, 2, ("layers.2.", "layers.3.", "norm.")),
], ids=["vit", "eva02", "swin"])
def test_pack_holds_only_the_tail(case, tail, prefixes):
    model = make_teacher(*case)
    tensors, spec = extract_tail(model, tail, model_name=case[0], model_kwargs=case[1])
    assert all(k.startswith(prefixes) for k in tensors), sorted(tensors)
    assert all(v.is_contiguous() and v.device.type == "cpu" and v.dtype == torch.float32 for v in tensors.values())
    live = dict(model.named_parameters())
    tail_params = sum(p.numel() for k, p in live.items() if k.startswith(prefixes))
    assert sum(v.numel() for v in tensors.values()) == tail_params == spec.num_params
    assert tail_params < sum(p.numel() for p in live.values())
    key = next(k for k in tensors if k.endswith("weight"))
    before = tensors[key].clone()
    with torch.no_grad():  # a copy, not a view of the live teacher
        model.get_parameter(key).zero_()
    assert torch.equal(tensors[key], before)


def test_swin_tail_spec_and_shapes():
    model = make_teacher(*SWIN)
    tensors, spec = extract_tail(model, 1, model_name=SWIN[0], model_kwargs=SWIN[1])
    assert spec.family == "swin" and spec.unit == "stage" and spec.indices == [3]
    assert spec.input_index == 2
    assert spec.input.grid == (4, 4) and spec.input.dim == 96
    assert spec.output.grid == (2, 2) and spec.output.dim == 192
    assert "layers.3.downsample.reduction.weight" in tensors  # patch merging travels with the stage
    tail = build_tail(tensors, spec)
    assert tail(torch.randn(2, 16, 96)).shape == (2, 4, 192)
    with pytest.raises(ValueError, match="expected 4\\*4=16 tokens"):
        tail(torch.randn(2, 15, 96))


def test_bfloat16_teacher_round_trips(tmp_path):
    model = make_teacher(*EVA02).to(torch.bfloat16)
    x = torch.randn(2, 3, 28, 28, dtype=torch.bfloat16)
    with torch.no_grad():
        tin, final = teacher_io(model, 2, x)
    tensors, spec = extract_tail(model, 2, model_name=EVA02[0], model_kwargs=EVA02[1])
    assert spec.dtype == "bfloat16"
    tail, _ = roundtrip(tmp_path, tensors, spec)
    with torch.no_grad():
        torch.testing.assert_close(tail(tin), final, atol=0, rtol=0)


def test_missing_or_extra_key_is_refused():
    model = make_teacher(*SWIN)
    tensors, spec = extract_tail(model, 2, model_name=SWIN[0], model_kwargs=SWIN[1])
    missing = dict(tensors)
    del missing["layers.2.blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['layers\.2\.blocks\.1\.attn\.qkv\.weight'\]"):
        build_tail(missing, spec)
    extra = {**tensors, "head.fc.weight": torch.zeros(10, 96)}
    with pytest.raises(ValueError, match=r"unexpected keys \['head\.fc\.weight'\]"):
        build_tail(extra, spec)


def test_corrupt_weights_are_refused(tmp_path):
    model = make_teacher(*VIT)
    tensors, spec = extract_tail(model, 1, model_name=VIT[0], model_kwargs=VIT[1])
    store = CacheStore(str(tmp_path / "cache"))
    save_pack(store, tensors, spec)
    other, _ = extract_tail(model, 1, model_name=VIT[0], model_kwargs=VIT[1])
    other["norm.weight"] = other["norm.weight"] + 1
    store.write_bytes(TPP_WEIGHTS, safetensors.torch.save(other))
    with pytest.raises(ValueError, match="sha256"):
        load_pack(store)


def test_unsupported_family_and_bad_tail():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(TypeError, match="supported families: vit .* eva .* swin"):
        tail_family(resnet)
    with pytest.raises(TypeError, match="ResNet"):
        extract_tail(resnet, 1, model_name="resnet18", model_kwargs={})
    vit = make_teacher(*VIT)
    assert tail_input_index(vit, 1) == 2
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"must be in \[1, 3\]"):
            tail_input_index(vit, bad)


def test_kwargs_that_do_not_rebuild_the_teacher_are_refused():
    model = make_teacher(*VIT)
    with pytest.raises(ValueError, match="does not rebuild this teacher's tail"):
        extract_tail(model, 1, model_name=VIT[0], model_kwargs={**VIT[1], "img_size": 64})
    # weight-only kwargs are dropped from the spec
    _, spec = extract_tail(model, 1, model_name=VIT[0], model_kwargs={**VIT[1], "pretrained": False})
    assert "pretrained" not in spec.model_kwargs


# --------------------------------------------------------------------------- input statistics


def test_input_stats_round_trip_with_todays_bytes(tmp_path):
    store = CacheStore(str(tmp_path / "cache"))
    assert load_input_stats(store) is None  # no statistics: None, not an error
    mean, std = torch.randn(48, dtype=torch.float64), torch.rand(48, dtype=torch.float64)
    save_input_stats(store, mean, std, 1234)
    # the bytes pipeline/job.py wrote before the reader existed
    today = safetensors.torch.save({"mean": mean.float(), "std": std.float(),
                                    "count": torch.tensor([1234], dtype=torch.int64)})
    assert (tmp_path / "cache" / TPP_STATS).read_bytes() == today
    stats = load_input_stats(CacheStore(str(tmp_path / "cache"), read_only=True))
    assert isinstance(stats, TailInputStats) and stats.count == 1234
    torch.testing.assert_close(stats.mean, mean.float(), atol=0, rtol=0)
    torch.testing.assert_close(stats.std, std.float(), atol=0, rtol=0)
    store.write_bytes(TPP_STATS, safetensors.torch.save({"mean": torch.zeros(3), "std": torch.zeros(4),
                                                         "count": torch.tensor([1])}))
    with pytest.raises(ValueError, match=rf"{TPP_STATS}: expected mean \[C\], std \[C\] and count \[1\]"):
        load_input_stats(store)
