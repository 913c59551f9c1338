"""The teacher wrapper against timm called directly."""

import pytest
import timm
import torch

from pipeline.teacher import Teacher, load_state_dict
from storage_schemas.config import TeacherConfig
from storage_schemas.taps import TapSpec

SWIN = {"img_size": 32, "patch_size": 2, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 2, 1),
        "num_heads": (1, 2, 3, 4), "num_classes": 10}
VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2, "num_classes": 10}


def test_vit_taps_logits_and_prefix_tokens():
    cfg = TeacherConfig(model="vit_tiny_patch16_224", model_kwargs=VIT)
    taps = [TapSpec(name="b0", index=0), TapSpec(name="final", index=-1, norm=True)]
    t = Teacher(cfg, taps, keep_prefix_tokens=True, tail_input_index=1)
    x = torch.randn(2, 3, 32, 32)
    out = t(x)
    ref = t.model  # same weights; timm called directly below
    with torch.no_grad():
        final, inters = ref.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", return_prefix_tokens=True)
    torch.testing.assert_close(out.logits, ref(x))
    torch.testing.assert_close(out.features["b0"], torch.cat([inters[0][1], inters[0][0]], 1))
    torch.testing.assert_close(out.features["final"], final)
    torch.testing.assert_close(out.tail_input, torch.cat([inters[1][1], inters[1][0]], 1))
    assert t.input_size == 32 and t.mean == (0.5, 0.5, 0.5)


def test_swin_final_tap_is_nhwc_flattened():
    t = Teacher(TeacherConfig(model="swin_tiny_patch4_window7_224", model_kwargs=SWIN),
                [TapSpec(name="final", index=-1, norm=True), TapSpec(name="s2", index=2)])
    x = torch.randn(2, 3, 32, 32)
    out = t(x)
    with torch.no_grad():
        feats = t.model.forward_features(x)  # NHWC after the final norm
        s2 = t.model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(out.features["final"], feats.flatten(1, 2))
    torch.testing.assert_close(out.features["s2"], s2.flatten(2).transpose(1, 2))
    assert [s.grid for s in t.tap_infos("fp16")] == [(2, 2), (4, 4)]


def test_bad_taps_and_checkpoints_are_named(tmp_path):
    cfg = TeacherConfig(model="vit_tiny_patch16_224", model_kwargs=VIT)
    with pytest.raises(ValueError, match="tap 'x': index 7 out of range for 3 levels"):
        Teacher(cfg, [TapSpec(name="x", index=7)])
    with pytest.raises(ValueError, match="norm=true means the final normed features"):
        Teacher(cfg, [TapSpec(name="x", index=0, norm=True)])
    p = tmp_path / "w.pt"
    p.write_bytes(b"not weights")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(str(p))
    other = timm.create_model("vit_tiny_patch16_224", **{**VIT, "depth": 2})
    torch.save(other.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit vit_tiny_patch16_224"):
        Teacher(TeacherConfig(model="vit_tiny_patch16_224", model_kwargs=VIT, checkpoint=str(tmp_path / "small.pt")))


@pytest.mark.gpu
def test_cuda_bf16_autocast_close_to_fp32():
    cfg = TeacherConfig(model="vit_tiny_patch16_224", model_kwargs=VIT)
    taps = [TapSpec(name="final", index=-1, norm=True)]
    gpu, cpu = Teacher(cfg, taps, device="cuda"), Teacher(cfg, taps)
    assert gpu.autocast_dtype == torch.bfloat16 and gpu.weights_sha256 == cpu.weights_sha256
    x = torch.randn(4, 3, 32, 32)
    a, b = gpu(x), cpu(x)
    cos = torch.nn.functional.cosine_similarity(a.features["final"].cpu().flatten(1), b.features["final"].flatten(1))
    assert a.logits.dtype == torch.float32 and cos.min() > 0.99
