"""A small real data set as ImageNet-style WebDataset shards: scikit-learn's bundled digits.

1797 handwritten digits, 8x8 pixels with values 0..16, ten classes; bundled with scikit-learn,
so demos and tests need no download. Each sample is ``KEY.png`` (RGB, upscaled), ``KEY.cls``
and ``KEY.json`` (``{"digits_index": i}``, the row in ``load_digits()``).
The bytes are a function of the arguments only: two calls write identical tars.
"""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from webdataset import TarWriter

from storage_schemas.errors import ConfigError

NUM_CLASSES = 10
_MTIME = 946684800  # 2000-01-01T00:00:00Z: a fixed member mtime (TarWriter uses time.time() otherwise)


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One digit ``[8, 8]`` (0..16) as an RGB image ``[size, size, 3]``.

    0..16 is scaled to 0..255 rounding half up, then resized bilinearly (PIL) and repeated
    over the three channels.
    """
    grey = np.floor(np.asarray(pixels, dtype=np.float64) * 255.0 / 16.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR)
    return img.convert("RGB")


def write_digits(out: str, *, train_shards: int = 4, val_shards: int = 2, size: int = 32,
                 val_fraction: float = 0.2, seed: int = 0, storage_options: dict | None = None) -> dict:
    """Write the digits as ``{out}/train-000000.tar``… and ``{out}/val-000000.tar``….

    The split is stratified by class with ``seed``; samples keep the split's (shuffled) order
    and are cut into contiguous shards. Keys are ``digits-{split}-{n:06d}``, n counting within
    the split. Each tar is written under a temporary name and then renamed, so a crash never
    leaves a half-written shard under a shard's name.
    Returns ``{"train": brace URL, "val": brace URL, "num_classes": 10, "counts": {split: n}}``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), not {val_fraction}")
    if size < 1:
        raise ConfigError(f"size must be positive, not {size}")
    digits = load_digits()
    order = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(order, test_size=val_fraction, stratify=digits.target,
                                          random_state=seed)
    splits = (("train", train_idx, train_shards), ("val", val_idx, val_shards))
    for split, indices, num_shards in splits:
        if not 1 <= num_shards <= len(indices):
            raise ConfigError(f"{split}_shards must be in [1, {len(indices)}], not {num_shards}")
    fs, root = url_to_fs(out, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    base = out.rstrip("/")
    result: dict = {"num_classes": NUM_CLASSES, "counts": {}}
    for split, indices, num_shards in splits:
        n = 0
        for shard, chunk in enumerate(np.array_split(indices, num_shards)):
            samples = []
            for i in chunk.tolist():
                buf = io.BytesIO()
                digit_image(digits.images[i], size).save(buf, format="PNG")
                samples.append({
                    "__key__": f"digits-{split}-{n:06d}",
                    "png": buf.getvalue(),
                    "cls": str(int(digits.target[i])).encode("ascii"),
                    "json": json.dumps({"digits_index": i}, sort_keys=True).encode("utf-8"),
                })
                n += 1
            write_tar(fs, f"{root.rstrip('/')}/{split}-{shard:06d}.tar", samples)
        result[split] = f"{base}/{split}-{{000000..{num_shards - 1:06d}}}.tar"
        result["counts"][split] = len(indices)
    return result


def write_tar(fs, path: str, samples: list[dict]) -> None:
    """Write samples (bytes values) to ``path`` atomically: a temporary name, then a rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    done = False
    try:
        with fs.open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=_MTIME) as writer:
            for sample in samples:
                writer.write(sample)
        fs.mv(tmp, path)
        done = True
    finally:
        if not done and fs.exists(tmp):
            fs.rm(tmp)
