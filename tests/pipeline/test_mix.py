"""Mixed views (issue 14 item 1): the mix record is sampled as timm's ``Mixup`` draws its parameters, the partner
is a valid other sample of the same tar and block of ``window`` positions, ``mix_views`` mixes as timm does, and
the record round-trips the arrays.

timm's own code is the reference throughout: ``Mixup._params_per_elem`` and ``cutmix_bbox_and_lam`` for the
distributions, ``Mixup._mix_elem`` for the mixed tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import mixup as timm_mixup

from pipeline.views import mix_block, mix_box_pixels, mix_views, sample_mix, sample_view
from storage_schemas import arrays as A
from storage_schemas.identity import lineage_key
from storage_schemas.views import NO_PARTNER, MixRecipe, MixRecord, ViewRecipe, ViewRecord

from .test_views import SRC_H, SRC_W, _ks

N = 10_000
BIG = 10_000  # samples in the tar of the distribution tests: the partner never constrains anything
# About 40 comparisons, each at p = 1e-4 (the family errs by chance in < 0.5 % of seeds). Two-sample KS of n and m
# draws of one distribution: above KS_C · sqrt((n + m) / (n m)) with p = 1e-4 (KS_C = sqrt(-ln(p / 2) / 2)).
KS_C = 2.23
# a mode's share over N draws each: two binomials (p = 1/2 at worst) differ by more than 0.028 with p < 1e-4
SHARE_MAX = 0.028

RECIPES = {
    "vanillakd_a2": dict(mixup_alpha=0.1, cutmix_alpha=1.0),  # --mixup 0.1 --cutmix 1.0
    "deit": dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    "prob_switch": dict(mixup_alpha=0.2, cutmix_alpha=0.5, prob=0.6, switch_prob=0.3),
    "cutmix_uncorrected": dict(cutmix_alpha=1.0, correct_lam=False),
    "minmax": dict(mixup_alpha=0.4, cutmix_minmax=(0.2, 0.8)),
    "mixup_only": dict(mixup_alpha=1.0, prob=0.8),
}


def _recipe(**mix) -> ViewRecipe:
    return ViewRecipe(randaugment=None, erase=None, mix=mix)


def _ours(recipe: ViewRecipe, n: int = N) -> list[MixRecord]:
    return [sample_mix(recipe, tar=i % 7, position=i // 7, view=i % 3, count=BIG) for i in range(n)]


def _timm(mix: MixRecipe, side: int, n: int = N, seed: int = 0) -> list[tuple[str, float, tuple]]:
    """timm's own draws for ``n`` elements at ``side x side``: (mode, applied λ, (x0, y0, w, h) fractions)."""
    np.random.seed(seed)
    m = timm_mixup.Mixup(mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, cutmix_minmax=mix.cutmix_minmax,
                         prob=mix.prob, switch_prob=mix.switch_prob, mode="elem", correct_lam=mix.correct_lam,
                         label_smoothing=0.0, num_classes=10)
    lam, use_cutmix = m._params_per_elem(n)
    out = []
    for la, cut in zip(lam, use_cutmix, strict=True):
        if la == 1.0:  # timm's ``if lam != 1.``
            out.append(("none", 1.0, (0.0,) * 4))
        elif cut:
            (yl, yh, xl, xh), la2 = timm_mixup.cutmix_bbox_and_lam(
                (3, side, side), la, ratio_minmax=mix.cutmix_minmax, correct_lam=mix.correct_lam)
            out.append(("cutmix", float(la2), (xl / side, yl / side, (xh - xl) / side, (yh - yl) / side)))
        else:
            out.append(("mixup", float(la), (0.0,) * 4))
    return out


# --- the recipe ---------------------------------------------------------------------------


def test_recipe_validation():
    with pytest.raises(ValueError, match="mixes nothing"):
        MixRecipe()
    with pytest.raises(ValueError, match="cutmix_minmax"):
        MixRecipe(cutmix_minmax=(0.8, 0.2))
    # timm forces CutMix's alpha to 1 when minmax is set
    assert MixRecipe(cutmix_minmax=(0.2, 0.8)).cutmix_beta == 1.0
    assert MixRecipe(cutmix_alpha=0.5).cutmix_beta == 0.5
    with pytest.raises(ValueError, match="window"):
        MixRecipe(mixup_alpha=1.0, window=1)
    assert MixRecipe(mixup_alpha=1.0).window == 128


