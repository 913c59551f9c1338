"""KD method contract (registry, needs, manifest check, student I/O) and the logit losses
(ce, kd, nkd) against computations done by hand in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer

from storage_schemas.codecs import LogitsInfo, TopK
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import Manifest, TeacherInfo, TPPInfo
from storage_schemas.taps import TapInfo, TapSpec
from student.methods import (
    Needs,
    StudentInfo,
    StudentOutput,
    TeacherContext,
    build_methods,
    check_cache,
    method_names,
    needs_of,
    student_forward,
    student_info,
)
from student.targets import TeacherTargets

C = 10
VIT_STUDENT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=C))


def feat(name: str, index: int, *, norm: bool = False, tokens: int = 16, dim: int = 48, grid=(4, 4)) -> TapInfo:
    return TapInfo(name=name, index=index, norm=norm, tokens=tokens, dim=dim, grid=grid, prefix_tokens=0,
                       dtype="fp16")


TEACHER_FEATURES = [feat("block0", 0), feat("block1", 1), feat("final", 2, norm=True)]
VIT_INFO = StudentInfo(shapes=((32, 4, 4),) * 4, final_tokens=(16, 32), prefix_tokens=1, vit_like=True)


def manifest(features=TEACHER_FEATURES, logits=True, tpp=False) -> Manifest:
    teacher = TeacherInfo(model="vit_tiny_patch16_224", weights_sha256="0" * 64, input_size=32, mean=(0.5,) * 3,
                          std=(0.5,) * 3, num_classes=C, num_levels=3)
    return Manifest.model_construct(
        teacher=teacher, features=list(features),
        config=CacheConfig.model_validate({"input": {"urls": "x"}, "output": {"url": "y"}, "teacher": {"model": "m"}}),
        logits=LogitsInfo(mode="topk", k=5, num_classes=C) if logits else None,
        tpp=TPPInfo.model_construct(family="vit", num_params=1, bytes=1) if tpp else None,
    )


# --------------------------------------------------------------------------- registry, needs, manifest


def test_unknown_method_lists_valid_names():
    ctx = TeacherContext(num_classes=C, num_levels=3, taps=TEACHER_FEATURES)
    with pytest.raises(ValueError, match=r"unknown KD method\(s\) \['kdd'\].*valid: ce, kd, nkd, scalekd, vitkd"):
        build_methods("ce+kdd", {}, VIT_INFO, ctx)
    assert method_names() == ["ce", "kd", "nkd", "scalekd", "vitkd"]
    with pytest.raises(ValueError, match="given twice"):
        build_methods("kd+kd", {}, VIT_INFO, ctx)
    with pytest.raises(ValueError, match=r"method_options given for \['nkd'\]"):
        build_methods("ce+kd", {"nkd": {}}, VIT_INFO, ctx)
    with pytest.raises(ValueError, match="(?s)method_options.kd: .*temprature"):
        build_methods("kd", {"kd": {"temprature": 2}}, VIT_INFO, ctx)


def test_options_take_published_defaults():
    ctx = TeacherContext(num_classes=C, num_levels=3, taps=TEACHER_FEATURES)
    ce, kd, nkd, vitkd = build_methods(["ce", "kd", "nkd", "vitkd"], {"kd": {"weight": 0.5, "soft_ce": True}},
                                       VIT_INFO, ctx)
    assert (ce.opts.label_smoothing, ce.opts.loss, ce.opts.weight) == (0.1, "ce", 1.0)
    assert (kd.opts.temperature, kd.opts.weight, kd.opts.soft_ce) == (1.0, 0.5, True)
    assert (nkd.opts.temperature, nkd.opts.gamma) == (1.0, 1.0)
    assert (vitkd.opts.alpha, vitkd.opts.beta, vitkd.opts.mask_ratio, vitkd.opts.divide_by_lambda) == (
        3e-5, 3e-6, 0.5, True)


B0, B1, FINAL = TapSpec(name="block0", index=0), TapSpec(name="block1", index=1), TapSpec(name="final", index=-1, norm=True)


def test_needs_are_known_from_options_before_building():
    s4 = {"name": "s4", "index": 2}
    opts = {"scalekd": {"tpp": False, "target_tap": s4}}
    assert needs_of("ce") == Needs()
    assert needs_of("kd") == needs_of("nkd") == Needs(logits=True)
    assert needs_of("vitkd") == Needs(taps=(B0, B1, FINAL))
    assert needs_of("scalekd") == Needs(taps=(FINAL,), tpp=True)
    u = needs_of("ce+kd+nkd+vitkd+scalekd", opts)
    assert u == Needs(logits=True, taps=(B0, B1, FINAL, TapSpec(**s4)), tpp=False)
    assert Needs(tpp=True) | Needs(taps=(B0,)) == Needs(taps=(B0,), tpp=True)
    assert Needs(taps=(B0,)) | Needs(taps=(TapSpec(name="other", index=0),)) == Needs(taps=(B0,))  # one point, one tap
    ctx = TeacherContext(num_classes=C, num_levels=3, taps=[*TEACHER_FEATURES, feat("s4", 2)])
    methods = build_methods("ce+kd+nkd+vitkd+scalekd", opts, VIT_INFO, ctx)
    # scalekd: isotropic, 4 blocks: s3 = block 2, s4 = the final features after the norm (not an intermediate)
    assert [m.student_indices() for m in methods] == [(), (), (), (0, 1), (2,)]


def test_options_refuse_a_tap_given_by_name_only():
    with pytest.raises(ValueError, match=r"(?s)not a name: write \{name: final, index: <block or stage index>\}"):
        needs_of("scalekd", {"scalekd": {"target_tap": "final"}})


def test_taps_are_served_by_the_point_they_name_not_their_name():
    renamed = [feat("b0", 0), feat("b1", 1), feat("last", 2, norm=True)]
    vitkd = build_methods("vitkd", {}, VIT_INFO, TeacherContext(num_classes=C, num_levels=3, taps=renamed))[0]
    assert [f.name for f in vitkd.shallow] == ["b0", "b1"] and vitkd.deep.name == "last"
    check_cache(needs_of("vitkd"), manifest(features=renamed))
    # a name with another point does not serve
    with pytest.raises(ValueError, match="feature tap 'block1'"):
        check_cache(needs_of("vitkd"), manifest(features=[feat("block0", 0), feat("block1", 2), feat("final", 2, norm=True)]))
    # a negative index is resolved with the teacher's levels
    assert manifest().tap_serving(TapSpec(name="x", index=-2)).name == "block1"


def test_check_cache_names_every_missing_target():
    needs = Needs(logits=True, taps=(B0, B1, FINAL, TapSpec(name="mid", index=5)), tpp=True)
    with pytest.raises(ValueError) as e:
        check_cache(needs, manifest(features=[feat("block0", 0)], logits=False))
    msg = str(e.value)
    assert "feature tap 'block1'" in msg and "{name: block1, index: 1}" in msg
    assert "feature tap 'final'" in msg and "{name: final, index: -1, norm: true}" in msg
    assert "feature tap 'mid'" in msg and "{name: mid, index: 5}" in msg
    assert "'block0'" not in msg.split("lacks:")[1]
    assert "teacher logits (cache with targets.logits" in msg and "targets.tpp: {tail: 1}" in msg
    check_cache(Needs(logits=True, taps=(B0, FINAL), tpp=True), manifest(tpp=True))
    with pytest.raises(ValueError, match="ViTKD needs teacher tap 'final'.*norm: true"):
        build_methods("vitkd", {}, VIT_INFO, TeacherContext(num_classes=C, num_levels=3, taps=TEACHER_FEATURES[:2]))
    with pytest.raises(ValueError, match="ViTKD needs teacher tap 'final'.*norm: true"):
        build_methods("vitkd", {}, VIT_INFO, TeacherContext(num_classes=C, num_levels=3, taps=TEACHER_FEATURES[:2]))


# --------------------------------------------------------------------------- student I/O


@pytest.mark.parametrize("name,kwargs,size,prefix", [
    ("resnet18", dict(num_classes=C), 64, 0),
    (*VIT_STUDENT, 32, 1),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=3, num_classes=C), 32, 2),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=2, embed_dim=24, depths=(1, 1, 2, 1),
                                          num_heads=(1, 2, 3, 4), num_classes=C), 32, 0),
    ("mixer", None, 32, 0),
])
def test_student_forward_uses_timm_interface(name, kwargs, size, prefix):
    torch.manual_seed(0)
    model = (MlpMixer(img_size=32, patch_size=8, num_blocks=4, embed_dim=32, num_classes=C) if kwargs is None
             else timm.create_model(name, **kwargs))
    model.train()
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    info = student_info(model, size)
    assert model.training and all(torch.equal(m.running_mean, b) for m, b in zip(bn, before, strict=True))
    assert info.prefix_tokens == prefix and info.num_levels == len(model.feature_info)
    model.eval()
    x = torch.randn(2, 3, size, size)
    out = student_forward(model, x, (0, -1, -2))
    torch.testing.assert_close(out.logits, model(x))
    assert sorted(out.features) == [0, info.num_levels - 2, info.num_levels - 1]
    for i, f in out.features.items():
        assert tuple(f.shape) == (2, *info.shapes[i])
    assert tuple(out.final_tokens.shape) == (2, *info.final_tokens)
    if info.vit_like:  # final normed tokens, prefix dropped, on the last level's grid
        torch.testing.assert_close(out.final_tokens, out.final[:, prefix:])
        c, h, w = info.shapes[-1]
        assert info.final_tokens == (h * w, c)
    assert student_forward(model, x).features == {}


# --------------------------------------------------------------------------- logits by hand


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def logits_pair(B: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 2, torch.randn(B, C, generator=g) * 3, torch.randint(0, C, (B,), generator=g)


def out_of(z: torch.Tensor) -> StudentOutput:
    return StudentOutput(logits=z)


def topk_targets(zt: torch.Tensor, k: int, half: bool = False) -> TeacherTargets:
    if half:  # as cached: the top-k codec's fp16 values
        codec = LogitsInfo(mode="topk", k=k, num_classes=C).codec()
        return TeacherTargets(num_classes=C, topk=codec.decode(codec.encode(zt)[0]))
    v, i = zt.topk(k, -1)
    return TeacherTargets(num_classes=C, topk=TopK(values=v, indices=i, logsumexp=zt.logsumexp(-1)))


def method(name: str, **opts):
    return build_methods(name, {name: opts}, VIT_INFO, TeacherContext(num_classes=C))[0]


def test_ce_label_smoothing_and_bce_by_hand():
    zs, _, y = logits_pair()
    z, yy = zs.double().numpy(), y.numpy()
    q = np.full((6, C), 0.1 / C)
    q[np.arange(6), yy] += 0.9
    want = -(q * np_log_softmax(z)).sum(1).mean()
    got = method("ce", weight=0.5)(out_of(zs), TeacherTargets(num_classes=C), y)
    assert list(got) == ["loss_ce"]
    np.testing.assert_allclose(got["loss_ce"].item(), 0.5 * want, rtol=1e-5)
    bce = -(q * np.log(1 / (1 + np.exp(-z))) + (1 - q) * np.log(1 - 1 / (1 + np.exp(-z))))
    got = method("ce", loss="bce")(out_of(zs), TeacherTargets(num_classes=C), y)["loss_ce"]
    np.testing.assert_allclose(got.item(), bce.mean(), rtol=1e-5)
    got = method("ce", loss="bce", bce_sum=True)(out_of(zs), TeacherTargets(num_classes=C), y)["loss_ce"]
    np.testing.assert_allclose(got.item(), bce.sum(1).mean(), rtol=1e-5)


def kl_by_hand(zs: torch.Tensor, zt: torch.Tensor, T: float) -> float:
    ls, lt = np_log_softmax(zs.double().numpy() / T), np_log_softmax(zt.double().numpy() / T)
    return T * T * (np.exp(lt) * (lt - ls)).sum(1).mean()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_full_logits_by_hand(T):
    zs, zt, y = logits_pair()
    full = TeacherTargets(num_classes=C, logits=zt)
    got = method("kd", temperature=T, weight=2.0)(out_of(zs), full, y)
    np.testing.assert_allclose(got["loss_kd"].item(), 2.0 * kl_by_hand(zs, zt, T), rtol=1e-5)
    # soft CE = KL + T² · teacher entropy
    lt = np_log_softmax(zt.double().numpy() / T)
    ent = -(np.exp(lt) * lt).sum(1).mean()
    got = method("kd", temperature=T, soft_ce=True)(out_of(zs), full, y)["loss_kd"]
    np.testing.assert_allclose(got.item(), kl_by_hand(zs, zt, T) + T * T * ent, rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_topk_with_all_classes_equals_full(T):
    zs, zt, y = logits_pair()
    kd = method("kd", temperature=T)
    full = kd(out_of(zs), TeacherTargets(num_classes=C, logits=zt), y)["loss_kd"]
    torch.testing.assert_close(kd(out_of(zs), topk_targets(zt, C), y)["loss_kd"], full)


def test_kd_topk_drops_exactly_the_within_rest_term_at_t1():
    """k < C at T = 1: loss = full KL − r · KL(p_t(·|rest) ‖ p_s(·|rest)) ≤ full KL (chain rule)."""
    zs, zt, y = logits_pair(B=8, seed=1)
    k = 4
    got = method("kd")(out_of(zs), topk_targets(zt, k), y)["loss_kd"].item()
    ls, lt = np_log_softmax(zs.double().numpy()), np_log_softmax(zt.double().numpy())
    per_row = []
    for b in range(8):
        rest = np.argsort(-zt[b].numpy())[k:]
        pt, ps = np.exp(lt[b, rest]), np.exp(ls[b, rest])
        r = pt.sum()
        full_b = (np.exp(lt[b]) * (lt[b] - ls[b])).sum()
        within = ((pt / r) * np.log((pt / r) / (ps / ps.sum()))).sum()
        per_row.append(full_b - r * within)
    np.testing.assert_allclose(got, np.mean(per_row), rtol=1e-5)
    assert got <= kl_by_hand(zs, zt, 1.0) + 1e-9
    # fp16 cached top-k values (as written by the caching job) stay close and finite
    half = method("kd")(out_of(zs), topk_targets(zt, k, half=True), y)["loss_kd"].item()
    np.testing.assert_allclose(half, got, rtol=2e-2)


def test_kd_topk_at_temperature_assumes_equal_rest_logits():
    """T ≠ 1: exact (bucketed) when the teacher's unkept logits are equal, as documented."""
    zs, zt, y = logits_pair(seed=2)
    k, T = 3, 2.0
    zt = zt.clone()
    order = zt.argsort(-1, descending=True)
    zt.scatter_(1, order[:, k:], zt.gather(1, order[:, k:]).min(-1, keepdim=True).values.expand(-1, C - k))
    zs_ = zs.requires_grad_(True)
    got = method("kd", temperature=T)(out_of(zs_), topk_targets(zt, k), y)["loss_kd"]
    got.backward()
    assert torch.isfinite(zs_.grad).all()
    ls, lt = np_log_softmax(zs.detach().double().numpy() / T), np_log_softmax(zt.double().numpy() / T)
    want = []
    for b in range(6):
        kept, rest = order[b, :k].numpy(), order[b, k:].numpy()
        pt = np.append(np.exp(lt[b, kept]), np.exp(lt[b, rest]).sum())
        ps = np.append(np.exp(ls[b, kept]), np.exp(ls[b, rest]).sum())
        want.append(T * T * (pt * np.log(pt / ps)).sum())
    np.testing.assert_allclose(got.item(), np.mean(want), rtol=1e-4)  # fp32 rest mass 1 − Σ kept


