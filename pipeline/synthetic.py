"""ImageNet-shaped data without ImageNet: procedurally generated JPEGs as WebDataset tars.

For tests and benchmarks at real shapes: ``KEY.jpg`` (RGB JPEG, quality 90) + ``KEY.cls`` (a label in
``0..classes-1``), the layout of :mod:`pipeline.digits` and of ImageNet's WebDataset shards, about 1,250
samples a tar, so :mod:`pipeline.tars` and the caching job read them as they read ImageNet.

What is ImageNet-like, and how:
- sizes: :func:`draw_size` draws width x height from a seeded mixture resembling ImageNet's training set
  (3 in 4 have a long side of 500 px, the rest a long side spread around it; 4:3 most often, then 3:2, square
  and others; of the non-square ones 3 in 4 landscape), so a typical image is 500x375 and every one lies
  within :data:`MIN_SIDE`..:data:`MAX_SIDE`;
- bytes: content compresses like a photograph, about 110 KB at quality 90 for 500x375 (ImageNet's mean is
  ~110 KB), not like flat colour (4 KB) or white noise (170 KB, and nearly all of it in the finest detail): a
  smooth field with a 1/f-like spectrum (noise at several octaves, larger octaves stronger), a few shapes with
  hard edges, an oriented grating and per-pixel grain;
- labels: balanced (each class ``images // classes`` or one more times) in a seeded random order, and
  learnable: a class fixes the palette, the grating's orientation and frequency and the shapes' kind and
  colour, an image varies everything else.

Deterministic: the bytes of every tar are a function of the arguments (and of the numpy, Pillow and libjpeg builds):
each image is drawn from its own generator seeded by (seed, split, index), so tars can be written in any
order or in parallel (``workers``).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image, ImageDraw
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn, which is ours

from storage_schemas.errors import ConfigError

from .digits import write_tar

QUALITY = 90
MIN_SIDE, MAX_SIDE = 80, 1000  # bounds of drawn sides (ImageNet has a few smaller and larger; tails cut)
_SPLITS = {"train": 0, "val": 1}
_CLASS_STREAM = 0x636C73  # "cls": the seed word of a class's own generator


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) from ImageNet-like proportions: long side 500 with probability 0.75, else lognormal
    around 450 (σ 0.35); aspect 4:3 (0.55), 3:2 (0.2), 1:1 (0.1), else log-uniform in [1, 2]; portrait with
    probability 0.25. Sides clipped to [MIN_SIDE, MAX_SIDE]."""
    long = 500.0 if rng.random() < 0.75 else 450.0 * math.exp(0.35 * rng.standard_normal())
    u = rng.random()
    aspect = 4 / 3 if u < 0.55 else 1.5 if u < 0.75 else 1.0 if u < 0.85 else math.exp(rng.uniform(0.0, math.log(2)))
    short = long / aspect
    w, h = (short, long) if rng.random() < 0.25 else (long, short)
    return (int(np.clip(round(w), MIN_SIDE, MAX_SIDE)), int(np.clip(round(h), MIN_SIDE, MAX_SIDE)))


