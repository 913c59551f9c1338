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

Mixed views (timm's ``Mixup``/CutMix, ``timm.data.mixup``): :func:`sample_mix` draws a view's λ, mode,
CutMix box (fractions of a unit square, like erasing) and partner sample of the same tar and block of
``views.mix.window`` positions (:func:`mix_block`); the caller
replays the sample and its partner with :func:`apply_view` and mixes them with :func:`mix_views`
(:func:`replay_view` does both, for whoever replays a stored record: the trainer, ``verify``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from storage_schemas.views import (
    NO_PARTNER,
    EraseRecipe,
    MixRecipe,
    MixRecord,
    OpRecord,
    RandAugmentRecipe,
    ViewRecipe,
    ViewRecord,
)

from .randaugment import SIGNED_OPS, apply_op

__all__ = ["apply_view", "crop_flip", "erase", "eval_view", "mix_block", "mix_box_pixels", "mix_views", "randaugment",
           "replay_view", "sample_mix", "sample_view"]

_MIX_STREAM = 0x6D6978  # "mix": fifth seed word of a view's mix generator, apart from its view generator

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _f32(x: float) -> float:
    # Records are stored as float32; rounding here makes the stored value *the* value, so a
    # replayed record equals the sampled one bit for bit.
    return float(np.float32(x))


def size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
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
        if name in SIGNED_OPS and rng.random() < 0.5 and m > 0:
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


def _sample_cutmix_box(rng: np.random.Generator, mix: MixRecipe, lam: float) -> tuple:
    """timm ``rand_bbox`` / ``rand_bbox_minmax`` on a unit square: ``(x0, y0, w, h)`` fractions of the output.

    timm samples in output pixels (unknown here): ``rand_bbox`` takes sides ``int(H·sqrt(1-λ))``, a centre
    uniform over the pixels, and clips the box to the image; ``rand_bbox_minmax`` takes each side uniform
    in ``[min, max)`` of the image side and a corner that keeps the box inside. These are the same draws in
    fractions; up to pixel rounding (≤ 1 px per edge) the same distribution at every output size.
    """
    if mix.cutmix_minmax is not None:
        lo, hi = mix.cutmix_minmax
        h, w = rng.uniform(lo, hi), rng.uniform(lo, hi)  # timm: cut_h, then cut_w
        y0, x0 = rng.uniform(0.0, 1.0 - h), rng.uniform(0.0, 1.0 - w)
        return (_f32(x0), _f32(y0), _f32(w), _f32(h))
    cut = math.sqrt(1.0 - lam)
    cy, cx = rng.random(), rng.random()  # timm: cy, then cx
    y0, y1 = max(cy - cut / 2, 0.0), min(cy + cut / 2, 1.0)
    x0, x1 = max(cx - cut / 2, 0.0), min(cx + cut / 2, 1.0)
    return (_f32(x0), _f32(y0), _f32(x1 - x0), _f32(y1 - y0))


def mix_block(position: int, count: int, window: int) -> range:
    """The positions ``position``'s partner is drawn from: its aligned block ``[k·window, (k+1)·window)``,
    ``k = position // window``, cut at the tar's ``count``."""
    start = position // window * window
    return range(start, min(start + window, count))


def _draw_partner(rng: np.random.Generator, position: int, block: range, valid: Sequence[bool] | None) -> int:
    """The first valid position in a seeded sequence of draws uniform over the other positions of ``block``."""
    if len(block) < 2 or (valid is not None and not any(valid[q] for q in block if q != position)):
        return NO_PARTNER
    while True:  # terminates: some other position of the block is valid
        q = block.start + int(rng.integers(0, len(block) - 1))
        q += q >= position  # skip the sample itself
        if valid is None or valid[q]:
            return q


def sample_mix(
    recipe: ViewRecipe, *, tar: int, position: int, view: int, count: int, valid: Sequence[bool] | None = None
) -> MixRecord:
    """Draw how view ``view`` of sample ``(tar, position)`` is mixed: timm ``Mixup._params_per_elem`` for one
    element, then timm's ``cutmix_bbox_and_lam``, then a partner sample.

    - mode and λ: with both alphas active CutMix with ``switch_prob``, λ ~ Beta(α, α) of the chosen mode
      (rounded to float32 as timm does), applied with ``prob``; as in timm a λ of exactly 1 is unmixed.
    - CutMix box: :func:`_sample_cutmix_box`; with ``correct_lam`` (always with ``cutmix_minmax``) λ is
      ``1 - w·h`` of the stored box, so the stored λ is the pasted area's complement at any resolution.
    - partner: uniform over the *other* positions of the sample's block (:func:`mix_block`: the aligned
      ``mix.window`` positions around it, cut at ``count``; never ``position``), redrawn until it is valid;
      so it needs only ``count`` (the tar's number of samples) when every position is valid, and ``valid``
      (``valid[q]``: position ``q`` holds a usable sample, ``len(valid) == count``) otherwise. It depends only
      on the validity of the positions it draws, up to the first valid one. No valid other position in the
      block (e.g. a last block of one position): the view is unmixed. The block is timm's batch: timm pairs
      images of one batch, and a block lets whoever replays the tar in order (the caching job, a streaming
      student) hold one block of images at a time, not the whole tar.

    Drawn from a generator of its own, seeded by (recipe seed, tar, position, view, a mix tag): the mix does not
    depend on the image (nor do the other fields of the record on the mix), and mode, λ and box are drawn
    before the partner, so they do not depend on ``count`` or ``valid`` either.
    """
    mix = recipe.mix
    if mix is None:
        raise ValueError("sample_mix: the view recipe has no mix")
    if not 0 <= position < count:
        raise ValueError(f"tar {tar}: position {position} is outside the tar's {count} samples")
    if valid is not None and len(valid) != count:
        raise ValueError(f"tar {tar}: {len(valid)} validity flags for {count} samples")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([recipe.seed, tar, position, view, _MIX_STREAM])))
    if mix.mixup_alpha > 0 and mix.cutmix_beta > 0:
        cutmix = bool(rng.random() < mix.switch_prob)
        lam = rng.beta(mix.cutmix_beta, mix.cutmix_beta) if cutmix else rng.beta(mix.mixup_alpha, mix.mixup_alpha)
    elif mix.mixup_alpha > 0:
        cutmix, lam = False, rng.beta(mix.mixup_alpha, mix.mixup_alpha)
    else:
        cutmix, lam = True, rng.beta(mix.cutmix_beta, mix.cutmix_beta)
    lam = _f32(lam)
    if not rng.random() < mix.prob or lam == 1.0:  # timm: ``rand < prob`` mixes, ``lam != 1`` applies
        return MixRecord()
    box = (0.0, 0.0, 0.0, 0.0)
    if cutmix:
        box = _sample_cutmix_box(rng, mix, lam)
        if mix.correct_lam or mix.cutmix_minmax is not None:
            lam = _f32(1.0 - box[2] * box[3])
    partner = _draw_partner(rng, position, mix_block(position, count, mix.window), valid)
    if partner == NO_PARTNER:
        return MixRecord()
    return MixRecord(partner=partner, mode="cutmix" if cutmix else "mixup", lam=lam, box=box)


