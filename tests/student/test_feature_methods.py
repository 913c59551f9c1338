"""Feature KD methods: ViTKD masking/generation and ScaleKD (DFM against a DCT, CAP shapes
for CNN/MLP/ViT students, TPP gradients through a frozen teacher tail)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import timm
import torch
from scipy.fft import dctn, idctn
from timm.models.mlp_mixer import MlpMixer

from pipeline.tpp import TailInputStats, build_tail, extract_tail
from storage_schemas.taps import TapInfo
from student.methods import (
    StudentInfo,
    StudentOutput,
    TeacherContext,
    build_methods,
    student_forward,
    student_info,
)
from student.methods.scalekd import default_student_indices, dfm_frequency, dfm_spatial
from student.targets import TeacherTargets

C = 10
VIT_T = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2, num_classes=C))
SWIN_T = ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=2, embed_dim=24,
                                               depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), num_classes=C))


def feat(name, index, tokens, dim, grid, norm=False) -> TapInfo:
    return TapInfo(name=name, index=index, norm=norm, tokens=tokens, dim=dim, grid=grid, prefix_tokens=0,
                       dtype="fp16")


def make(name: str, kwargs: dict, seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).to(dtype).eval()


def teacher_setup(case=VIT_T, dtype=torch.float32):
    """(teacher, frozen tail, TeacherContext with a 'final' tap) for a tiny ViT or Swin teacher."""
    teacher = make(*case, dtype=dtype)
    tail = build_tail(*extract_tail(teacher, 1, model_name=case[0], model_kwargs=case[1]))
    out = tail.spec.output
    gh, gw = out.grid
    final = feat("final", tail.spec.depth - 1, gh * gw, out.dim, (gh, gw), norm=True)
    return teacher, tail, TeacherContext(num_classes=C, taps=[final], tail=tail)


def teacher_final(teacher: torch.nn.Module, x: torch.Tensor) -> TeacherTargets:
    with torch.no_grad():
        final = teacher.forward_intermediates(x.to(next(teacher.parameters()).dtype), indices=[0])[0]
    tokens = final[:, teacher.num_prefix_tokens:] if final.ndim == 3 else final.flatten(1, 2)
    return TeacherTargets(num_classes=C, features={"final": tokens.float()})


STUDENTS = {
    "resnet": (lambda: make("resnet18", dict(num_classes=C)), 64),
    "mobilenetv1": (lambda: make("mobilenetv1_100", dict(num_classes=C)), 64),
    "convnext": (lambda: make("convnext_atto", dict(num_classes=C)), 64),
    "mixer": (lambda: MlpMixer(img_size=32, patch_size=8, num_blocks=4, embed_dim=32, num_classes=C), 32),
    "vit": (lambda: make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4, embed_dim=32,
                                                      num_heads=2, num_classes=C)), 32),
}


# --------------------------------------------------------------------------- ViTKD

VITKD_TAPS = [feat("block0", 0, 16, 48, (4, 4)), feat("block1", 1, 16, 48, (4, 4)),
              feat("final", 2, 16, 48, (4, 4), norm=True)]


def vitkd_case(student_dim: int = 32, **opts):
    info = StudentInfo(shapes=((student_dim, 4, 4),) * 4, final_tokens=(16, student_dim), prefix_tokens=1,
                       vit_like=True)
    m = build_methods("vitkd", {"vitkd": opts}, info, TeacherContext(num_classes=C, taps=VITKD_TAPS))[0]
    g = torch.Generator().manual_seed(0)
    B = 3
    out = StudentOutput(logits=torch.zeros(B, C),
                        features={i: torch.randn(B, student_dim, 4, 4, generator=g) for i in (0, 1)},
                        final_tokens=torch.randn(B, 16, student_dim, generator=g))
    tgt = TeacherTargets(num_classes=C, features={f.name: torch.randn(B, 16, 48, generator=g) for f in VITKD_TAPS})
    return m, out, tgt


@pytest.mark.parametrize("ratio,masked", [(0.5, 8), (0.3, 5), (0.75, 12)])
def test_vitkd_masks_the_configured_fraction(ratio, masked):
    m, *_ = vitkd_case(mask_ratio=ratio)
    m.set_step(7)
    a = m.random_mask(6, 16, torch.device("cpu"))
    assert a.dtype == torch.bool and (a.sum(1) == masked).all()  # N − int(N (1 − λ)), as the official code
    assert len({tuple(r.tolist()) for r in a}) > 1  # per sample
    assert torch.equal(a, m.random_mask(6, 16, torch.device("cpu")))  # same step, same masks
    m.set_step(8)
    assert not torch.equal(a, m.random_mask(6, 16, torch.device("cpu")))


def test_vitkd_penalises_only_masked_tokens_and_matches_by_hand():
    m, out, tgt = vitkd_case()
    m.set_step(3)
    mask = m.random_mask(3, 16, torch.device("cpu"))
    got = m(out, tgt, torch.zeros(3))
    assert set(got) == {"loss_vitkd_lr", "loss_vitkd_gen"}
    # by hand: shallow Linear per layer, sum-reduced / B; deep: masked generation / B / λ
    lr = 0.0
    for i, (name, align) in enumerate(zip(("block0", "block1"), m.align_shallow, strict=True)):
        s = out.features[i].flatten(2).transpose(1, 2) @ align.weight.T + align.bias
        lr += ((s - tgt.features[name]) ** 2).sum().item()
    torch.testing.assert_close(got["loss_vitkd_lr"].item(), 3e-5 * lr / 3)
    x = out.final_tokens @ m.align_deep.weight.T + m.align_deep.bias
    x = torch.where(mask[..., None], torch.zeros(48), x)  # the mask token starts at 0
    c1, c2 = m.generation[0], m.generation[2]
    img = x.transpose(1, 2).reshape(3, 48, 4, 4)
    gen = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(img, c1.weight, c1.bias, padding=1)),
                                     c2.weight, c2.bias, padding=1).flatten(2).transpose(1, 2)
    want = (((gen - tgt.features["final"]) ** 2) * mask[..., None]).sum() / 3 * 3e-6 / 0.5
    torch.testing.assert_close(got["loss_vitkd_gen"], want, rtol=1e-5, atol=0)
    # unmasked targets do not matter, masked ones do
    for where, same in ((~mask, True), (mask, False)):
        changed = TeacherTargets(num_classes=C, features=dict(tgt.features))
        changed.features["final"] = torch.where(where[..., None], tgt.features["final"] + 5.0, tgt.features["final"])
        m.set_step(3)
        again = m(out, changed, torch.zeros(3))
        assert torch.equal(again["loss_vitkd_gen"], got["loss_vitkd_gen"]) is same
        assert torch.equal(again["loss_vitkd_lr"], got["loss_vitkd_lr"])
    nodiv, *_ = vitkd_case(divide_by_lambda=False)
    nodiv.load_state_dict(m.state_dict())
    nodiv.set_step(3)
    torch.testing.assert_close(nodiv(out, tgt, torch.zeros(3))["loss_vitkd_gen"], got["loss_vitkd_gen"] * 0.5)


def test_vitkd_identity_when_widths_match_and_trains_a_vit_student():
    m, *_ = vitkd_case(student_dim=48)
    assert all(isinstance(a, torch.nn.Identity) for a in (*m.align_shallow, m.align_deep))
    student = make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2,
                                                num_classes=C))
    info = student_info(student, 32)
    vitkd = build_methods("vitkd", {}, info, TeacherContext(num_classes=C, taps=VITKD_TAPS))[0].train()
    student.train()
    x = torch.randn(2, 3, 32, 32)
    out = student_forward(student, x, vitkd.student_indices())
    tgt = TeacherTargets(num_classes=C, features={f.name: torch.randn(2, 16, 48) for f in VITKD_TAPS})
    losses = vitkd(out, tgt, torch.zeros(2))
    sum(losses.values()).backward()
    assert student.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0
    assert student.norm.weight.grad.abs().sum() > 0  # the deep tap is after the final norm
    assert vitkd.mask_token.grad.abs().sum() > 0 and vitkd.step == 1


# --------------------------------------------------------------------------- ScaleKD: DFM


def test_dfm_frequency_view_equals_dct_without_dc():
    rng = np.random.default_rng(0)
    B, Ch, H, W = 3, 6, 4, 5
    s, t = rng.normal(size=(B, Ch, H, W)), rng.normal(size=(B, Ch, H, W)) + 2.0

    def highpass(x):
        X = dctn(x, axes=(2, 3), norm="ortho")
        X[:, :, 0, 0] = 0
        return idctn(X, axes=(2, 3), norm="ortho")

    def n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def tok(x):
        return torch.from_numpy(x).flatten(2).transpose(1, 2)

    want_freq = ((n(highpass(s)) - n(highpass(t))) ** 2).sum() / B
    want_spat = ((n(s) - n(t)) ** 2).sum() / B
    np.testing.assert_allclose(dfm_frequency(tok(s), tok(t)).item(), want_freq, rtol=1e-5)
    np.testing.assert_allclose(dfm_spatial(tok(s), tok(t)).item(), want_spat, rtol=1e-5)


# --------------------------------------------------------------------------- ScaleKD: CAP + TPP


@functools.cache
def shared_teacher(case: tuple) -> tuple:
    return teacher_setup((case[0], dict(case[1])))


@pytest.mark.parametrize("kind,teacher_case", [
    ("resnet", SWIN_T), ("resnet", VIT_T), ("mobilenetv1", SWIN_T), ("convnext", VIT_T),
    ("mixer", SWIN_T), ("mixer", VIT_T), ("vit", SWIN_T), ("vit", VIT_T),
], ids=lambda v: v if isinstance(v, str) else v[0].split("_")[0] + "_teacher")
def test_cap_outputs_the_teacher_grid_and_width(kind, teacher_case):
    teacher, tail, ctx = shared_teacher((teacher_case[0], tuple(teacher_case[1].items())))
    build, size = STUDENTS[kind]
    student = build()
    info = student_info(student, size)
    m = build_methods("scalekd", {}, info, ctx)[0]
    assert (m.s3_index, m.s4_index) == default_student_indices(info)
    x = torch.randn(2, 3, size, size)
    out = student_forward(student, x, m.student_indices())
    tin, tout, final = tail.spec.input, tail.spec.output, ctx.taps[0]
    y3 = m.s3["spat"](out.features[m.s3_index])
    assert tuple(y3.shape) == (2, tin.grid[0] * tin.grid[1], tin.dim)  # tail input, no prefix
    z = m.run_tail(y3)
    assert tuple(z.shape) == (2, final.tokens, final.dim) and list(tout.grid) == list(final.grid)
    y4 = m.s4["spat"](m.s4_map(out), z)
    assert tuple(y4.shape) == (2, final.tokens, final.dim)
    x_t = torch.nn.functional.interpolate(x, size=32) if size != 32 else x
    losses = m(out, teacher_final(teacher, x_t), torch.zeros(2))
    assert sorted(losses) == sorted(f"loss_scalekd_{s}_{v}" for s in ("s3", "s4") for v in ("spat", "freq"))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_tpp_sends_gradients_through_the_frozen_tail():
    teacher, tail, ctx = teacher_setup(VIT_T)
    student = make("resnet18", dict(num_classes=C)).train()
    m = build_methods("scalekd", {}, student_info(student, 64), ctx)[0].train()
    # the frozen tail is nowhere in the method's parameters, state_dict or modules
    tail_ids = {id(p) for p in tail.parameters()}
    assert not tail_ids & {id(p) for p in m.parameters()}
    assert not any(k.startswith(("blocks.", "norm.", "_tail")) for k in m.state_dict())
    assert tail not in list(m.modules())
    fresh = build_methods("scalekd", {}, student_info(student, 64), ctx)[0]
    fresh.load_state_dict(m.state_dict(), strict=True)

    x = torch.randn(2, 3, 64, 64)
    tgt = teacher_final(teacher, torch.nn.functional.interpolate(x, size=32))
    tail_before = {k: v.clone() for k, v in tail.state_dict().items()}
    out = student_forward(student, x, m.student_indices())
    losses = m(out, tgt, torch.zeros(2))
    # the s3 losses reach the student only through the tail
    (losses["loss_scalekd_s3_spat"] + losses["loss_scalekd_s3_freq"]).backward(retain_graph=True)
    assert student.conv1.weight.grad.abs().sum() > 0  # the stem, through layer3 (and the tail)
    assert all(p.grad is None for p in student.layer4.parameters())
    assert all(p.grad is None for p in tail.parameters())
    # the s4 query is the tail output, not detached: the s4 loss trains the s3 CAP too
    m.zero_grad()
    losses["loss_scalekd_s4_spat"].backward(retain_graph=True)
    assert m.s3["spat"].query.grad.abs().sum() > 0
    assert m.s3["freq"].query.grad is None  # views keep separate paths
    opt = torch.optim.AdamW([*student.parameters(), *m.parameters()], lr=1e-2)
    opt.zero_grad()
    before = student.conv1.weight.detach().clone()
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(student.conv1.weight, before)
    assert all(torch.equal(v, tail_before[k]) for k, v in tail.state_dict().items())
    assert not tail.training


def test_tpp_tail_in_lower_precision_and_without_tpp():
    teacher, tail, ctx = teacher_setup(VIT_T, dtype=torch.bfloat16)
    assert next(tail.parameters()).dtype == torch.bfloat16
    build, size = STUDENTS["mixer"]
    student = build()
    info = student_info(student, size)
    m = build_methods("scalekd", {}, info, ctx)[0]
    x = torch.randn(2, 3, 32, 32)
    losses = m(student_forward(student, x, m.student_indices()), teacher_final(teacher, x), torch.zeros(2))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    no_tail = TeacherContext(num_classes=C, taps=ctx.taps)
    with pytest.raises(ValueError, match="needs the teacher's frozen tail.*targets.tpp.*scalekd.tpp=false"):
        build_methods("scalekd", {}, info, no_tail)
    plain = build_methods("scalekd", {"scalekd": {"tpp": False, "alpha": (1.0, 0.0)}}, info, no_tail)[0]
    assert not plain.opts.tpp and plain.tail is None and plain.s4["spat"].query is not None
    losses = plain(student_forward(student, x, plain.student_indices()), teacher_final(teacher, x),
                   torch.zeros(2))
    assert losses["loss_scalekd_s3_freq"] == 0 and losses["loss_scalekd_s3_spat"] > 0


def test_cap_norm_init_from_the_tail_input_stats():
    """Opt-in (not in the official code): the s3 CAPs' output LayerNorm, which feeds the frozen
    tail, starts at the tail input's per-channel std (weight) and mean (bias)."""
    teacher, tail, ctx = teacher_setup(VIT_T)
    c3, ct = tail.spec.input.dim, ctx.taps[0].dim
    g = torch.Generator().manual_seed(0)
    stats = TailInputStats(mean=torch.randn(c3, generator=g), std=torch.rand(c3, generator=g) + 0.5, count=64)
    info = student_info(make("resnet18", dict(num_classes=C)), 64)
    with_stats = dataclasses.replace(ctx, tail_stats=stats)
    m = build_methods("scalekd", {"scalekd": {"cap_norm_init": "tail_stats"}}, info, with_stats)[0]
    official = build_methods("scalekd", {}, info, with_stats)[0]  # default: LayerNorm's own init
    for v in ("spat", "freq"):
        assert torch.equal(m.s3[v].norm.weight, stats.std) and torch.equal(m.s3[v].norm.bias, stats.mean)
        assert m.s3[v].norm.weight.requires_grad and m.s3[v].norm.weight.data_ptr() != stats.std.data_ptr()
        assert torch.equal(official.s3[v].norm.weight, torch.ones(c3))
        assert torch.equal(official.s3[v].norm.bias, torch.zeros(c3))
        assert torch.equal(m.s4[v].norm.weight, torch.ones(ct)) and torch.equal(m.s4[v].norm.bias, torch.zeros(ct))

    opts = {"scalekd": {"cap_norm_init": "tail_stats"}}
    with pytest.raises(ValueError, match=r"cap_norm_init='tail_stats' needs the statistics of the TPP tail's "
                                         r"input \(tpp/input_stats\.safetensors.*scalekd\.cap_norm_init=default"):
        build_methods("scalekd", opts, info, ctx)
    with pytest.raises(ValueError, match=r"needs scalekd\.tpp=true"):
        build_methods("scalekd", {"scalekd": {"cap_norm_init": "tail_stats", "tpp": False}}, info, with_stats)
    short = TailInputStats(mean=torch.zeros(5), std=torch.ones(5), count=1)
    with pytest.raises(ValueError, match=f"the statistics have 5 channels, the TPP tail takes {c3}"):
        build_methods("scalekd", opts, info, dataclasses.replace(ctx, tail_stats=short))


