"""pipeline.synthetic and ``kdcache data synthetic``: ImageNet-shaped JPEG tars, read back through the project's
tar reader and the caching job's index pass, checked against independent computations (hashes of the files,
PIL's own JPEG tables, plain statistics of the pixels)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import MAX_SIDE, MIN_SIDE, draw_size, encode_jpeg, synthetic_image, write_synthetic
from pipeline.tars import expand_urls, index_tar, iter_samples

ROOT = Path(__file__).resolve().parents[2]


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """7 training images in tars of 3 (3, 3, 1) and 2 validation images, 5 classes, small fixed size."""
    out = tmp_path_factory.mktemp("syn") / "a"
    res = write_synthetic(str(out), classes=5, images=7, val_images=2, per_tar=3, size=(64, 48), seed=3)
    return {"out": out, "result": res}


def test_same_arguments_same_bytes_other_seed_other_bytes(small, tmp_path):
    again = tmp_path / "b"
    write_synthetic(str(again), classes=5, images=7, val_images=2, per_tar=3, size=(64, 48), seed=3)
    a, b = sha256s(small["out"]), sha256s(again)
    assert list(a) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert a == b
    other = tmp_path / "c"
    write_synthetic(str(other), classes=5, images=7, val_images=2, per_tar=3, size=(64, 48), seed=4)
    assert all(sha256s(other)[k] != a[k] for k in a)
    assert sorted(os.listdir(small["out"])) == list(a)  # no temporary files left


def test_tar_layout_and_the_projects_readers(small):
    res = small["result"]
    assert res["counts"] == {"train": 7, "val": 2} and res["num_classes"] == 5
    assert res["train"] == f"{small['out']}/train-{{000000..000002}}.tar"
    urls = expand_urls(res["train"])
    # members as tarfile lists them: KEY.jpg + KEY.cls per sample, nothing else
    with tarfile.open(urls[0]) as tf:
        names = tf.getnames()
    assert names == [f"synthetic-train-{i:08d}.{e}" for i in range(3) for e in ("cls", "jpg")]
    assert [index_tar(u).count for u in urls] == [3, 3, 1]  # the caching job's index pass
    samples = [s for u in urls for s in iter_samples(u, num_classes=5)]  # the tar reader, labels bounded
    assert [s.key for s in samples] == [f"synthetic-train-{i:08d}" for i in range(7)]
    assert all(s.image.size == (64, 48) and s.image.mode == "RGB" for s in samples)
    val = [s for u in expand_urls(res["val"]) for s in iter_samples(u, num_classes=5)]
    assert len(val) == 2 and all(0 <= s.label < 5 for s in val)
    assert sum(res["bytes"].values()) == sum(p.stat().st_size for p in small["out"].glob("*.tar"))


def test_labels_are_balanced_and_in_range(tmp_path):
    res = write_synthetic(str(tmp_path), classes=4, images=10, per_tar=10, size=(16, 16), seed=1)
    labels = [s.label for s in iter_samples(expand_urls(res["train"])[0], num_classes=4)]
    assert sorted(Counter(labels).values()) == [2, 2, 3, 3] and set(labels) == {0, 1, 2, 3}
    assert labels != sorted(labels)  # shuffled


def test_sizes_are_imagenet_like():
    """Drawn sizes (2,000 draws, no pixels): within bounds, typically 500×375 (then 500×333, 375×500, as in ImageNet), long side mostly 500."""
    rng = np.random.default_rng(0)
    sizes = [draw_size(rng) for _ in range(2000)]
    w, h = np.array(sizes).T
    assert w.min() >= MIN_SIDE and h.min() >= MIN_SIDE and w.max() <= MAX_SIDE and h.max() <= MAX_SIDE
    common = Counter(sizes).most_common(3)
    assert common[0][0] == (500, 375) and {s for s, _ in common} == {(500, 375), (500, 333), (375, 500)}
    assert 0.6 < np.mean(np.maximum(w, h) == 500) < 0.9
    assert 0.65 < np.mean(w > h) < 0.85  # mostly landscape
    assert 150_000 < np.mean(w * h) < 230_000  # ImageNet's mean is about 180k pixels
    assert len(set(sizes)) > 200  # varied
    # and the sizes of written images are those draws
    assert synthetic_image(0, "train", 5, 0).size == draw_size(
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 0, 5]))))


def test_jpeg_quality_90_and_about_110_kb_at_500x375():
    """20 images at 500×375: PIL's quality-90 tables (from an independent encode), 110 KB ± 20 % on average."""
    ref = Image.open(io.BytesIO(encode_jpeg(Image.new("RGB", (16, 16)), quality=90))).quantization
    sizes = []
    for i in range(20):
        data = encode_jpeg(synthetic_image(0, "train", i, i * 37 % 1000, (500, 375)))
        assert Image.open(io.BytesIO(data)).quantization == ref
        sizes.append(len(data))
    assert 88_000 <= np.mean(sizes) <= 132_000, np.mean(sizes)


def test_content_is_neither_flat_nor_white_noise():
    """Like a photograph: most of the variance is in the coarse structure (a 4× box downsample keeps it), yet
    the fine detail is there; and the class shows in the pixels (two images of one class are closer in mean
    colour than images of other classes, on average)."""
    img = np.asarray(synthetic_image(0, "train", 0, 7, (512, 384)), dtype=np.float64)
    coarse = img.reshape(96, 4, 128, 4, 3).mean((1, 3))
    fine = img - np.repeat(np.repeat(coarse, 4, 0), 4, 1)
    assert img.std() > 30  # not flat
    assert 0.05 < fine.var() / img.var() < 0.5  # white noise would leave ~15/16 of it in the fine part
    means = {(c, k): np.asarray(synthetic_image(0, "train", 10 * c + k, c, (96, 72)), float).mean((0, 1))
             for c in range(6) for k in range(2)}
    same = np.mean([np.linalg.norm(means[c, 0] - means[c, 1]) for c in range(6)])
    other = np.mean([np.linalg.norm(means[c, 0] - means[d, 1]) for c in range(6) for d in range(6) if d != c])
    assert same < other / 2, (same, other)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jobs.cli", "data", "synthetic", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def test_cli_writes_tars_and_refuses_bad_arguments(tmp_path):
    out = tmp_path / "cli"
    r = run_cli("--out", str(out), "--classes", "3", "--images", "4", "--val-images", "1", "--per-tar", "2",
                "--size", "40x30", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["counts"] == {"train": 4, "val": 1} and res["num_classes"] == 3
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert [index_tar(u).count for u in expand_urls(res["train"])] == [2, 2]
    api = tmp_path / "api"
    write_synthetic(str(api), classes=3, images=4, val_images=1, per_tar=2, size=(40, 30))
    assert sha256s(out) == sha256s(api)  # the CLI writes what the function writes
    for bad, says in ((["--images", "0"], "images must be at least 1"), (["--images", "3", "--size", "40by30"],
                                                                          "--size"),
                      (["--images", "3", "--classes", "0"], "classes must be at least 1")):
        r = run_cli("--out", str(tmp_path / "bad"), *bad)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert says in last and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.tar"))
    r = run_cli("--help")
    assert r.returncode == 0 and "110 KB" in r.stdout and "--per-tar" in r.stdout and "Deterministic" in r.stdout