def _class_style(seed: int, label: int) -> dict:
    """What a class fixes: palette, grating and shapes (drawn from the class's own generator)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, label, _CLASS_STREAM])))
    return {
        "base": rng.uniform(40, 215, 3).astype(np.float32),  # mean colour
        "mix": rng.normal(0, 1, (3, 3)).astype(np.float32) / math.sqrt(3),  # colour of the smooth field
        "angle": rng.uniform(0, math.pi),
        "period": rng.uniform(4.0, 24.0),  # grating period in px
        "shape": int(rng.integers(0, 3)),  # ellipses, rectangles, triangles
        "shape_rgb": rng.uniform(0, 255, 3).astype(np.float32),
    }


@functools.lru_cache(maxsize=64)
def _upsampler(n: int, cell: int) -> np.ndarray:
    """``[n, g]`` float32 matrix taking ``g`` grid values (one every ``cell`` px, one beyond each end) to ``n``
    pixels with cubic B-spline weights: a smooth (C2) field, no creases at grid lines."""
    g = n // cell + 4
    t = (np.arange(n, dtype=np.float64) + 0.5) / cell + 1.0  # pixel centres in grid units
    d = np.abs(t[:, None] - np.arange(g)[None, :])
    wgt = np.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    wgt /= np.sqrt((wgt**2).sum(1, keepdims=True))  # unit variance at every pixel
    return wgt.astype(np.float32)


def _octave(rng: np.random.Generator, h: int, w: int, cell: int, channels: int) -> np.ndarray:
    """Gaussian noise on a grid of ``cell``-px cells, smoothly upsampled to ``[channels, h, w]`` float32 of unit
    variance (two matrix products per channel, so it costs little at any size)."""
    ah, aw = _upsampler(h, cell), _upsampler(w, cell)
    g = rng.standard_normal((channels, ah.shape[1], aw.shape[1]), dtype=np.float32)
    return ah @ g @ aw.T


# Octaves (cell size px, amplitude in grey levels) of the coloured field and of the finer detail (luminance, as
# most of a photograph's fine detail is), the oriented grating and the per-pixel grain: tuned so that 500x375
# images average ~110 KB at quality 90 (tests/pipeline/test_synthetic.py checks 20).
_COLOUR = ((96, 40.0), (24, 26.0))
_DETAIL = ((8, 32.0), (3, 30.0))
_GRATING = 10.0
_GRAIN = 20.0


def synthetic_image(seed: int, split: str, index: int, label: int, size: tuple[int, int] | None = None
                    ) -> Image.Image:
    """Image ``index`` of ``split`` with class ``label``: RGB, ``size`` (width, height) or drawn by
    :func:`draw_size`. A pure function of its arguments (one thread of BLAS, see :func:`write_synthetic`)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLITS[split], index])))
    w, h = size or draw_size(rng)
    st = _class_style(seed, label)
    field = sum(amp * _octave(rng, h, w, cell, 3) for cell, amp in _COLOUR)  # [3, h, w]
    field = np.tensordot(st["mix"], field, 1) + sum(amp * _octave(rng, h, w, cell, 1) for cell, amp in _DETAIL)
    img = st["base"][:, None, None] + field
    # shapes with hard edges, in the class's colour, textured by the same field
    mask = Image.new("L", (w, h))
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.25) * min(w, h)
        box = (cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r)
        if st["shape"] == 0:
            draw.ellipse(box, fill=255)
        elif st["shape"] == 1:
            draw.rectangle(box, fill=255)
        else:
            a = rng.uniform(0, 2 * math.pi)
            draw.polygon([(cx + r * math.cos(a + t), cy + r * math.sin(a + t)) for t in (0, 2.1, 4.2)], fill=255)
    inside = np.asarray(mask) > 0
    img = np.where(inside, st["shape_rgb"][:, None, None] + 0.5 * field, img)
    k = 2 * math.pi / st["period"]
    xs = np.arange(w, dtype=np.float32) * np.float32(k * math.cos(st["angle"]))
    ys = np.arange(h, dtype=np.float32) * np.float32(k * math.sin(st["angle"]))
    img += _GRATING * np.cos(ys[:, None] + xs[None, :] + np.float32(rng.uniform(0, 2 * math.pi)))
    img += rng.standard_normal((3, h, w), dtype=np.float32) * np.float32(_GRAIN)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0), "RGB")


def encode_jpeg(img: Image.Image, quality: int = QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)  # no EXIF, no timestamp: same bytes every time
    return buf.getvalue()


