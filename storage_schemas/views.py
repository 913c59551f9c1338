"""The view recipe (how views are sampled) and the view record (one sampled view).

A view is data, not randomness: for each (sample, view index) a :class:`ViewRecord` is
sampled once and stored, so that the teacher at caching time and the student at any
later time, at any resolution, apply the very same augmentation. Field semantics follow
timm's ``create_transform`` training pipeline: RandomResizedCrop → horizontal flip →
RandAugment (timm's op set and magnitude semantics) → normalise → RandomErasing, then
optionally timm's ``Mixup``/CutMix with a partner sample of the same tar (:class:`MixRecipe`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# RandAugment op names as timm spells them (timm.data.auto_augment). The position of a
# name in this tuple is its code in the ``view_ops`` array: this order is part of the
# storage contract, append only.
RAND_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
)
# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS: the op set a recipe draws from.
RAND_OPS_DEFAULT: tuple[str, ...] = RAND_OPS[:15]
RAND_OPS_INCREASING: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
NO_OP = -1  # code for an unused op slot in ``view_ops``
# Mix modes; the position of a name is its code in the ``view_mix_mode`` array (storage contract, append only).
MIX_MODES: tuple[str, ...] = ("none", "mixup", "cutmix")
NO_PARTNER = -1  # ``MixRecord.partner`` of an unmixed view


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CropRecipe(_Strict):
    """RandomResizedCrop parameters (torchvision/timm semantics)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"expected 0 < low <= high, got {list(v)}")
        return v


class RandAugmentRecipe(_Strict):
    """timm RandAugment: ``num_ops`` ops drawn with replacement, each applied with ``prob``.

    ``magnitude`` is on timm's 0..10 scale; with ``magnitude_std > 0`` each op draws its
    magnitude from N(magnitude, std) (``inf``: uniform in [0, magnitude]), clipped to
    [0, magnitude_max]. ``increasing`` selects timm's "inc1" op variants.
    """

    num_ops: int = Field(2, ge=0, le=8)
    magnitude: float = Field(9.0, ge=0)
    magnitude_std: float = Field(0.5, ge=0)
    magnitude_max: float = Field(10.0, gt=0)
    increasing: bool = True
    prob: float = Field(0.5, ge=0, le=1)
    translate_pct: float = Field(0.45, ge=0, le=1)
    fill: tuple[int, int, int] = (124, 116, 104)  # timm's _FILL (ImageNet mean in uint8)

    @classmethod
    def from_timm_string(cls, config_str: str) -> RandAugmentRecipe:
        """Parse timm's ``rand-m9-mstd0.5-inc1`` style strings (n, m, mstd, mmax, inc, p)."""
        parts = config_str.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment string must start with 'rand-', got {config_str!r}")
        kw: dict = {"increasing": False}
        keys = {"n": "num_ops", "m": "magnitude", "mstd": "magnitude_std", "mmax": "magnitude_max",
                "inc": "increasing", "p": "prob"}
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)([\d.]+|inf)", part)
            if not m or m.group(1) not in keys:
                raise ValueError(
                    f"unknown RandAugment option {part!r} in {config_str!r}; known: {sorted(keys)}"
                )
            key, val = keys[m.group(1)], m.group(2)
            kw[key] = bool(int(val)) if key == "increasing" else (int(val) if key == "num_ops" else float(val))
        return cls(**kw)

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_OPS_INCREASING if self.increasing else RAND_OPS_DEFAULT


class EraseRecipe(_Strict):
    """timm RandomErasing: with ``prob``, erase 1..max_count boxes of the normalised image."""

    prob: float = Field(0.25, ge=0, le=1)
    mode: Literal["const", "rand", "pixel"] = "pixel"
    min_count: int = Field(1, ge=1)
    max_count: int = Field(1, ge=1, le=8)
    min_area: float = Field(0.02, gt=0, le=1)
    max_area: float = Field(1 / 3, gt=0, le=1)
    min_aspect: float = Field(0.3, gt=0)
    max_aspect: float | None = None

    @model_validator(mode="after")
    def _counts(self) -> EraseRecipe:
        if self.min_count > self.max_count:
            raise ValueError(f"min_count {self.min_count} > max_count {self.max_count}")
        if self.min_area > self.max_area:
            raise ValueError(f"min_area {self.min_area} > max_area {self.max_area}")
        return self


class MixRecipe(_Strict):
    """timm ``Mixup`` (``timm.data.mixup``) drawn per view, like its ``mode='elem'``: each view its own λ,
    mode and box. Names and semantics are timm's; the defaults are those of timm's ``train.py`` flags
    (``--mixup 0 --cutmix 0 --mixup-prob 1 --mixup-switch-prob 0.5``), so a recipe names what it mixes, e.g.
    VanillaKD's A2 ``{mixup_alpha: 0.1, cutmix_alpha: 1.0}`` (see /work/shared/reference/methods.md).

    - ``mixup_alpha`` / ``cutmix_alpha``: Beta(α, α) for λ; a mode is active when its α > 0.
    - ``cutmix_minmax``: box sides drawn uniformly in ``[min, max)`` of the image sides instead of from λ;
      as in timm it turns CutMix on with Beta(1, 1) whatever ``cutmix_alpha`` says, and λ is always
      the pasted area's complement.
    - ``prob``: probability that a view is mixed at all; ``switch_prob``: CutMix instead of Mixup when
      both are active.
    - ``correct_lam``: λ of a CutMix view is ``1 - box area`` (the box is clipped by the borders).
    - ``window``: the partner is another sample of the same block of ``window`` positions of the tar (blocks
      ``[k·window, (k+1)·window)``), as timm pairs images within one batch; so the caching job and a student
      streaming the tar hold one block of images at a time, not the whole tar. Part of the cache's identity.
    """

    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)
    correct_lam: bool = True
    window: int = Field(128, ge=2)

    @field_validator("cutmix_minmax")
    @classmethod
    def _minmax(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 <= v[0] < v[1] <= 1):
            raise ValueError(f"cutmix_minmax: expected 0 <= min < max <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _active(self) -> MixRecipe:
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None):
            raise ValueError("views.mix mixes nothing: set mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax "
                             "(or leave views.mix out)")
        return self

    @property
    def cutmix_beta(self) -> float:
        """The α CutMix draws λ with: timm forces 1.0 when ``cutmix_minmax`` is set."""
        return 1.0 if self.cutmix_minmax is not None else self.cutmix_alpha