def nkd_by_hand(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, T: float, gamma: float) -> float:
    s, t, yy = zs.double().numpy(), zt.double().numpy(), y.numpy()
    total = 0.0
    for b in range(len(yy)):
        t_y = np.exp(np_log_softmax(t[b])[yy[b]])
        s_y = np_log_softmax(s[b])[yy[b]]
        other = [c for c in range(C) if c != yy[b]]
        th = np.exp(np_log_softmax(t[b, other] / T))
        sh = np_log_softmax(s[b, other] / T)
        total += -t_y * s_y - gamma * T * T * (th * sh).sum()
    return total / len(yy)


@pytest.mark.parametrize("T,gamma", [(1.0, 1.0), (2.0, 1.5)])
def test_nkd_by_hand(T, gamma):
    zs, zt, y = logits_pair(seed=3)
    nkd = method("nkd", temperature=T, gamma=gamma, weight=0.7)
    got = nkd(out_of(zs), TeacherTargets(num_classes=C, logits=zt), y)
    assert list(got) == ["loss_nkd"]
    np.testing.assert_allclose(got["loss_nkd"].item(), 0.7 * nkd_by_hand(zs, zt, y, T, gamma), rtol=1e-5)
    torch.testing.assert_close(nkd(out_of(zs), topk_targets(zt, C), y)["loss_nkd"], got["loss_nkd"])
    onehot = torch.nn.functional.one_hot(y, C).float() * 0.8 + 0.02  # soft labels: argmax
    torch.testing.assert_close(nkd(out_of(zs), TeacherTargets(num_classes=C, logits=zt), onehot)["loss_nkd"],
                               got["loss_nkd"])


