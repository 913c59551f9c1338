"""View sampling and replay, checked against torchvision and timm computed independently.

(About 440 lines: one statistical or op-by-op comparison per augmentation, each against its own reference;
splitting them would scatter what one reader checks against timm.)
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from pipeline.randaugment import op_argument
from pipeline.views import apply_view, eval_view, sample_view
from storage_schemas.arrays import decode_view, encode_views
from storage_schemas.views import (
    RAND_OPS,
    EraseRecipe,
    OpRecord,
    RandAugmentRecipe,
    ViewRecipe,
    ViewRecord,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SRC_W, SRC_H = 500, 375
# Crop + flip only: the parts of a view that must be resolution independent pixel for pixel.
PLAIN = ViewRecipe(randaugment=None, erase=None)
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
          "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _image(width: int, height: int, noise: float = 20.0, amp: float = 100.0, seed: int = 0) -> Image.Image:
    """A smooth colour pattern plus optional noise: natural-ish histograms for the colour ops."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    chans = [128 + amp * np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in range(3)]
    arr = np.stack(chans, -1) + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draws(recipe: ViewRecipe, n: int, width: int = SRC_W, height: int = SRC_H) -> list[ViewRecord]:
    return [sample_view(recipe, tar=i % 7, position=i // 7, view=i % 3, width=width, height=height)
            for i in range(n)]


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


def _norm(img: Image.Image) -> torch.Tensor:
    return F.normalize(F.to_tensor(img), MEAN, STD)


def _timm_arg(name: str, magnitude: float, ra: RandAugmentRecipe, monkeypatch) -> tuple:
    """timm's level->arg, with its coin for the sign forced to the sign of ``magnitude``."""
    # timm negates when random.random() > 0.5
    monkeypatch.setattr(timm_aa.random, "random", lambda: 1.0 if magnitude < 0 else 0.0)
    fn = timm_aa.LEVEL_TO_ARG[name]
    hparams = {"translate_pct": ra.translate_pct, "img_mean": ra.fill, "translate_const": 100}
    return fn(abs(magnitude), hparams) if fn is not None else ()


# --- determinism --------------------------------------------------------------------------


def test_same_key_gives_identical_record():
    recipe = ViewRecipe(seed=3, erase=EraseRecipe(prob=1.0, max_count=3))
    for tar, position, view in [(0, 0, 0), (5, 1234, 3), (1023, 9, 7)]:
        kw = dict(tar=tar, position=position, view=view, width=SRC_W, height=SRC_H)
        a, b = sample_view(recipe, **kw), sample_view(recipe, **kw)
        assert a == b
        assert a.model_dump_json() == b.model_dump_json()


def test_different_keys_give_different_records():
    recipe = ViewRecipe()
    views = [sample_view(recipe, tar=2, position=17, view=v, width=SRC_W, height=SRC_H) for v in range(500)]
    assert len({r.model_dump_json() for r in views}) == len(views)
    # neighbouring keys are unrelated streams, not shifted copies
    crops = [sample_view(recipe, tar=0, position=p, view=0, width=SRC_W, height=SRC_H).crop
             for p in range(200)]
    assert len(set(crops)) >= 198
    other_seed = ViewRecipe(seed=1)
    assert sample_view(other_seed, tar=2, position=17, view=0, width=SRC_W, height=SRC_H) != views[0]


def test_record_floats_are_float32_exact():
    recipe = ViewRecipe(erase=EraseRecipe(prob=1.0, max_count=3), randaugment="rand-m9-mstd0.5-inc1-p1")
    for r in _draws(recipe, 300):
        floats = [*r.crop, *(op.magnitude for op in r.ops), *(x for box in r.erase for x in box)]
        assert all(float(np.float32(x)) == x for x in floats), r


# --- crop ---------------------------------------------------------------------------------


def _pixel_box(crop: tuple, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, w, h = crop
    return round(x0 * width), round(y0 * height), round(w * width), round(h * height)


@pytest.mark.parametrize("scale,ratio_range", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.6), (1.0, 2.0))])
def test_crop_statistics_match_torchvision(scale, ratio_range):
    recipe = ViewRecipe(randaugment=None, erase=None, crop={"scale": scale, "ratio": ratio_range})
    ours = np.array([_pixel_box(r.crop, SRC_W, SRC_H) for r in _draws(recipe, 2000)], float)
    left, top, w, h = ours.T
    # the fractions are exact pixel boxes of the source image
    for r in _draws(recipe, 200):
        px = np.array(r.crop) * [SRC_W, SRC_H, SRC_W, SRC_H]
        assert np.abs(px - np.round(px)).max() < 1e-3
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= SRC_W).all() and (top + h <= SRC_H).all()
    area = w * h / (SRC_W * SRC_H)
    ratio = w / h
    # pixel rounding moves area and ratio by ~1/side, hence the small slack
    assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1] * 1.03
    assert ratio.min() >= ratio_range[0] * 0.98 and ratio.max() <= ratio_range[1] * 1.02

    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, SRC_H, SRC_W), list(scale), list(ratio_range))
                    for _ in range(2000)], float)
    r_top, r_left, r_h, r_w = ref.T
    # 2000 vs 2000 samples: the KS statistic of equal distributions is < 0.06 at p=0.001
    assert _ks(area, r_w * r_h / (SRC_W * SRC_H)) < 0.06
    assert _ks(np.log(ratio), np.log(r_w / r_h)) < 0.06
    assert _ks((left + w / 2) / SRC_W, (r_left + r_w / 2) / SRC_W) < 0.06
    assert _ks((top + h / 2) / SRC_H, (r_top + r_h / 2) / SRC_H) < 0.06


