"""RandAugment's ops as timm's ``timm.data.auto_augment`` defines them, on torchvision's functional API.

Which ops take a random sign (:data:`SIGNED_OPS`; :func:`pipeline.views.sample_view` draws it and stores it in the
op's magnitude), the argument timm derives from a magnitude (:func:`op_argument`) and the op itself on a PIL image
(:func:`apply_op`). Written out rather than calling timm's ``AugmentOp``: timm draws the sign and the magnitude's
noise inside the op, where a cached view must replay a stored one; the arguments and the images they give are
checked against timm's own level functions and ops in ``tests/pipeline/test_views.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from storage_schemas.views import RandAugmentRecipe

__all__ = ["SIGNED_OPS", "apply_op", "op_argument"]

_LEVEL_DENOM = 10.0  # timm's magnitude scale: level = magnitude / 10

# Ops whose argument timm negates with probability 1/2 (``_randomly_negate``). Here the
# sign is drawn at sampling time and carried by the stored magnitude.
SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})


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


def apply_op(img: Image.Image, name: str, magnitude: float, recipe: RandAugmentRecipe,
             interpolation: InterpolationMode) -> Image.Image:
    """The RandAugment op ``name`` at its stored (signed) ``magnitude`` on ``img``: timm's ``AugmentOp`` with
    ``prob`` already decided, its geometric ops at ``interpolation`` (timm's RandAugment uses the training
    interpolation for them too) and ``recipe.fill``."""
    args = op_argument(name, magnitude, recipe)
    return _OPS[name](img, args[0] if args else None, interpolation, list(recipe.fill))
