"""Top-k cached logits against full logits for a peaked teacher (ImageNet-like: top-1 ≈ 0.94, top-10 ≈ 0.99):
with the rest mass stored from fp32 logits, top-k KD and NKD at T = 1 follow the full-logit gradients; a
temperature ≠ 1 from top-k logits is refused unless asked for. References are the losses written from
their formulas on all C logits, differentiated by autograd — not the methods' own code paths."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from storage_schemas.codecs import LogitsInfo
from student.methods import StudentInfo, StudentOutput, TeacherContext, build_methods
from student.targets import TeacherTargets

C, K, B = 1000, 10, 64
INFO = StudentInfo(shapes=((8, 2, 2),) * 2, final_tokens=(4, 8))


def peaked_teacher(seed: int = 0) -> torch.Tensor:
    """[B, C] logits: one dominant class, a few runner-ups, a long flat tail."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g)
    top = torch.randint(0, C, (B,), generator=g)
    z[torch.arange(B), top] += 13.0
    runners = torch.randint(0, C, (B, 9), generator=g)
    z.scatter_add_(1, runners, torch.full((B, 9), 7.2))
    return z


def cached(z: torch.Tensor, rest: bool) -> TeacherTargets:
    """What the cache holds and the trainer decodes: the top-k codec's rows (fp16 values)."""
    codec = LogitsInfo(mode="topk", k=K, num_classes=C, rest_logmass=rest).codec()
    return TeacherTargets(num_classes=C, topk=codec.decode(codec.encode(z)[0]))


def kd_full(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """T = 1: mean_b Σ_c p_t (log p_t − log p_s), all C classes."""
    pt = zt.softmax(-1)
    return (pt * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum(-1).mean()


def nkd_non_target(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−mean_b Σ_{c≠y} t̂_c log ŝ_c, t̂/ŝ softmaxes over the classes c ≠ y (T = 1)."""
    mask = F.one_hot(y, C).bool()
    t_hat = zt.masked_fill(mask, float("-inf")).softmax(-1)
    log_s_hat = zs.masked_fill(mask, float("-inf")).log_softmax(-1).masked_fill(mask, 0.0)
    return -(t_hat * log_s_hat).sum(-1).mean()


def nkd_full(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """T = 1, γ = 1: −mean_b t_y log s_y + the non-target term, all C classes."""
    ty = zt.softmax(-1).gather(1, y[:, None]).squeeze(1)
    log_sy = zs.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    return -(ty * log_sy).mean() + nkd_non_target(zs, zt, y)


def grad(fn, zs: torch.Tensor) -> torch.Tensor:
    zs = zs.clone().requires_grad_(True)
    fn(zs).backward()
    return zs.grad.flatten()


def method(name: str, logits: LogitsInfo | None = None, **opts):
    ctx = TeacherContext(num_classes=C, logits=logits)
    return build_methods(name, {name: opts} if opts else {}, INFO, ctx)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def test_the_teacher_is_as_peaked_as_imagenet_teachers_and_fp16_loses_its_rest():
    zt = peaked_teacher()
    top = zt.softmax(-1).topk(K, -1).values
    assert 0.9 < float(top[:, 0].mean()) < 0.97 and float(top.sum(-1).mean()) > 0.99
    rest = 1 - top.double().sum(-1)
    rebuilt = (1 - cached(zt, rest=False).topk.log_probs.double().exp().sum(-1)).clamp_min(0)
    assert float((rebuilt == 0).double().mean()) > 0.05  # rows whose rest rounds away entirely
    assert float(((rebuilt - rest).abs() / rest).median()) > 0.25


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_kd_and_nkd_follow_full_logit_gradients_with_the_stored_rest(seed):
    zt = peaked_teacher(seed)
    g = torch.Generator().manual_seed(100 + seed)
    zs = 0.8 * zt + 0.5 * torch.randn(B, C, generator=g)  # a student that already follows the teacher
    y = zt.argmax(-1)
    kd, nkd, nkd_target_only = method("kd"), method("nkd"), method("nkd", gamma=0.0)
    exact, old = cached(zt, rest=True), cached(zt, rest=False)

    def topk(m, t, key):
        return grad(lambda s: m(StudentOutput(logits=s), t, y)[key], zs)

    assert cosine(topk(kd, exact, "loss_kd"), grad(lambda s: kd_full(s, zt), zs)) >= 0.998
    assert cosine(topk(nkd, exact, "loss_nkd"), grad(lambda s: nkd_full(s, zt, y), zs)) >= 0.998
    # NKD's non-target term, where the teacher's rest mass matters most
    ref = grad(lambda s: nkd_non_target(s, zt, y), zs)
    non_exact = topk(nkd, exact, "loss_nkd") - topk(nkd_target_only, exact, "loss_nkd")
    non_old = topk(nkd, old, "loss_nkd") - topk(nkd_target_only, old, "loss_nkd")
    assert cosine(non_exact, ref) >= 0.998 and cosine(non_old, ref) < 0.99  # an older cache: the fp16 rest
    # the bucketed KL is a coarse-graining of the full one: never larger
    with torch.no_grad():
        assert float(kd(StudentOutput(logits=zs), exact, y)["loss_kd"]) <= float(kd_full(zs, zt)) + 1e-5


def test_stored_rest_mass_is_the_fp32_mass_off_the_top_k():
    zt = peaked_teacher()
    top = cached(zt, rest=True).topk
    p = zt.double().softmax(-1)
    want = (1 - p.gather(1, zt.topk(K, -1).indices).sum(-1)).log()
    torch.testing.assert_close(top.rest_logmass.double(), want, rtol=1e-4, atol=1e-6)


def test_temperature_other_than_one_from_topk_is_refused_unless_asked(caplog):
    topk = LogitsInfo(mode="topk", k=K, num_classes=C, rest_logmass=True)
    for name in ("kd", "nkd"):
        with pytest.raises(ValueError, match=rf"{name}.temperature=4 with top-10 cached logits.*mode: full"):
            method(name, topk, temperature=4.0)
        method(name, topk, temperature=4.0, allow_topk_temperature=True)  # asked for
        method(name, topk, temperature=1.0)
        method(name, LogitsInfo(mode="full", k=K, num_classes=C), temperature=4.0)  # all logits: exact
    with caplog.at_level(logging.WARNING):
        method("kd", LogitsInfo(mode="topk", k=K, num_classes=C))  # an older cache: no rest mass
    assert "stores no rest mass" in caplog.text