class ViewRecipe(_Strict):
    """How the views of a cache are sampled. Part of the cache's identity."""

    seed: int = Field(0, ge=0)
    num_views: int = Field(4, ge=1, le=4096)
    crop: CropRecipe = CropRecipe()
    hflip: float = Field(0.5, ge=0, le=1)
    randaugment: RandAugmentRecipe | None = RandAugmentRecipe()
    erase: EraseRecipe | None = EraseRecipe()
    # schema >= 1.6; left out of the dump when off, so unmixed recipes keep their bytes and identities
    mix: MixRecipe | None = Field(None, exclude_if=lambda m: m is None)

    @field_validator("randaugment", mode="before")
    @classmethod
    def _timm_string(cls, v):
        return RandAugmentRecipe.from_timm_string(v) if isinstance(v, str) else v

    @property
    def max_ops(self) -> int:
        return self.randaugment.num_ops if self.randaugment else 0

    @property
    def max_erase(self) -> int:
        return self.erase.max_count if self.erase else 0


class OpRecord(_Strict):
    """One RandAugment op that was applied: timm name and signed magnitude (0..magnitude_max)."""

    name: str
    magnitude: float  # sign carries timm's random negation for signed ops

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in RAND_OPS:
            raise ValueError(f"unknown RandAugment op {v!r}; known: {', '.join(RAND_OPS)}")
        return v


def _check_box(v: tuple[float, float, float, float], what: str, eps: float = 1e-6) -> None:
    x0, y0, w, h = v
    if w < 0 or h < 0 or x0 < -eps or y0 < -eps or x0 + w > 1 + eps or y0 + h > 1 + eps:
        raise ValueError(f"{what} box {list(v)} is not inside the unit square")


class MixRecord(_Strict):
    """How a view is mixed (timm ``Mixup``, one element): resolution independent.

    ``partner`` is the position of the partner sample in the same tar and the same block of ``window`` positions
    (:data:`NO_PARTNER` when unmixed); the
    partner is replayed by its own record of the same view index (``pipeline.views.mix_views``). ``lam`` is
    the applied λ, the weight of this sample's image and label: for CutMix after ``correct_lam``. ``box`` is the
    CutMix box ``(x0, y0, w, h)`` in fractions of the output image, pasted from the partner (zeros otherwise).
    """

    partner: int = Field(NO_PARTNER, ge=NO_PARTNER)
    mode: Literal["none", "mixup", "cutmix"] = "none"
    lam: float = Field(1.0, ge=0, le=1)
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @model_validator(mode="after")
    def _consistent(self) -> MixRecord:
        zero_box = self.box == (0.0, 0.0, 0.0, 0.0)
        if self.mode == "none" and (self.partner != NO_PARTNER or self.lam != 1.0 or not zero_box):
            raise ValueError(f"unmixed view with partner {self.partner}, lam {self.lam}, box {list(self.box)}")
        if self.mode != "none" and self.partner == NO_PARTNER:
            raise ValueError(f"{self.mode} view without a partner")
        if self.mode == "mixup" and not zero_box:
            raise ValueError(f"mixup view with a box {list(self.box)}")
        if self.mode == "cutmix":
            _check_box(self.box, "cutmix")
        return self


class ViewRecord(_Strict):
    """One sampled view, resolution independent.

    ``crop`` and ``erase`` boxes are ``(x0, y0, w, h)`` as fractions of the image they
    apply to (the source image for the crop, the output image for erasing). ``ops`` lists
    only the RandAugment ops that fired, in order. ``noise_seed`` seeds erasing noise.
    ``mix`` is set when the recipe mixes (``mode`` ``none`` for a view that drew no mixing).
    """

    crop: tuple[float, float, float, float]
    flip: bool = False
    ops: tuple[OpRecord, ...] = ()
    erase: tuple[tuple[float, float, float, float], ...] = ()
    noise_seed: int = Field(0, ge=0, lt=2**32)
    mix: MixRecord | None = Field(None, exclude_if=lambda m: m is None)  # schema >= 1.6

    @field_validator("crop")
    @classmethod
    def _crop_inside(cls, v):
        x0, y0, w, h = v
        eps = 1e-6
        if w <= 0 or h <= 0 or x0 < -eps or y0 < -eps or x0 + w > 1 + eps or y0 + h > 1 + eps:
            raise ValueError(f"crop box {list(v)} is not inside the unit square")
        return v