def test_recipe_without_mix_keeps_dump_identity_and_arrays():
    plain = ViewRecipe()
    assert "mix" not in plain.model_dump(mode="json") and "mix" not in plain.model_dump_json()
    assert ViewRecipe(mix=None) == plain
    key = lineage_key({"model": "m", "model_kwargs": {}, "weights_sha256": "0", "input_size": 8, "mean": [0] * 3,
                       "std": [1] * 3}, plain.model_dump(mode="json"), {})
    mixed = ViewRecipe(mix={"mixup_alpha": 0.1}).model_dump(mode="json")
    assert mixed["mix"]["mixup_alpha"] == 0.1 and mixed["mix"]["window"] == 128
    teacher = {"model": "m", "model_kwargs": {}, "weights_sha256": "0", "input_size": 8, "mean": [0] * 3,
               "std": [1] * 3}
    assert key != lineage_key(teacher, mixed, {})
    # the window decides the partners, so it is part of the identity
    other = ViewRecipe(mix={"mixup_alpha": 0.1, "window": 64}).model_dump(mode="json")
    assert lineage_key(teacher, other, {}) != lineage_key(teacher, mixed, {})
    names = {s.name for s in A.cache_arrays(plain, [], 4)}
    assert not names & set(A.VIEW_MIX_ARRAYS)
    assert set(A.VIEW_MIX_ARRAYS) <= {s.name for s in A.cache_arrays(ViewRecipe(mix={"mixup_alpha": 0.1}), [], 4)}
    # an unmixed record dumps as before schema 1.6 (export-wds writes these dumps)
    rec = sample_view(plain, tar=1, position=2, view=3, width=SRC_W, height=SRC_H)
    assert rec.mix is None and "mix" not in rec.model_dump(mode="json")


def test_mix_leaves_the_other_view_fields_alone():
    """The mix has a generator of its own: adding it to a recipe changes no crop, flip, op or erase box."""
    plain = ViewRecipe(randaugment="rand-m9-mstd0.5-inc1")
    mixed = plain.model_copy(update={"mix": MixRecipe(mixup_alpha=0.8, cutmix_alpha=1.0)})
    for i in range(200):
        kw = dict(tar=i % 5, position=i, view=i % 4, width=SRC_W, height=SRC_H)
        a, b = sample_view(plain, **kw), sample_view(mixed, **kw, count=BIG)
        assert b.mix is not None and b.model_copy(update={"mix": None}) == a
    with pytest.raises(ValueError, match="count"):
        sample_view(mixed, tar=0, position=0, view=0, width=SRC_W, height=SRC_H)


# --- λ, mode and box against timm ---------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_lam_mode_box_distribution_matches_timm(name):
    recipe = _recipe(**RECIPES[name])
    ours = _ours(recipe)
    ref = _timm(recipe.mix, side=224)  # a usual teacher input: timm's pixel rounding is part of the reference
    for mode in ("none", "mixup", "cutmix"):
        share = np.mean([r.mode == mode for r in ours])
        assert abs(share - np.mean([m == mode for m, _, _ in ref])) < SHARE_MAX, mode
    for mode in ("mixup", "cutmix"):
        lam = np.array([r.lam for r in ours if r.mode == mode])
        ref_lam = np.array([la for m, la, _ in ref if m == mode])
        if len(ref_lam) == 0:
            assert len(lam) == 0
            continue
        bound = KS_C * np.sqrt((len(lam) + len(ref_lam)) / (len(lam) * len(ref_lam)))
        assert _ks(lam, ref_lam) < bound, mode
        if mode == "cutmix":
            box = np.array([r.box for r in ours if r.mode == mode])
            ref_box = np.array([b for m, _, b in ref if m == mode])
            assert _ks(box[:, 2] * box[:, 3], ref_box[:, 2] * ref_box[:, 3]) < bound  # pasted area
            assert _ks(box[:, 2], ref_box[:, 2]) < bound and _ks(box[:, 3], ref_box[:, 3]) < bound
            assert _ks(box[:, 0] + box[:, 2] / 2, ref_box[:, 0] + ref_box[:, 2] / 2) < bound  # centres
            assert _ks(box[:, 1] + box[:, 3] / 2, ref_box[:, 1] + ref_box[:, 3] / 2) < bound
            assert (box[:, :2] >= 0).all() and (box[:, 0] + box[:, 2] <= 1 + 1e-6).all()
            assert (box[:, 1] + box[:, 3] <= 1 + 1e-6).all()