def test_default_student_indices():
    def info(shapes):
        return StudentInfo(shapes=tuple(shapes), final_tokens=(1, 1))

    assert default_student_indices(info([(64, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)])) == (3, 4)
    assert default_student_indices(info([(32, 4, 4)] * 12)) == (8, 11)
    assert default_student_indices(info([(32, 4, 4)] * 8)) == (5, 7)
    assert default_student_indices(info([(32, 4, 4)] * 3)) == (1, 2)
    with pytest.raises(ValueError, match="needs two"):
        default_student_indices(info([(32, 4, 4)]))


@pytest.mark.gpu
def test_methods_on_cuda_with_the_tail_loaded_on_cpu():
    teacher, tail, ctx = teacher_setup(VIT_T)  # the tail starts on the CPU: moved on first use
    student = STUDENTS["mixer"][0]().cuda()
    info = student_info(student, 32)
    feats = [*VITKD_TAPS[:2], ctx.taps[0]]
    methods = build_methods("kd+vitkd+scalekd", {}, info, TeacherContext(num_classes=C, taps=feats, tail=tail))
    methods.cuda().train()
    x = torch.randn(2, 3, 32, 32)
    tgt = teacher_final(teacher, x)
    tgt.features.update({f.name: torch.randn(2, 16, 48) for f in VITKD_TAPS[:2]})
    tgt.logits = torch.randn(2, C)
    tgt = TeacherTargets(num_classes=C, logits=tgt.logits.cuda(), features={k: v.cuda() for k, v in tgt.features.items()})
    out = student_forward(student, x.cuda(), sorted(set(sum((m.student_indices() for m in methods), ()))))
    losses = {k: v for m in methods for k, v in m(out, tgt, torch.zeros(2, dtype=torch.long).cuda()).items()}
    sum(losses.values()).backward()
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    assert next(tail.parameters()).is_cuda
