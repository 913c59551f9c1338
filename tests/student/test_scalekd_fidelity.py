"""ScaleKD as the official code builds it (reference/methods.md, "What the official code does"): the s4 feature of
an isotropic student after its final norm, the official CAP head counts, LayerNorm2d for ConvNeXt students."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import LayerNorm2d

from student.methods import StudentInfo, build_methods, student_forward, student_info
from student.methods.projectors import official_heads
from tests.student.test_feature_methods import SWIN_T, C, teacher_final, teacher_setup

VIT_S = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=C))
MIXER_S = ("mixer_t4_32", dict(num_blocks=4, embed_dim=32, patch_size=8))


@pytest.mark.parametrize("case", [VIT_S, MIXER_S], ids=["vit", "mixer"])
def test_s4_of_an_isotropic_student_is_taken_after_its_final_norm(case):
    import student.models  # noqa: F401  (registers mixer_t4_32)

    teacher, tail, ctx = teacher_setup(SWIN_T)
    torch.manual_seed(0)
    student = timm.create_model(case[0], **case[1])
    info = student_info(student, 32)
    m = build_methods("scalekd", {}, info, ctx)[0]
    assert m.s4_normed and m.student_indices() == (m.s3_index,)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    m.s4["spat"].proj_student.register_forward_hook(lambda mod, inp, out: seen.setdefault("s4", inp[0]))
    out = student_forward(student, x, m.student_indices())
    losses = m(out, teacher_final(teacher, x), torch.zeros(2))
    # by timm directly: forward_features applies the final norm; prefix tokens dropped, tokens → map
    feats = student.forward_features(x)[:, info.prefix_tokens:]
    c, h, w = info.shapes[-1]
    torch.testing.assert_close(seen["s4"], feats.transpose(1, 2).reshape(2, c, h, w))
    sum(losses.values()).backward()
    assert student.norm.weight.grad is not None and student.norm.weight.grad.abs().sum() > 0


def test_a_cnn_students_s4_is_its_last_stage_unnormed():
    teacher, tail, ctx = teacher_setup(SWIN_T)
    student = timm.create_model("resnet18", num_classes=C)
    m = build_methods("scalekd", {}, student_info(student, 64), ctx)[0]
    assert not m.s4_normed and m.student_indices() == (m.s3_index, m.s4_index)


def info(vit: bool) -> StudentInfo:
    shapes = ((64, 4, 4),) * 4 if vit else ((32, 8, 8), (64, 4, 4), (128, 2, 2), (256, 1, 1))
    return StudentInfo(shapes=shapes, final_tokens=(16, 64) if vit else (1, 256), vit_like=vit)


def test_official_head_counts():
    cnn, vit = info(False), info(True)
    assert official_heads(cnn, 768, 1536) == (16, 24)  # Swin-L teacher
    assert official_heads(cnn, 512, 1024) == (8, 16)  # Swin-B
    assert official_heads(cnn, 384, 768) == (3, 6)  # Swin-S
    assert official_heads(vit, 768, 1536) == (8, 8)  # ViT students: fmd.py's default
    assert official_heads(cnn, 96, 96) == (1, 1)  # another teacher: width // 64


def test_heads_default_to_official_and_can_be_overridden():
    _, _, ctx = teacher_setup(SWIN_T)  # a tiny Swin: widths not in the official table
    student = timm.create_model("resnet18", num_classes=C)
    si = student_info(student, 64)
    m = build_methods("scalekd", {}, si, ctx)[0]
    assert m.heads == official_heads(si, m.s3["spat"].q.in_features, m.s4["spat"].q.in_features)
    assert (m.s3["spat"].num_heads, m.s4["spat"].num_heads) == m.heads
    m2 = build_methods("scalekd", {"scalekd": {"num_heads": [1, 2]}}, si, ctx)[0]
    assert (m2.s3["freq"].num_heads, m2.s4["freq"].num_heads) == (1, 2)


def test_convnext_students_get_layernorm2d_in_the_projector():
    _, _, ctx = teacher_setup(SWIN_T)
    convnext = timm.create_model("convnext_atto", num_classes=C)
    si = student_info(convnext, 64)
    assert si.layernorm2d
    m = build_methods("scalekd", {}, si, ctx)[0]
    assert isinstance(m.s3["spat"].proj_student[1], LayerNorm2d) and isinstance(m.s4["freq"].proj_student[1],
                                                                               LayerNorm2d)
    resnet = build_methods("scalekd", {}, student_info(timm.create_model("resnet18", num_classes=C), 64), ctx)[0]
    assert isinstance(resnet.s3["spat"].proj_student[1], torch.nn.BatchNorm2d)


def test_the_tpp_tail_of_a_stochastic_depth_teacher_drops_paths_in_training_only():
    """With a cache of a ``teacher.stochastic_depth`` teacher the frozen tail runs its drop-path in training
    (the official teacher is in train mode); checked against the tail's block written out by hand."""
    from dataclasses import replace

    from tests.student.test_feature_methods import VIT_T

    case = (VIT_T[0], {**VIT_T[1], "drop_path_rate": 0.5})
    teacher, tail, ctx = teacher_setup(case)
    student = timm.create_model("resnet18", num_classes=C)
    info = student_info(student, 32)
    plain = build_methods("scalekd", {}, info, ctx)[0]
    m = build_methods("scalekd", {"scalekd": {"seed": 3}}, info, replace(ctx, stochastic_depth=True))[0]
    x = torch.randn(64, tail.spec.input.grid[0] * tail.spec.input.grid[1], tail.spec.input.dim)
    with torch.no_grad():
        reference = tail(x)
        torch.testing.assert_close(plain.train().run_tail(x), reference)  # an eval-mode teacher's cache
        torch.testing.assert_close(m.eval().run_tail(x), reference)  # evaluation: no drop-path
        m.train().set_step(5)
        a, b = m.run_tail(x, 0), m.run_tail(x, 1)
        torch.testing.assert_close(m.run_tail(x, 0), a)  # a step's draw repeats (resume)
        m.set_step(6)
        assert not torch.allclose(m.run_tail(x, 0), a)
    assert not torch.allclose(a, b)
    # by hand: the tail is the teacher's last block (rate 0.5) + final norm; per sample each branch is kept
    # (scaled by 1/0.5) or dropped, so each output row is one of four values
    (blk,) = tail.blocks.values()
    with torch.no_grad():
        branches = []
        for k1 in (0.0, 2.0):
            for k2 in (0.0, 2.0):
                h = x + k1 * blk.ls1(blk.attn(blk.norm1(x)))
                branches.append(tail.norm(h + k2 * blk.ls2(blk.mlp(blk.norm2(h)))))
    err = torch.stack([(a - c).abs().amax((1, 2)) for c in branches])  # [4, B]
    assert bool((err.min(0).values < 1e-5).all())
    counts = torch.bincount(err.argmin(0), minlength=4)
    assert bool((counts > 0).all()), counts  # 64 samples: every combination drawn (p = 1/4 each)