@pytest.mark.parametrize("name", ["vanillakd_a2", "deit"])
def test_a_samples_lam_and_mode_follow_the_law_of_timms_batch_mode(name):
    """timm's default ``mode='batch'`` (VanillaKD's and DeiT's) draws one mode and λ per batch for all its samples;
    one draw per view gives each sample the same law (what differs is only that a batch's samples share theirs).
    Reference: timm's own ``_params_per_batch``, CutMix λ corrected at 224 px by ``cutmix_bbox_and_lam`` as its
    ``_mix_batch`` does; mixup λ there is Beta(α, α) itself."""
    recipe = _recipe(**RECIPES[name])
    mix = recipe.mix
    ours = _ours(recipe)
    np.random.seed(1)
    m = timm_mixup.Mixup(mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, cutmix_minmax=mix.cutmix_minmax,
                         prob=mix.prob, switch_prob=mix.switch_prob, mode="batch", correct_lam=mix.correct_lam,
                         label_smoothing=0.0, num_classes=10)
    ref = []
    for _ in range(N):  # one batch each: its λ is every one of its samples' λ
        lam, cut = m._params_per_batch()
        # batch mode keeps λ in float64, the cache stores float32 (as timm's elem mode rounds it): with α = 0.1 about
        # 4 % of the draws lie within float32 rounding of 1 (1 - λ < 3e-8), a mix no image or label can show; the
        # cache stores them unmixed, as timm's elem mode does
        lam = float(np.float32(lam))
        if lam == 1.0:
            ref.append(("none", 1.0))
        elif cut:
            _, lam = timm_mixup.cutmix_bbox_and_lam((3, 224, 224), lam, ratio_minmax=mix.cutmix_minmax,
                                                    correct_lam=mix.correct_lam)
            ref.append(("cutmix", float(lam)))
        else:
            ref.append(("mixup", float(lam)))
    for mode in ("none", "mixup", "cutmix"):
        assert abs(np.mean([r.mode == mode for r in ours]) - np.mean([md == mode for md, _ in ref])) < SHARE_MAX
    for mode in ("mixup", "cutmix"):
        lam = np.array([r.lam for r in ours if r.mode == mode])
        ref_lam = np.array([la for md, la in ref if md == mode])
        assert _ks(lam, ref_lam) < KS_C * np.sqrt((len(lam) + len(ref_lam)) / (len(lam) * len(ref_lam))), mode
    lam = np.array([r.lam for r in ours if r.mode == "mixup"])
    beta = np.random.default_rng(2).beta(mix.mixup_alpha, mix.mixup_alpha, N).astype(np.float32)
    beta = beta[beta < 1]  # Beta(α, α) itself, less what float32 rounds to 1 (unmixed, above)
    assert _ks(lam, beta) < KS_C * np.sqrt((len(lam) + len(beta)) / (len(lam) * len(beta)))


def test_cutmix_lam_is_the_box_complement_when_corrected():
    for mix, corrected in ((dict(cutmix_alpha=1.0), True), (dict(cutmix_alpha=1.0, correct_lam=False), False),
                           (dict(cutmix_minmax=(0.3, 0.6), correct_lam=False), True)):
        records = [r for r in _ours(_recipe(**mix), 500) if r.mode == "cutmix"]
        assert len(records) > 400
        exact = [r.lam == float(np.float32(1.0 - r.box[2] * r.box[3])) for r in records]
        # uncorrected: λ is the Beta draw, which differs from the clipped box's area whenever clipping happened
        assert all(exact) if corrected else not all(exact)
        if "cutmix_minmax" in mix:
            sides = np.array([r.box[2:] for r in records])
            assert sides.min() >= 0.3 - 1e-6 and sides.max() < 0.6 + 1e-6