def test_flip_rate():
    for p in (0.0, 0.5, 0.8):
        flips = [r.flip for r in _draws(ViewRecipe(hflip=p, randaugment=None, erase=None), 2000)]
        assert abs(np.mean(flips) - p) < 0.035


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000), (40, 41)])
def test_crop_fallback_matches_torchvision(width, height):
    # scale (0.95, 1) with ratio (2, 3) never fits a near-square image; 1000x10 never fits any
    recipe = ViewRecipe(randaugment=None, erase=None, crop={"scale": (0.95, 1.0), "ratio": (2.0, 3.0)})
    torch.manual_seed(0)
    expected = RandomResizedCrop.get_params(torch.empty(3, height, width), [0.95, 1.0], [2.0, 3.0])
    r = sample_view(recipe, tar=0, position=0, view=0, width=width, height=height)
    left, top, w, h = _pixel_box(r.crop, width, height)
    if (width, height) == (40, 41):
        assert (w, h) == (40, 20)  # centre crop at the clamped ratio 2
    assert (top, left, h, w) == expected


def test_crop_replay_equals_torchvision_resized_crop():
    img = _image(333, 250)
    recipe = ViewRecipe(randaugment=None, erase=None, hflip=0.0)
    for size, out_hw in [(64, [64, 64]), ((48, 80), [48, 80])]:
        for r in _draws(recipe, 20, width=333, height=250):
            left, top, w, h = _pixel_box(r.crop, 333, 250)
            ref = F.resized_crop(img, top, left, h, w, out_hw, interpolation=InterpolationMode.BICUBIC)
            out = apply_view(img, r, recipe, size=size, mean=MEAN, std=STD)
            assert out.dtype == torch.float32 and list(out.shape) == [3, *out_hw]
            torch.testing.assert_close(out, _norm(ref), rtol=0, atol=0)


def test_flip_replay():
    img = _image(200, 150)
    r = ViewRecord(crop=(0.1, 0.2, 0.5, 0.6), flip=True)
    flipped = apply_view(img, r, PLAIN, size=32, mean=MEAN, std=STD)
    plain = apply_view(img, r.model_copy(update={"flip": False}), PLAIN, size=32, mean=MEAN, std=STD)
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=0)