def synthetic_labels(seed: int, split: str, images: int, classes: int) -> np.ndarray:
    """Labels of a split: each class ``images // classes`` or one more times, in a seeded random order."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLITS[split], _CLASS_STREAM])))
    return rng.permutation(np.arange(images) % classes)


def _write_one(args: tuple, progress: Callable[[int], None] | None = None) -> int:
    """Write one tar (a worker's job), calling ``progress(1)`` per image; returns the tar's byte size."""
    out, storage_options, split, shard, start, labels, seed, size = args
    fs, root = url_to_fs(out, **(storage_options or {}))
    samples = []
    # one BLAS thread: the field's matrix products are small (threads only cost), and their rounding then does
    # not depend on how many threads the machine has
    with threadpool_limits(1):
        for i, label in enumerate(labels, start=start):
            samples.append({"__key__": f"synthetic-{split}-{i:08d}",
                            "jpg": encode_jpeg(synthetic_image(seed, split, i, int(label), size)),
                            "cls": str(int(label)).encode("ascii")})
            if progress:
                progress(1)
    path = f"{root.rstrip('/')}/{split}-{shard:06d}.tar"
    write_tar(fs, path, samples)
    return fs.size(path)


def check_arguments(*, classes: int, images: int, val_images: int = 0, per_tar: int = 1250,
                    size: tuple[int, int] | None = None, workers: int = 1) -> None:
    """Raise :class:`ConfigError` naming the first argument of :func:`write_synthetic` out of range."""
    if classes < 1:
        raise ConfigError(f"classes must be at least 1, not {classes}")
    if images < 1:
        raise ConfigError(f"images must be at least 1, not {images}")
    if val_images < 0:
        raise ConfigError(f"val_images must be at least 0, not {val_images}")
    if per_tar < 1:
        raise ConfigError(f"per_tar must be at least 1, not {per_tar}")
    if size is not None and not all(8 <= s <= 4000 for s in size):
        raise ConfigError(f"size {size[0]}x{size[1]}: each side must be in [8, 4000]")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")


def write_synthetic(out: str, *, classes: int = 1000, images: int = 1250, val_images: int = 0,
                    per_tar: int = 1250, size: tuple[int, int] | None = None, seed: int = 0, workers: int = 1,
                    storage_options: dict | None = None,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Write ``images`` training images as ``{out}/train-000000.tar``… (``per_tar`` a tar, the last one
    shorter) and ``val_images`` as ``{out}/val-000000.tar``…; ``size`` (width, height) fixes every image's
    size instead of drawing ImageNet-like ones. Tars are written whole under a temporary name, then renamed.
    ``progress(n)`` is called as images are done (per image with one worker, per tar with several);
    ``workers`` > 1 writes tars in as many processes (not to ``memory://``, which is per process).

    Returns ``{"train": brace URL, "val": brace URL or None, "num_classes": C, "counts": {split: n},
    "bytes": {split: total tar bytes}}``.
    """
    check_arguments(classes=classes, images=images, val_images=val_images, per_tar=per_tar, size=size,
                    workers=workers)
    fs, root = url_to_fs(out, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    base = out.rstrip("/")
    result: dict = {"num_classes": classes, "counts": {}, "bytes": {}, "train": None, "val": None}
    jobs = []
    for split, n in (("train", images), ("val", val_images)):
        if n == 0:
            continue
        labels = synthetic_labels(seed, split, n, classes)
        tars = -(-n // per_tar)
        for shard in range(tars):
            lo = shard * per_tar
            jobs.append((out, storage_options, split, shard, lo, labels[lo:lo + per_tar], seed, size))
        result[split] = f"{base}/{split}-{{000000..{tars - 1:06d}}}.tar"
        result["counts"][split] = n
        result["bytes"][split] = 0
    if workers == 1:
        for job in jobs:
            result["bytes"][job[2]] += _write_one(job, progress)
        return result
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for job, nbytes in zip(jobs, pool.map(_write_one, jobs), strict=True):
            result["bytes"][job[2]] += nbytes
            if progress:
                progress(len(job[5]))
    return result
