"""View sampling and replay: timm's training augmentation, split into data and application.

:func:`sample_view` draws a :class:`~storage_schemas.views.ViewRecord` from a generator
seeded by ``(recipe seed, tar, position, view)``; :func:`apply_view` turns a record
into the network input, deterministically and at any output resolution. Together they
reproduce timm's ``create_transform(is_training=True)`` pipeline:
RandomResizedCrop → horizontal flip → RandAugment → ToTensor/Normalize → RandomErasing,
with timm's (and torchvision's) parameter distributions and op arguments.

Resolution independence:
- the crop box is sampled in integer pixels of the source image (as torchvision does)
  and stored as fractions of the source size, so replay recovers the exact pixel box;
- RandAugment runs on the output image, as in timm; its only size-dependent op,
  translate, is relative to the output size (timm's ``TranslateXRel``/``YRel``);
- erasing boxes are sampled in fractions of a unit square (see :func:`sample_view`).
Only the erasing noise is per output pixel, so it cannot be resolution independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from storage_schemas.views import (
    EraseRecipe,
    OpRecord,
    RandAugmentRecipe,
    ViewRecipe,
    ViewRecord,
)

__all__ = ["apply_view", "eval_view", "op_argument", "sample_view"]

_LEVEL_DENOM = 10.0  # timm's magnitude scale: level = magnitude / 10

# Ops whose argument timm negates with probability 1/2 (``_randomly_negate``). Here the
# sign is drawn at sampling time and carried by the stored magnitude.
_SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _f32(x: float) -> float:
    # Records are stored as float32; rounding here makes the stored value *the* value, so a
    # replayed record equals the sampled one bit for bit.
    return float(np.float32(x))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or an ``(H, W)`` tuple."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# --- sampling -----------------------------------------------------------------------------


def _sample_crop(rng: np.random.Generator, recipe: ViewRecipe, width: int, height: int) -> tuple:
    """torchvision ``RandomResizedCrop.get_params`` on a ``width x height`` image → fractions."""
    scale, ratio = recipe.crop.scale, recipe.crop.ratio
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # no attempt fitted: centre crop at the ratio clamped into range
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    # Integer pixel box as fractions: replay at the source size recovers it exactly, since
    # float32's relative error (6e-8) times any image side is far below half a pixel.
    return (_f32(left / width), _f32(top / height), _f32(w / width), _f32(h / height))


def _sample_ops(rng: np.random.Generator, ra: RandAugmentRecipe) -> tuple[OpRecord, ...]:
    """timm ``RandAugment`` + ``AugmentOp``: ops with replacement, each firing with ``prob``."""
    names = ra.op_names
    ops = []
    for idx in rng.integers(0, len(names), size=ra.num_ops):  # uniform, with replacement
        name = names[int(idx)]
        if ra.prob < 1.0 and rng.random() > ra.prob:  # timm's test, so prob=1 always fires
            continue
        m = ra.magnitude
        if ra.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif ra.magnitude_std > 0:
            m = rng.normal(m, ra.magnitude_std)
        m = max(0.0, min(float(m), ra.magnitude_max))
        # the sign is applied after clipping, like timm negates the level-fn output
        if name in _SIGNED_OPS and rng.random() < 0.5 and m > 0:
            m = -m
        ops.append(OpRecord(name=name, magnitude=_f32(m)))
    return tuple(ops)


def _sample_erase(rng: np.random.Generator, er: EraseRecipe) -> tuple:
    """timm ``RandomErasing._erase`` on a unit square: boxes ``(x0, y0, w, h)`` in fractions."""
    if rng.random() > er.prob:
        return ()
    count = er.min_count if er.min_count == er.max_count else int(rng.integers(er.min_count, er.max_count + 1))
    max_aspect = er.max_aspect or 1 / er.min_aspect
    log_aspect = (math.log(er.min_aspect), math.log(max_aspect))
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            # timm: target_area = U(min, max) * H*W / count in pixels; on a unit square the
            # area *is* the fraction, so the box does not depend on the output size.
            target_area = rng.uniform(er.min_area, er.max_area) / count
            aspect = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
            h = math.sqrt(target_area * aspect)
            w = math.sqrt(target_area / aspect)
            if w < 1 and h < 1:
                top = rng.uniform(0.0, 1.0 - h)
                left = rng.uniform(0.0, 1.0 - w)
                boxes.append((_f32(left), _f32(top), _f32(w), _f32(h)))
                break
    return tuple(boxes)


def sample_view(
    recipe: ViewRecipe, *, tar: int, position: int, view: int, width: int, height: int
) -> ViewRecord:
    """Sample view ``view`` of sample ``(tar, position)`` whose source image is ``width x height``.

    Pure function of its arguments: any worker, any time, gets the same record. The crop
    follows torchvision's ``RandomResizedCrop.get_params`` in source pixels; RandAugment
    and RandomErasing follow timm. Erasing boxes are fractions of the *output* image,
    sampled on a unit square (timm samples them in output pixels, which are unknown here);
    up to pixel rounding this is the same distribution at every output size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"tar {tar} position {position}: image size {width}x{height} is empty")
    # SeedSequence mixes all four words: neighbouring keys give unrelated streams.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([recipe.seed, tar, position, view])))
    crop = _sample_crop(rng, recipe, width, height)
    flip = bool(rng.random() < recipe.hflip)
    ops = _sample_ops(rng, recipe.randaugment) if recipe.randaugment else ()
    erase = _sample_erase(rng, recipe.erase) if recipe.erase else ()
    # Noise is only needed for non-constant fills; a zero seed otherwise keeps rows compressible.
    noise_seed = int(rng.integers(0, 2**32)) if erase and recipe.erase.mode != "const" else 0
    return ViewRecord(crop=crop, flip=flip, ops=ops, erase=erase, noise_seed=noise_seed)