def test_unmixed_views_have_no_partner_lam_or_box():
    records = _ours(_recipe(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5), 1000)
    none = [r for r in records if r.mode == "none"]
    assert 400 < len(none) < 600
    assert all(r == MixRecord() for r in none)
    assert all(r.partner != NO_PARTNER and 0 <= r.lam <= 1 for r in records if r.mode != "none")
    assert all(r.box == (0.0,) * 4 for r in records if r.mode == "mixup")


# --- the partner --------------------------------------------------------------------------


def test_mix_block():
    assert mix_block(0, 1250, 128) == range(0, 128) and mix_block(127, 1250, 128) == range(0, 128)
    assert mix_block(128, 1250, 128) == range(128, 256)
    assert mix_block(1249, 1250, 128) == range(1152, 1250)  # the last block is cut at the tar's end
    assert mix_block(128, 129, 128) == range(128, 129)


@pytest.mark.parametrize("count,window", [(2, 128), (3, 2), (7, 3), (50, 8), (1250, 128), (300, 1000)])
def test_partner_in_same_block_never_itself_never_invalid(count, window):
    """The partner is in the sample's aligned block of ``window`` positions (so in the same tar), never the
    sample itself, never invalid; a block with no other valid position leaves the view unmixed."""
    recipe = _recipe(mixup_alpha=1.0, window=window)
    valid = np.random.default_rng(count).random(count) < 0.7
    for position in range(count):
        block = range(position // window * window, min((position // window + 1) * window, count))
        for view in range(3):
            for mask in (None, valid):
                r = sample_mix(recipe, tar=3, position=position, view=view, count=count, valid=mask)
                others = [q for q in block if q != position and (mask is None or mask[q])]
                if not others:
                    assert r == MixRecord()
                    continue
                assert r.mode == "mixup"
                assert r.partner in block and 0 <= r.partner < count and r.partner != position
                assert mask is None or mask[r.partner]


@pytest.mark.parametrize("position", [4, 24, 45])
def test_partner_is_uniform_over_the_valid_others_of_its_block(position):
    recipe = _recipe(mixup_alpha=1.0, window=10)
    count = 47  # the last block is 40..46
    valid = np.ones(count, bool)
    valid[[1, 7, 21, 23, 28, 33, 42]] = False
    partners = [sample_mix(recipe, tar=t, position=position, view=v, count=count, valid=valid).partner
                for t in range(40) for v in range(50)]
    hist = np.bincount(partners, minlength=count)
    block = np.zeros(count, bool)
    block[position // 10 * 10:min(position // 10 * 10 + 10, count)] = True
    allowed = block & valid & (np.arange(count) != position)
    assert hist[~allowed].sum() == 0
    expected = len(partners) / allowed.sum()
    # chi-square with allowed - 1 (5 to 7) degrees of freedom: below 22.5 with p > 0.002 for each
    assert ((hist[allowed] - expected) ** 2 / expected).sum() < 22.5


def test_partner_needs_only_the_validity_of_what_it_draws():
    """With every position valid the partner is the first draw, so ``count`` suffices; a mask changes the
    partner only where it marks that draw invalid, and λ, mode and box never depend on it."""
    recipe = _recipe(mixup_alpha=0.8, cutmix_alpha=1.0, window=8)
    count = 30
    for position in range(count):
        free = sample_mix(recipe, tar=0, position=position, view=1, count=count)
        valid = np.ones(count, bool)
        valid[position ^ 1] = False  # some other sample of its block is bad
        masked = sample_mix(recipe, tar=0, position=position, view=1, count=count, valid=valid)
        if valid[free.partner]:
            assert masked == free
        else:
            assert masked.model_copy(update={"partner": free.partner}) == free and valid[masked.partner]


def test_no_valid_partner_means_unmixed():
    recipe = _recipe(cutmix_alpha=1.0)
    assert sample_mix(recipe, tar=0, position=0, view=0, count=1) == MixRecord()
    for view in range(20):
        r = sample_mix(recipe, tar=0, position=2, view=view, count=4, valid=[False, False, True, False])
        assert r == MixRecord()
    # valid others outside the block do not count
    windowed = _recipe(cutmix_alpha=1.0, window=4)
    valid = [True] * 4 + [False, True, False, False] + [True] * 4
    assert all(sample_mix(windowed, tar=0, position=5, view=v, count=12, valid=valid) == MixRecord()
               for v in range(20))
    # nor does a last block of one position
    assert all(sample_mix(windowed, tar=0, position=12, view=v, count=13) == MixRecord() for v in range(20))
    with pytest.raises(ValueError, match="outside"):
        sample_mix(recipe, tar=0, position=4, view=0, count=4)
    with pytest.raises(ValueError, match="validity"):
        sample_mix(recipe, tar=0, position=0, view=0, count=4, valid=[True])


def test_same_key_same_mix_other_keys_other_mixes():
    recipe = _recipe(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = sample_mix(recipe, tar=5, position=17, view=2, count=BIG)
    assert a == sample_mix(recipe, tar=5, position=17, view=2, count=BIG)
    others = {sample_mix(recipe, tar=5, position=17, view=v, count=BIG) for v in range(200)}
    assert len(others) == 200
    assert sample_mix(recipe.model_copy(update={"seed": 1}), tar=5, position=17, view=2, count=BIG) != a


# --- the mixed tensor ---------------------------------------------------------------------


def _pair(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(side)
    return torch.randn(3, side, side, generator=g), torch.randn(3, side, side, generator=g)


def _timm_mix_elem(a: torch.Tensor, b: torch.Tensor, mode: str, lam: float, box_px: tuple | None,
                   monkeypatch) -> tuple[torch.Tensor, float]:
    """timm's ``Mixup._mix_elem`` on the batch ``[a, b]`` (element 0 mixes with element 1) with its parameters
    set to ``mode``, ``lam`` and, for CutMix, the pixel box ``(yl, yh, xl, xh)``. Returns element 0 and its λ."""
    m = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", label_smoothing=0.0, num_classes=10)
    lam2 = np.array([lam, lam], np.float32)
    monkeypatch.setattr(m, "_params_per_elem", lambda n: (lam2.copy(), np.array([mode == "cutmix"] * n)))
    if box_px is not None:
        side = a.shape[-1]
        yl, yh, xl, xh = box_px
        area = 1.0 - (yh - yl) * (xh - xl) / float(side * side)
        monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", lambda *args, **kw: (box_px, area))
    x = torch.stack([a, b])
    lam_out = m._mix_elem(x)
    return x[0], float(lam_out[0, 0])


def test_mixup_equals_timm(monkeypatch):
    a, b = _pair(32)
    records = [r for r in _ours(_recipe(mixup_alpha=0.8), 20) if r.mode == "mixup"]
    assert records
    for r in records:
        want, lam = _timm_mix_elem(a, b, "mixup", r.lam, None, monkeypatch)
        got = mix_views(a, b, r)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, a * r.lam + b * (1 - r.lam))  # the formula, by hand
        assert lam == pytest.approx(r.lam, abs=0)


def test_cutmix_with_timm_box_equals_timm_incl_correct_lam(monkeypatch):
    """A box timm draws at 224 px, stored as fractions, replays timm's exact pixels, and the stored corrected λ
    is timm's ``correct_lam`` λ (to float32)."""
    side = 224
    a, b = _pair(side)
    np.random.seed(1)
    for lam in (0.05, 0.3, 0.5, 0.77, 0.95, 0.999):
        (yl, yh, xl, xh), timm_lam = timm_mixup.cutmix_bbox_and_lam((3, side, side), np.float32(lam),
                                                                     correct_lam=True)
        yl, yh, xl, xh = (int(v) for v in (yl, yh, xl, xh))
        box = tuple(float(np.float32(v)) for v in (xl / side, yl / side, (xh - xl) / side, (yh - yl) / side))
        r = MixRecord(partner=1, mode="cutmix", lam=float(np.float32(1.0 - box[2] * box[3])), box=box)
        assert r.lam == pytest.approx(timm_lam, abs=1e-6)
        assert mix_box_pixels(r.box, side, side) == (yl, yh, xl, xh)
        want, want_lam = _timm_mix_elem(a, b, "cutmix", lam, (yl, yh, xl, xh), monkeypatch)
        torch.testing.assert_close(mix_views(a, b, r), want, rtol=0, atol=0)
        assert r.lam == pytest.approx(want_lam, abs=1e-6)


@pytest.mark.parametrize("size", [(224, 224), (160, 96)])
def test_cutmix_by_hand_at_any_resolution(size):
    """Our boxes pasted by hand, and the stored λ within a pixel row or column of the pasted area."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, h, w, generator=g), torch.randn(3, h, w, generator=g)
    records = [r for r in _ours(_recipe(cutmix_alpha=1.0), 60) if r.mode == "cutmix"]
    for r in records:
        x0, y0, bw, bh = r.box
        yl, yh = round(y0 * h), round((y0 + bh) * h)
        xl, xh = round(x0 * w), round((x0 + bw) * w)
        want = a.clone()
        want[:, yl:yh, xl:xh] = b[:, yl:yh, xl:xh]
        got = mix_views(a, b, r)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        pasted = (yh - yl) * (xh - xl) / (h * w)
        # each edge is off by at most half a pixel: the area by at most half a pixel row and column on each side
        assert abs((1 - r.lam) - pasted) <= (bw / h + bh / w + 1 / (h * w)) + 1e-6


def test_unmixed_and_mismatched_views():
    a, b = _pair(16)
    assert mix_views(a, b, None) is a and mix_views(a, b, MixRecord()) is a
    r = MixRecord(partner=1, mode="mixup", lam=0.5)
    with pytest.raises(ValueError, match="shape"):
        mix_views(a, b[:, :8], r)
    batch = mix_views(a[None], b[None], r)  # leading dims are kept
    torch.testing.assert_close(batch[0], mix_views(a, b, r), rtol=0, atol=0)


def test_record_validation():
    with pytest.raises(ValueError, match="unmixed"):
        MixRecord(partner=3)
    with pytest.raises(ValueError, match="without a partner"):
        MixRecord(mode="mixup", lam=0.5)
    with pytest.raises(ValueError, match="box"):
        MixRecord(partner=1, mode="mixup", lam=0.5, box=(0.1, 0.1, 0.2, 0.2))
    with pytest.raises(ValueError, match="unit square"):
        MixRecord(partner=1, mode="cutmix", lam=0.5, box=(0.9, 0.1, 0.2, 0.2))


# --- storage ------------------------------------------------------------------------------


def test_mixed_records_round_trip_through_arrays():
    recipe = ViewRecipe(randaugment="rand-m9-mstd0.5-inc1", mix={"mixup_alpha": 0.1, "cutmix_alpha": 1.0,
                                                                  "prob": 0.8})
    records: list[ViewRecord | None] = [
        sample_view(recipe, tar=i % 3, position=i, view=i % 4, width=SRC_W, height=SRC_H, count=400)
        for i in range(300)]
    records[5] = records[77] = None
    assert {r.mix.mode for r in records if r} == {"none", "mixup", "cutmix"}
    rows = A.encode_views(records, recipe)
    specs = {s.name: s for s in A.cache_arrays(recipe, [], 4)}
    for name in A.VIEW_MIX_ARRAYS:
        assert rows[name].dtype == np.dtype(specs[name].dtype)
        assert rows[name].shape[1:] == specs[name].inner
        assert (rows[name][5] == specs[name].fill).all()  # an empty row holds the fill value
    for i, r in enumerate(records):
        if r is not None:
            back = A.decode_view(rows, i)
            assert back == r and back.model_dump_json() == r.model_dump_json()
            # and from one sample's rows, as the trainer reads them
            assert A.decode_view({n: v[i] for n, v in rows.items()}) == r


def test_older_caches_read_as_unmixed():
    plain = ViewRecipe(randaugment=None, erase=None)
    records = [sample_view(plain, tar=0, position=i, view=0, width=SRC_W, height=SRC_H) for i in range(5)]
    rows = A.encode_views(records, plain)
    assert not set(rows) & set(A.VIEW_MIX_ARRAYS)
    assert all(A.decode_view(rows, i).mix is None for i in range(5))


def test_records_and_recipe_must_agree_on_mixing():
    mixed = _recipe(mixup_alpha=1.0)
    plain = ViewRecipe(randaugment=None, erase=None)
    rec = sample_view(mixed, tar=0, position=0, view=0, width=SRC_W, height=SRC_H, count=5)
    with pytest.raises(ValueError, match="does not mix"):
        A.encode_views([rec], plain)
    with pytest.raises(ValueError, match="lacks a mix"):
        A.encode_views([rec.model_copy(update={"mix": None})], mixed)