def _downsampled_gap(img: Image.Image, record: ViewRecord, recipe: ViewRecipe) -> float:
    """Mean |replay at 64 - (replay at 128, downsampled to 64)| in normalised units."""
    small = apply_view(img, record, recipe, size=64, mean=MEAN, std=STD)
    big = apply_view(img, record, recipe, size=128, mean=MEAN, std=STD)
    down = F.resize(big, [64, 64], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return float((small - down).abs().mean())


def test_resolution_independence_crop_and_flip():
    img = _image(480, 360, noise=0.0)
    for r in _draws(PLAIN, 10, width=480, height=360):
        assert _downsampled_gap(img, r, PLAIN) < 0.02
    # a record shifted by a tenth of the image is far from these tolerances: the test can fail
    r = _draws(PLAIN, 1, width=480, height=360)[0]
    x0, y0, w, h = r.crop
    shifted = r.model_copy(update={"crop": (min(x0 + 0.1, 1 - w), y0, w, h) if x0 < 0.5 else (x0 - 0.1, y0, w, h)})
    big = apply_view(img, r, PLAIN, size=128, mean=MEAN, std=STD)
    down = F.resize(big, [64, 64], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert float((apply_view(img, shifted, PLAIN, size=64, mean=MEAN, std=STD) - down).abs().mean()) > 0.1


def test_resolution_independence_geometric_ops_and_erasing():
    img = _image(480, 360, noise=0.0)
    recipe = ViewRecipe(erase=EraseRecipe(mode="const"))
    crop = (0.1, 0.05, 0.7, 0.8)
    for ops in [("Rotate", 8.0), ("ShearX", -6.0), ("ShearY", 5.0), ("TranslateXRel", -7.0), ("TranslateYRel", 9.0)]:
        r = ViewRecord(crop=crop, ops=(OpRecord(name=ops[0], magnitude=ops[1]),), erase=((0.2, 0.3, 0.25, 0.4),))
        assert _downsampled_gap(img, r, recipe) < 0.03, ops


# --- RandAugment --------------------------------------------------------------------------

SIGNLESS = [n for n in RAND_OPS if n not in SIGNED]
MAGNITUDES = [*np.linspace(0, 10, 101).tolist(), *np.float32(np.random.default_rng(0).uniform(0, 10, 50)).tolist()]


@pytest.mark.parametrize("name", SIGNLESS)
def test_op_argument_matches_timm_signless(name, monkeypatch):
    ra = RandAugmentRecipe()
    for m in MAGNITUDES:
        assert op_argument(name, m, ra) == _timm_arg(name, m, ra, monkeypatch), (name, m)


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_op_argument_matches_timm_signed(name, monkeypatch):
    ra = RandAugmentRecipe(translate_pct=0.3)
    for m in MAGNITUDES[1:]:
        for signed in (m, -m):
            assert op_argument(name, signed, ra) == _timm_arg(name, signed, ra, monkeypatch), (name, signed)


@pytest.mark.parametrize("name", RAND_OPS)
def test_applied_op_matches_timm(name, monkeypatch):
    img = _image(64, 48, noise=10.0, amp=50.0)  # not the full 0..255 range: AutoContrast acts
    recipe = ViewRecipe()
    ra = recipe.randaugment
    whole = ViewRecord(crop=(0.0, 0.0, 1.0, 1.0))
    # precondition: the whole-image crop at the source size is the identity
    torch.testing.assert_close(apply_view(img, whole, recipe, size=(48, 64), mean=MEAN, std=STD), _norm(img),
                               rtol=0, atol=0)
    mags = [3.3, 6.0, 9.0] + ([-4.5, -9.7] if name in SIGNED else [])
    if name.startswith("Posterize"):  # timm's posterize raises at 0 bits on Pillow >= 11
        mags = [m for m in mags if op_argument(name, m, ra)[0] > 0]
    changed = []
    for m in mags:
        r = whole.model_copy(update={"ops": (OpRecord(name=name, magnitude=m),)})
        out = apply_view(img, r, recipe, size=(48, 64), mean=MEAN, std=STD)
        ref_img = timm_aa.NAME_TO_OP[name](img, *_timm_arg(name, m, ra, monkeypatch),
                                           fillcolor=ra.fill, resample=Image.BICUBIC)
        if name in GEOMETRIC:
            # torchvision builds the affine matrix from angles: allow last-bit resampling noise
            out_u8 = torch.round((out * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255)
            diff = (out_u8 - F.pil_to_tensor(ref_img).float()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (name, m)
        else:
            torch.testing.assert_close(out, _norm(ref_img), rtol=0, atol=0, msg=f"{name} m={m}")
        changed.append(not torch.equal(out, _norm(img)))
    assert any(changed), name  # the comparison is not vacuous


@pytest.mark.parametrize("name,magnitude", [("Posterize", 1.0), ("PosterizeIncreasing", 10.0)])
def test_posterize_zero_bits_is_black(name, magnitude):
    ra = RandAugmentRecipe()
    assert op_argument(name, magnitude, ra) == (0,)
    img = _image(32, 32)
    r = ViewRecord(crop=(0.0, 0.0, 1.0, 1.0), ops=(OpRecord(name=name, magnitude=magnitude),))
    out = apply_view(img, r, ViewRecipe(), size=32, mean=MEAN, std=STD)
    torch.testing.assert_close(out, _norm(Image.new("RGB", (32, 32))), rtol=0, atol=0)


def test_magnitude_fire_rate_and_sign_distribution():
    recipe = ViewRecipe(randaugment="rand-m9-n2-mstd0.5-inc1", erase=None)
    records = _draws(recipe, 4000)
    ops = [op for r in records for op in r.ops]
    assert abs(len(ops) / (2 * len(records)) - 0.5) < 0.02  # fire rate = prob
    mags = np.array([abs(op.magnitude) for op in ops])
    # N(9, 0.5) clipped to [0, 10]: mean 8.996, std 0.49
    assert abs(mags.mean() - 9.0) < 0.03 and abs(mags.std() - 0.5) < 0.03
    assert mags.max() <= 10.0 and (mags == 10.0).any()  # clipped at magnitude_max
    signed = [op.magnitude < 0 for op in ops if op.name in SIGNED]
    assert abs(np.mean(signed) - 0.5) < 0.03
    assert all(op.magnitude >= 0 for op in ops if op.name not in SIGNED)


def test_ops_drawn_uniformly_with_replacement():
    recipe = ViewRecipe(randaugment={"num_ops": 2, "prob": 1.0, "increasing": False}, erase=None)
    records = _draws(recipe, 3000)
    assert all(len(r.ops) == 2 for r in records)  # prob 1: every op fires
    names = [op.name for r in records for op in r.ops]
    assert set(names) == set(recipe.randaugment.op_names)
    freq = np.array([names.count(n) for n in recipe.randaugment.op_names]) / len(names)
    assert np.abs(freq - 1 / 15).max() < 0.015
    repeats = np.mean([r.ops[0].name == r.ops[1].name for r in records])
    assert abs(repeats - 1 / 15) < 0.02  # with replacement; without it this would be 0


def test_magnitude_std_zero_and_inf():
    fixed = _draws(ViewRecipe(randaugment={"magnitude": 7, "magnitude_std": 0, "prob": 1.0}, erase=None), 300)
    assert {abs(op.magnitude) for r in fixed for op in r.ops} == {7.0}
    uni = _draws(ViewRecipe(randaugment={"magnitude": 8, "magnitude_std": math.inf, "prob": 1.0}, erase=None), 2000)
    mags = np.array([abs(op.magnitude) for r in uni for op in r.ops])
    assert mags.min() >= 0 and mags.max() <= 8
    assert abs(mags.mean() - 4.0) < 0.1 and abs(mags.std() - 8 / math.sqrt(12)) < 0.1


# --- storage round trip -------------------------------------------------------------------


def test_records_round_trip_through_arrays():
    recipe = ViewRecipe(randaugment="rand-m9-n3-mstd0.5-inc1", erase=EraseRecipe(prob=0.7, max_count=3))
    records: list[ViewRecord | None] = list(_draws(recipe, 300))
    records[5] = records[77] = None
    assert any(r.ops for r in records if r) and any(len(r.erase) > 1 for r in records if r)
    rows = encode_views(records, recipe)
    for i, r in enumerate(records):
        if r is not None:
            assert decode_view(rows, i) == r
    # and the replay of a decoded record is the replay of the original
    img = _image(120, 90)
    for i in (0, 1, 2):
        r = records[i]
        torch.testing.assert_close(apply_view(img, decode_view(rows, i), recipe, size=32, mean=MEAN, std=STD),
                                   apply_view(img, r, recipe, size=32, mean=MEAN, std=STD), rtol=0, atol=0)


# --- erasing ------------------------------------------------------------------------------


def test_erase_sampling_statistics():
    er = EraseRecipe(prob=0.25, min_count=1, max_count=3)
    records = _draws(ViewRecipe(randaugment=None, erase=er), 4000)
    erased = [r for r in records if r.erase]
    assert abs(len(erased) / len(records) - 0.25) < 0.025
    assert {len(r.erase) for r in erased} <= {1, 2, 3}
    assert len({r.noise_seed for r in erased}) > 0.99 * len(erased)  # pixel mode: a seed per erased view
    for r in erased:
        for x0, y0, w, h in r.erase:
            assert 0 <= x0 and 0 <= y0 and 0 < w < 1 and 0 < h < 1
            assert x0 + w <= 1 + 1e-6 and y0 + h <= 1 + 1e-6
            # per-box area is U(min, max) / count; count >= len(boxes) (attempts can fail)
            assert w * h <= er.max_area * (1 + 1e-5) / len(r.erase)
            assert w * h >= er.min_area * (1 - 1e-5) / 3
            assert er.min_aspect * (1 - 1e-5) <= h / w <= (1 + 1e-5) / er.min_aspect
    assert all(r.noise_seed == 0 for r in records if not r.erase)


class _BoxRecorder:
    """Stands in for timm's image tensor: records the slices timm's erasing writes to."""

    def __init__(self) -> None:
        self.slices: list[tuple] = []

    def __setitem__(self, key: tuple, value: torch.Tensor) -> None:
        self.slices.append(key)


def test_erase_box_distribution_matches_timm():
    n, side = 1500, 1000  # a large side keeps timm's pixel rounding out of the comparison
    random.seed(0)
    timm_erase = RandomErasing(probability=1.0, mode="const", device="cpu")
    ref_area, ref_aspect, ref_cx, ref_cy = [], [], [], []
    for _ in range(n):
        rec = _BoxRecorder()
        timm_erase._erase(rec, 1, side, side, torch.float32)  # timm's own sampling code
        for _, rows, cols in rec.slices:
            h, w = rows.stop - rows.start, cols.stop - cols.start
            ref_area.append(h * w / side**2)
            ref_aspect.append(math.log(h / w))
            ref_cx.append((cols.start + w / 2) / side)
            ref_cy.append((rows.start + h / 2) / side)
    boxes = [box for r in _draws(ViewRecipe(randaugment=None, erase=EraseRecipe(prob=1.0)), n) for box in r.erase]
    area = np.array([w * h for _, _, w, h in boxes])
    aspect = np.array([math.log(h / w) for _, _, w, h in boxes])
    assert len(boxes) > 0.95 * n and len(ref_area) > 0.95 * n
    assert _ks(area, np.array(ref_area)) < 0.07
    assert _ks(aspect, np.array(ref_aspect)) < 0.07
    assert _ks(np.array([x0 + w / 2 for x0, _, w, _ in boxes]), np.array(ref_cx)) < 0.07
    assert _ks(np.array([y0 + h / 2 for _, y0, _, h in boxes]), np.array(ref_cy)) < 0.07


def test_erase_pixel_noise_reproducible_from_seed():
    img = _image(100, 80)
    recipe = ViewRecipe(randaugment=None, erase=EraseRecipe(mode="pixel"))
    box = (0.25, 0.5, 0.5, 0.25)
    r = ViewRecord(crop=(0.0, 0.0, 1.0, 1.0), erase=(box,), noise_seed=123456789)
    out = apply_view(img, r, recipe, size=(40, 64), mean=MEAN, std=STD)
    torch.testing.assert_close(out, apply_view(img, r, recipe, size=(40, 64), mean=MEAN, std=STD), rtol=0, atol=0)
    # independent: box (0.25, 0.5, 0.5, 0.25) at 64x40 is columns 16..48, rows 20..30
    noise = torch.randn((3, 10, 32), generator=torch.Generator().manual_seed(123456789))
    torch.testing.assert_close(out[:, 20:30, 16:48], noise, rtol=0, atol=0)
    clean = apply_view(img, r.model_copy(update={"erase": ()}), recipe, size=(40, 64), mean=MEAN, std=STD)
    outside = torch.ones(40, 64, dtype=torch.bool)
    outside[20:30, 16:48] = False
    torch.testing.assert_close(out[:, outside], clean[:, outside], rtol=0, atol=0)
    other = apply_view(img, r.model_copy(update={"noise_seed": 7}), recipe, size=(40, 64), mean=MEAN, std=STD)
    assert not torch.equal(other[:, 20:30, 16:48], noise)
    # 'rand' mode: one N(0,1) colour per channel from the same generator
    rand = apply_view(img, r, recipe.model_copy(update={"erase": EraseRecipe(mode="rand")}),
                      size=(40, 64), mean=MEAN, std=STD)
    colour = torch.randn((3, 1, 1), generator=torch.Generator().manual_seed(123456789))
    torch.testing.assert_close(rand[:, 20:30, 16:48], colour.expand(3, 10, 32), rtol=0, atol=0)


@pytest.mark.parametrize("size", [224, (100, 150), (31, 17)])
def test_erased_region_at_output_resolution(size):
    white = Image.new("RGB", (90, 70), (255, 255, 255))  # normalises to > 0: erased pixels are the zeros
    recipe = ViewRecipe(randaugment=None, erase=EraseRecipe(prob=1.0, mode="const", max_count=2))
    out_h, out_w = (size, size) if isinstance(size, int) else size
    for r in _draws(recipe, 30, width=90, height=70):
        out = apply_view(white, r, recipe, size=size, mean=MEAN, std=STD)
        mask = (out == 0).all(0)
        expected = torch.zeros(out_h, out_w, dtype=torch.bool)
        for x0, y0, w, h in r.erase:
            expected[round(y0 * out_h):round(y0 * out_h) + round(h * out_h),
                     round(x0 * out_w):round(x0 * out_w) + round(w * out_w)] = True
        assert torch.equal(mask, expected)
        if len(r.erase) == 1:
            x0, y0, w, h = r.erase[0]
            # the erased pixel count is the box's area at this resolution, up to edge rounding
            assert abs(int(mask.sum()) - w * h * out_w * out_h) <= w * out_w + h * out_h + 1


def test_replay_without_recipe_parts_fails_loudly():
    img = _image(40, 30)
    with pytest.raises(ValueError, match="randaugment"):
        apply_view(img, ViewRecord(crop=(0, 0, 1, 1), ops=(OpRecord(name="Invert", magnitude=1.0),)),
                   PLAIN, size=16, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="erase"):
        apply_view(img, ViewRecord(crop=(0, 0, 1, 1), erase=((0.1, 0.1, 0.2, 0.2),)),
                   PLAIN, size=16, mean=MEAN, std=STD)


# --- evaluation ---------------------------------------------------------------------------


@pytest.mark.parametrize("size,src", [(64, (150, 100)), (64, (90, 160)), ((48, 64), (150, 100)), ((64, 40), (77, 120))])
def test_eval_view_matches_timm(size, src):
    img = _image(*src)
    hw = (size, size) if isinstance(size, int) else size
    ref = create_transform(input_size=(3, *hw), is_training=False, crop_pct=0.9, interpolation="bicubic",
                           mean=MEAN, std=STD)(img)
    out = eval_view(img, size=size, mean=MEAN, std=STD, crop_pct=0.9)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