# --- application --------------------------------------------------------------------------


def op_argument(name: str, magnitude: float, recipe: RandAugmentRecipe) -> tuple:
    """timm's ``LEVEL_TO_ARG[name](|magnitude|, hparams)`` with the stored sign applied.

    Returns timm's argument tuple: ``()`` for argument-free ops, else a 1-tuple. Written
    out rather than calling timm's level functions because those draw the sign themselves.
    """
    level = abs(magnitude) / _LEVEL_DENOM
    neg = magnitude < 0

    def signed(v: float) -> float:
        return -v if neg else v

    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (signed(level * 30.0),)
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = int(level * 4)
        return (bits if name == "Posterize" else 4 - bits,)
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = min(256, int(level * 256))
        return (thresh if name == "Solarize" else 256 - thresh,)
    if name == "SolarizeAdd":
        return (min(128, int(level * 110)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (max(0.1, 1.0 + signed(level * 0.9)),)
    if name in ("ShearX", "ShearY"):
        return (signed(level * 0.3),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (signed(level * recipe.translate_pct),)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    # torchvision has no SolarizeAdd (it is timm/TF-EfficientNet specific): add ``add`` to
    # pixels below ``thresh``, saturating at 255, via a lookup table like timm.
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    # Keeping 0 bits (Posterize at magnitude < 2.5, PosterizeIncreasing at 10) means a black
    # image, as in TF and Pillow < 11. Pillow >= 11 rejects bits=0, and with it timm's own
    # posterize raises there, so that case is done here instead of by torchvision.
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return F.posterize(img, bits)


def _affine(img: Image.Image, interp: InterpolationMode, fill: list[int], *,
            translate: tuple[float, float] = (0.0, 0.0), shear: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    # timm shears/translates about the top-left corner (PIL's affine origin), so pin
    # torchvision's centre there; torchvision's shear is an angle where timm's is tan(angle),
    # and its translate moves content where timm's matrix offset samples from (x + t).
    return F.affine(img, angle=0.0, translate=[-translate[0], -translate[1]], scale=1.0,
                    shear=[math.degrees(math.atan(shear[0])), math.degrees(math.atan(shear[1]))],
                    interpolation=interp, fill=fill, center=[0, 0])


# name -> (img, arg | None, interpolation, fill) -> img: torchvision equivalents of timm's NAME_TO_OP
_OpFn = Callable[[Image.Image, float | None, InterpolationMode, list[int]], Image.Image]
_OPS: dict[str, _OpFn] = {
    "AutoContrast": lambda img, a, i, f: F.autocontrast(img),
    "Equalize": lambda img, a, i, f: F.equalize(img),
    "Invert": lambda img, a, i, f: F.invert(img),
    "Rotate": lambda img, a, i, f: F.rotate(img, a, interpolation=i, fill=f),
    "Posterize": lambda img, a, i, f: _posterize(img, a),
    "Solarize": lambda img, a, i, f: F.solarize(img, a),
    "SolarizeAdd": lambda img, a, i, f: _solarize_add(img, a),
    "Color": lambda img, a, i, f: F.adjust_saturation(img, a),
    "Contrast": lambda img, a, i, f: F.adjust_contrast(img, a),
    "Brightness": lambda img, a, i, f: F.adjust_brightness(img, a),
    "Sharpness": lambda img, a, i, f: F.adjust_sharpness(img, a),
    "ShearX": lambda img, a, i, f: _affine(img, i, f, shear=(a, 0.0)),
    "ShearY": lambda img, a, i, f: _affine(img, i, f, shear=(0.0, a)),
    "TranslateXRel": lambda img, a, i, f: _affine(img, i, f, translate=(a * img.width, 0.0)),
    "TranslateYRel": lambda img, a, i, f: _affine(img, i, f, translate=(0.0, a * img.height)),
}
for _name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    _OPS[f"{_name}Increasing"] = _OPS[_name]


def _to_pixels(box: tuple[float, float, float, float], width: int, height: int, min_size: int) -> tuple:
    """Fractional ``(x0, y0, w, h)`` → integer ``(left, top, w, h)`` clamped inside the image."""
    x0, y0, bw, bh = box
    left = min(max(int(round(x0 * width)), 0), width - min_size)
    top = min(max(int(round(y0 * height)), 0), height - min_size)
    w = min(max(int(round(bw * width)), min_size), width - left)
    h = min(max(int(round(bh * height)), min_size), height - top)
    return left, top, w, h


def apply_view(
    img: Image.Image,
    record: ViewRecord,
    recipe: ViewRecipe,
    *,
    size: int | tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """Replay ``record`` on ``img``: a normalised float32 tensor ``[3, H, W]``, ``size`` = ``(H, W)`` or square.

    Deterministic; ``recipe`` supplies what records do not store (interpolation,
    RandAugment fill and translate range, erasing fill mode).
    """
    out_h, out_w = _pair(size)
    if img.mode != "RGB":
        img = img.convert("RGB")
    interp = _INTERPOLATION[recipe.crop.interpolation]
    left, top, w, h = _to_pixels(record.crop, img.width, img.height, min_size=1)
    img = F.resized_crop(img, top, left, h, w, [out_h, out_w], interpolation=interp, antialias=True)
    if record.flip:
        img = F.hflip(img)
    if record.ops:
        ra = recipe.randaugment
        if ra is None:
            raise ValueError(f"view record has RandAugment ops {record.ops} but the recipe has no randaugment")
        fill = list(ra.fill)
        for op in record.ops:
            # timm's RA uses the training interpolation for its geometric ops too
            args = op_argument(op.name, op.magnitude, ra)
            img = _OPS[op.name](img, args[0] if args else None, interp, fill)
    x = F.normalize(F.to_tensor(img), mean, std)
    if record.erase:
        if recipe.erase is None:
            raise ValueError(f"view record has erase boxes {record.erase} but the recipe has no erase")
        _erase(x, record, recipe.erase.mode)
    return x


def _erase(x: torch.Tensor, record: ViewRecord, mode: str) -> None:
    """timm ``RandomErasing`` fills, in place on normalised ``x`` ``[C, H, W]``."""
    c, height, width = x.shape
    # One generator per view, boxes drawn in order: the same noise on any worker.
    gen = torch.Generator().manual_seed(record.noise_seed)
    for box in record.erase:
        # min_size 0: a box thinner than half a pixel at this resolution erases nothing,
        # as timm's rounding does.
        left, top, w, h = _to_pixels(box, width, height, min_size=0)
        if mode == "pixel":
            fill = torch.randn((c, h, w), generator=gen, dtype=x.dtype)
        elif mode == "rand":
            fill = torch.randn((c, 1, 1), generator=gen, dtype=x.dtype)
        else:
            fill = torch.zeros((c, 1, 1), dtype=x.dtype)
        x[:, top:top + h, left:left + w] = fill


def eval_view(
    img: Image.Image,
    *,
    size: int | tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """timm's evaluation transform (``crop_mode='center'``): float32 ``[3, H, W]``, normalised.

    Resize so the image covers ``floor(size / crop_pct)`` keeping its aspect ratio, then
    centre-crop ``size``.
    """
    out_h, out_w = _pair(size)
    interp = _INTERPOLATION[interpolation]
    if img.mode != "RGB":
        img = img.convert("RGB")
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if scale_h == scale_w:
        img = F.resize(img, scale_h, interpolation=interp, antialias=True)  # shorter side
    else:
        # timm's ResizeKeepRatio(longest=0): scale by the smaller of the two ratios
        ratio = min(img.height / scale_h, img.width / scale_w)
        img = F.resize(img, [round(img.height / ratio), round(img.width / ratio)],
                       interpolation=interp, antialias=True)
    img = F.center_crop(img, [out_h, out_w])
    return F.normalize(F.to_tensor(img), mean, std)