def test_nkd_topk_renormalises_over_kept_classes_and_rest():
    """k < C: t_y exact if the label is kept, else the equal share r/(C−k); the non-target
    distribution runs over the kept classes ≠ y plus the rest bucket (less y's share)."""
    zs, zt, _ = logits_pair(B=4, seed=4)
    k, T = 4, 2.0
    order = zt.argsort(-1, descending=True)
    y = torch.stack([order[0, 0], order[1, 2], order[2, 5], order[3, 9]])  # kept, kept, rest, rest
    zs_ = zs.clone().requires_grad_(True)
    got = method("nkd", temperature=T)(out_of(zs_), topk_targets(zt, k), y)["loss_nkd"]
    got.backward()
    assert torch.isfinite(zs_.grad).all()
    lt, ls = np_log_softmax(zt.double().numpy()), np_log_softmax(zs.double().numpy())
    want = []
    for b in range(4):
        kept, rest, yb = list(order[b, :k].numpy()), list(order[b, k:].numpy()), int(y[b])
        r = np.exp(lt[b, rest]).sum()
        share = r / len(rest)
        t_y = np.exp(lt[b, yb]) if yb in kept else share
        loss_t = -t_y * ls[b, yb]
        kept_ny = [c for c in kept if c != yb]
        rest_ny = [c for c in rest if c != yb]
        # teacher buckets at T: kept p^(1/T), rest: m equal classes of p = share
        tw = np.append(np.exp(lt[b, kept_ny] / T), len(rest_ny) * share ** (1 / T))
        sw = np.append(np.exp(ls[b, kept_ny] / T), np.exp(ls[b, rest_ny] / T).sum())
        th, sh = tw / tw.sum(), sw / sw.sum()
        want.append(loss_t - T * T * (th * np.log(sh)).sum())
    np.testing.assert_allclose(got.item(), np.mean(want), rtol=1e-5)


@pytest.mark.parametrize("k", [1, C - 1])
def test_topk_edge_cases_have_finite_gradients(k):
    """k = 1 (rest holds almost everything) and k = C − 1 with the label as the only unkept
    class (NKD's non-target rest bucket becomes empty)."""
    zs, zt, _ = logits_pair(B=3)
    y = zt.argsort(-1, descending=True)[:, -1]
    for name in ("kd", "nkd"):
        z = zs.clone().requires_grad_(True)
        loss = method(name, temperature=2.0)(out_of(z), topk_targets(zt, k, half=True), y)[f"loss_{name}"]
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
