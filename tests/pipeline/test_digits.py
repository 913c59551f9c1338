"""pipeline.digits: scikit-learn's digits as WebDataset shards, read back through pipeline.tars."""

from __future__ import annotations

import os
import re

import fsspec
import numpy as np
import pytest
from sklearn.datasets import load_digits

import pipeline.digits as digits_mod
from pipeline.digits import write_digits
from pipeline.tars import expand_urls, index_tar, iter_samples

SHARDS = [f"train-{i:06d}.tar" for i in range(4)] + [f"val-{i:06d}.tar" for i in range(2)]


def bilinear(a: np.ndarray, size: int) -> np.ndarray:
    """Upscale ``[n, n]`` to ``[size, size]``: pixel centres at half-pixels, edges clamped (float64)."""
    n = a.shape[0]
    c = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = c - i0
    rows = a[i0] * (1 - w)[:, None] + a[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None] + rows[:, i1] * w[None]


@pytest.fixture(scope="module")
def read_back(digits) -> dict[str, list]:
    """Every sample of the conftest digits shards, per split, in shard order."""
    return {split: [s for url in expand_urls(digits[split]) for s in iter_samples(url, num_classes=10)]
            for split in ("train", "val")}


def test_layout_and_return_value(digits):
    root = os.path.dirname(expand_urls(digits["train"])[0])
    assert sorted(os.listdir(root)) == SHARDS  # no temporary files left behind
    assert digits["train"] == f"{root}/train-{{000000..000003}}.tar"
    assert digits["val"] == f"{root}/val-{{000000..000001}}.tar"
    assert digits["num_classes"] == 10 and digits["counts"] == {"train": 1437, "val": 360}
    counts = {split: sum(index_tar(u).count for u in expand_urls(digits[split])) for split in ("train", "val")}
    assert counts == digits["counts"] and sum(counts.values()) == 1797


def test_labels_match_sklearn_and_split_is_stratified(read_back):
    target = load_digits().target
    seen = []
    for split, samples in read_back.items():
        assert [s.key for s in samples] == [f"digits-{split}-{n:06d}" for n in range(len(samples))]
        idx = [s.meta["digits_index"] for s in samples]
        assert [s.label for s in samples] == target[idx].tolist()
        seen += idx
    assert sorted(seen) == list(range(1797))  # every digit exactly once
    val = np.bincount([s.label for s in read_back["val"]], minlength=10)
    assert np.all(np.abs(val - 0.2 * np.bincount(target)) <= 1)


def test_pixels_match_an_independent_upscale(read_back):
    images = load_digits().images
    for s in read_back["train"][:50] + read_back["val"][:50]:
        got = np.asarray(s.image)
        assert got.shape == (32, 32, 3) and s.image.mode == "RGB"
        assert (got == got[..., :1]).all()  # grey in RGB
        # 0..16 -> 0..255 rounding half up, then bilinear; PIL rounds between its two passes: <= 1 off
        expected = bilinear(np.floor(images[s.meta["digits_index"]] * 255 / 16 + 0.5), 32)
        assert np.abs(got[..., 0] - expected).max() <= 1.0


def test_byte_identical_and_seeded(digits, tmp_path):
    root = os.path.dirname(expand_urls(digits["train"])[0])
    again = write_digits(str(tmp_path / "again"))
    assert again["counts"] == digits["counts"]
    for name in SHARDS:
        with open(f"{root}/{name}", "rb") as a, open(tmp_path / "again" / name, "rb") as b:
            assert a.read() == b.read(), name
    other = write_digits(str(tmp_path / "seed1"), seed=1, train_shards=1, val_shards=1, size=16)
    (url,) = expand_urls(other["val"])
    first = next(iter_samples(url))
    assert first.image.size == (16, 16)
    assert [s.meta["digits_index"] for s in iter_samples(url)] != [
        s.meta["digits_index"] for u in expand_urls(digits["val"]) for s in iter_samples(u)]


def test_crash_leaves_no_partial_shard(tmp_path, monkeypatch):
    class Crashing(digits_mod.TarWriter):
        def write(self, obj):
            if obj["__key__"].endswith("000005"):
                raise RuntimeError("simulated crash")
            return super().write(obj)

    monkeypatch.setattr(digits_mod, "TarWriter", Crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_digits(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_memory_output_and_bad_arguments():
    fs = fsspec.filesystem("memory")
    try:
        out = write_digits("memory://kdcache-digits", train_shards=1, val_shards=1, size=8)
        assert out["train"] == "memory://kdcache-digits/train-{000000..000000}.tar"
        (url,) = expand_urls(out["train"])
        assert index_tar(url).count == 1437
        assert re.fullmatch(r"digits-train-\d{6}", next(iter_samples(url)).key)
    finally:
        if fs.exists("/kdcache-digits"):
            fs.rm("/kdcache-digits", recursive=True)
    with pytest.raises(ValueError, match="val_fraction"):
        write_digits("memory://kdcache-unused", val_fraction=1.0)
    with pytest.raises(ValueError, match="val_shards"):
        write_digits("memory://kdcache-unused", val_shards=0)