def sample_view(
    recipe: ViewRecipe, *, tar: int, position: int, view: int, width: int, height: int,
    count: int | None = None, valid: Sequence[bool] | None = None,
) -> ViewRecord:
    """Sample view ``view`` of sample ``(tar, position)`` whose source image is ``width x height``.

    Pure function of its arguments: any worker, any time, gets the same record. The crop
    follows torchvision's ``RandomResizedCrop.get_params`` in source pixels; RandAugment
    and RandomErasing follow timm. Erasing boxes are fractions of the *output* image,
    sampled on a unit square (timm samples them in output pixels, which are unknown here);
    up to pixel rounding this is the same distribution at every output size. A recipe with
    ``mix`` needs the tar's sample ``count`` (and ``valid``, see :func:`sample_mix`) for the partner.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"tar {tar} position {position}: image size {width}x{height} is empty")
    if recipe.mix is not None and count is None:
        raise ValueError(f"tar {tar} position {position}: the recipe mixes views, so sampling a view needs "
                         "the tar's sample count (count=) to draw a partner")
    # SeedSequence mixes all four words: neighbouring keys give unrelated streams.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([recipe.seed, tar, position, view])))
    crop = _sample_crop(rng, recipe, width, height)
    flip = bool(rng.random() < recipe.hflip)
    ops = _sample_ops(rng, recipe.randaugment) if recipe.randaugment else ()
    erase = _sample_erase(rng, recipe.erase) if recipe.erase else ()
    # Noise is only needed for non-constant fills; a zero seed otherwise keeps rows compressible.
    noise_seed = int(rng.integers(0, 2**32)) if erase and recipe.erase.mode != "const" else 0
    mix = None
    if recipe.mix is not None:
        mix = sample_mix(recipe, tar=tar, position=position, view=view, count=count, valid=valid)
    return ViewRecord(crop=crop, flip=flip, ops=ops, erase=erase, noise_seed=noise_seed, mix=mix)


# --- application --------------------------------------------------------------------------


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
    RandAugment fill and translate range, erasing fill mode). A record's ``mix`` is not applied here:
    that takes the partner's view too, see :func:`mix_views`. The steps, in order: :func:`crop_flip`,
    :func:`randaugment`, ``to_tensor`` + ``normalize``, :func:`erase` (``bench.decode_once`` times each).
    """
    img = randaugment(crop_flip(img, record, recipe, size=size), record, recipe)
    x = F.normalize(F.to_tensor(img), mean, std)
    erase(x, record, recipe)
    return x


def crop_flip(img: Image.Image, record: ViewRecord, recipe: ViewRecipe, *, size: int | tuple[int, int]
              ) -> Image.Image:
    """The first step of :func:`apply_view`: ``img`` as RGB, ``record``'s crop resized to ``size`` with the
    recipe's interpolation (antialiased, as timm's ``RandomResizedCropAndInterpolation``), flipped if recorded."""
    out_h, out_w = size_pair(size)
    if img.mode != "RGB":
        img = img.convert("RGB")
    left, top, w, h = _to_pixels(record.crop, img.width, img.height, min_size=1)
    img = F.resized_crop(img, top, left, h, w, [out_h, out_w], interpolation=_INTERPOLATION[recipe.crop.interpolation],
                         antialias=True)
    return F.hflip(img) if record.flip else img