def test_the_shipped_vit_student_is_the_official_one():
    """train_scalekd_swinl_deitb_advanced.yaml's student, at a small width: no cls token, the final norm on the
    tokens, then global average pooling (mmcls VisionTransformer(with_cls_token=False) + GAP neck); ScaleKD
    taps blocks 8 and 11, block 11 after that norm, with 8/8 CAP heads."""
    from pathlib import Path

    from jobs.config_io import load_config
    from student.config import TrainConfig

    path = Path(__file__).parents[2] / "jobs" / "configs" / "train_scalekd_swinl_deitb_advanced.yaml"
    kw = {**load_config(TrainConfig, path).student.model_kwargs, "num_classes": C}
    torch.manual_seed(0)
    student = timm.create_model("vit_base_patch16_224", **kw, img_size=32, patch_size=8, embed_dim=32,
                                num_heads=2).eval()
    assert student.num_prefix_tokens == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # by hand: blocks, final LayerNorm on every token, mean over tokens, linear head
        h = student.blocks(student._pos_embed(student.patch_embed(x)))
        by_hand = student.head(student.norm(h).mean(1))
        torch.testing.assert_close(student(x), by_hand)
    teacher, tail, ctx = teacher_setup(SWIN_T)
    m = build_methods("scalekd", {}, student_info(student, 32), ctx)[0]
    assert (m.s3_index, m.s4_index) == (8, 11) and m.s4_normed and m.heads == (8, 8)