def randaugment(img: Image.Image, record: ViewRecord, recipe: ViewRecipe) -> Image.Image:
    """The second step of :func:`apply_view`: ``record``'s RandAugment ops applied in order
    (:func:`pipeline.randaugment.apply_op`)."""
    if not record.ops:
        return img
    ra = recipe.randaugment
    if ra is None:
        raise ValueError(f"view record has RandAugment ops {record.ops} but the recipe has no randaugment")
    interp = _INTERPOLATION[recipe.crop.interpolation]
    for op in record.ops:
        img = apply_op(img, op.name, op.magnitude, ra, interp)
    return img


def mix_box_pixels(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """A CutMix box in fractions → timm's pixel slice bounds ``(yl, yh, xl, xh)`` at ``height x width``.

    Edges round to the nearest pixel line (each edge, not the size, so a box touching a border stays on it).
    """
    x0, y0, w, h = box
    yl, yh = (min(max(round(v * height), 0), height) for v in (y0, y0 + h))
    xl, xh = (min(max(round(v * width), 0), width) for v in (x0, x0 + w))
    return yl, yh, xl, xh


def mix_views(x: torch.Tensor, partner: torch.Tensor, mix: MixRecord | None) -> torch.Tensor:
    """Mix a replayed view ``x`` with its partner's: timm ``Mixup`` for one element, at ``x``'s resolution.

    ``x`` and ``partner`` are ``[..., C, H, W]`` outputs of :func:`apply_view` at the same size: ``x`` the view
    this record belongs to, ``partner`` the partner sample (``mix.partner``, same tar) replayed by **its own**
    record of the same view index. That is what timm mixes: each image of a batch augmented by its own
    transform, then mixed with another image of the batch as that image is itself seen; here that image's view
    is already cached in the same unit (tar, view), so the partner costs no record and no extra read.

    mixup: ``λ·x + (1−λ)·partner`` in float32 as timm computes it; CutMix: ``x`` with the record's box
    (:func:`mix_box_pixels`) pasted from ``partner``. An unmixed record (or none) returns ``x`` itself. Labels
    mix with the stored ``mix.lam`` (for CutMix the box's fractional area, within a pixel row of the pasted
    pixels at any size). Used by the caching job and the trainer alike, so both see the same mixed input.
    """
    if mix is None or mix.mode == "none":
        return x
    if x.shape != partner.shape:
        raise ValueError(f"mix_views: view {tuple(x.shape)} and partner {tuple(partner.shape)} differ in shape")
    if mix.mode == "mixup":
        # timm: ``x * lam + x_partner * (1 - lam)`` with lam a float32 scalar, so 1 - lam is rounded to float32
        return x * mix.lam + partner * float(np.float32(1.0) - np.float32(mix.lam))
    yl, yh, xl, xh = mix_box_pixels(mix.box, x.shape[-2], x.shape[-1])
    out = x.clone()
    out[..., yl:yh, xl:xh] = partner[..., yl:yh, xl:xh]
    return out


def replay_view(
    img: Image.Image,
    record: ViewRecord,
    recipe: ViewRecipe,
    *,
    size: int | tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    partner: tuple[Image.Image, ViewRecord] | None = None,
) -> torch.Tensor:
    """A view as the caching job fed it to the teacher, at ``size``: float32 ``[3, H, W]``.

    :func:`apply_view` of ``record`` on ``img``; a mixed record (``record.mix`` mode mixup/cutmix) is then
    mixed by :func:`mix_views` with ``partner = (partner_image, partner_record)``: the partner sample
    (``record.mix.partner``, same tar) and **its own record of the same view index**, applied unmixed
    (its own ``mix`` is ignored), which is the partner view the job held and mixed with. The job computes
    the partner's view once and shares it; whoever replays single stored views (the trainer, ``verify``)
    calls this, so all three mix the same tensors the same way.
    """
    x = apply_view(img, record, recipe, size=size, mean=mean, std=std)
    mix = record.mix
    if mix is None or mix.mode == "none":
        return x
    if partner is None:
        raise ValueError(f"the view is mixed ({mix.mode} with position {mix.partner} of the same tar): replaying it "
                         "needs the partner's image and record")
    partner_img, partner_record = partner
    return mix_views(x, apply_view(partner_img, partner_record, recipe, size=size, mean=mean, std=std), mix)


def erase(x: torch.Tensor, record: ViewRecord, recipe: ViewRecipe) -> None:
    """The last step of :func:`apply_view`: timm ``RandomErasing`` fills of ``record``'s boxes, in place on the
    normalised ``x`` ``[C, H, W]``, with the recipe's fill mode."""
    if not record.erase:
        return
    if recipe.erase is None:
        raise ValueError(f"view record has erase boxes {record.erase} but the recipe has no erase")
    mode = recipe.erase.mode
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
    out_h, out_w = size_pair(size)
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
