"""pipeline.tars: URL expansion, indexing, streaming, bad inputs, colour conversion."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile
from collections.abc import Callable

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.images import decode_image
from pipeline.tars import (
    BadSampleError,
    BadTarError,
    TarIndex,
    base_plus_ext,
    dataset_fingerprint,
    expand_urls,
    index_tar,
    iter_samples,
)

# ---------------------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with open(path, "wb") as f:
        f.write(tar_bytes(members))
    return str(path)


def sample(key: str, label: int = 1, colour=(10, 20, 30)) -> list[tuple[str, bytes]]:
    return [(f"{key}.cls", str(label).encode()), (f"{key}.png", encode(Image.new("RGB", (3, 2), colour)))]


def member_spans(data: bytes) -> list[tuple[int, int]]:
    """(first data byte, first byte after the padded data) of each member."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        return [(m.offset_data, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/kdcache-test"):
        fs.rm("/kdcache-test", recursive=True)


# ---------------------------------------------------------------------------------------- URLs


def test_expand_urls_braces_globs_and_order(tmp_path, monkeypatch):
    for name in ["b-2.tar", "b-1.tar", "a-000000.tar", "a-000001.tar", "a-000002.tar"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "b-dir.tar").mkdir()  # a directory never counts as a shard
    d = str(tmp_path)
    assert expand_urls(f"{d}/a-{{000000..000001}}.tar") == [f"{d}/a-000000.tar", f"{d}/a-000001.tar"]
    # as listed; each glob sorted
    assert expand_urls([f"{d}/b-*.tar", f"{d}/a-00000[02].tar", f"{d}/a-000001.tar"]) == [
        f"{d}/b-1.tar", f"{d}/b-2.tar", f"{d}/a-000000.tar", f"{d}/a-000002.tar", f"{d}/a-000001.tar"]
    monkeypatch.chdir(tmp_path)  # relative local paths come back absolute
    assert expand_urls(["a-000000.tar", "b-?.tar"]) == [f"{d}/a-000000.tar", f"{d}/b-1.tar", f"{d}/b-2.tar"]


def test_expand_urls_errors_name_the_url(tmp_path):
    d = str(tmp_path)
    (tmp_path / "a-0.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{d}/a-1.tar")):
        expand_urls(f"{d}/a-{{0..1}}.tar")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{d}/x-*.tar")):
        expand_urls([f"{d}/a-0.tar", f"{d}/x-*.tar"])
    with pytest.raises(ValueError, match="listed twice"):
        expand_urls([f"{d}/a-*.tar", f"{d}/a-0.tar"])
    with pytest.raises(ValueError, match="no input"):
        expand_urls([])


def test_expand_urls_keeps_protocol(memfs):
    for name in ["s-1.tar", "s-0.tar", "other.txt"]:
        memfs.pipe(f"/kdcache-test/{name}", b"")
    assert expand_urls("memory://kdcache-test/s-*.tar") == [
        "memory:///kdcache-test/s-0.tar", "memory:///kdcache-test/s-1.tar"]
    assert expand_urls("memory://kdcache-test/s-{1,0}.tar") == [
        "memory://kdcache-test/s-1.tar", "memory://kdcache-test/s-0.tar"]
    with pytest.raises(FileNotFoundError, match="memory://kdcache-test/s-2.tar"):
        expand_urls("memory://kdcache-test/s-2.tar")


# ---------------------------------------------------------------------------------------- index + stream


def test_index_digits_counts_add_up(digits):
    urls = expand_urls([digits["train"], digits["val"]])
    index = [index_tar(u) for u in urls]
    assert sum(s.count for s in index) == 1797
    assert [s.size for s in index] == [os.path.getsize(u) for u in urls]
    assert all(s.truncated is None for s in index)
    keys = [k for s in index for k in s.keys]
    assert len(set(keys)) == len(keys)
    samples = list(iter_samples(urls[0], num_classes=10, keys=index[0].keys))
    assert [s.key for s in samples] == index[0].keys
    assert [s.position for s in samples] == list(range(index[0].count))
    assert all(s.image.mode == "RGB" and s.skip_reason is None for s in samples)


def test_iter_samples_checks_the_index(tmp_path):
    url = write_tar(tmp_path / "s.tar", sample("a") + sample("b"))
    with pytest.raises(BadTarError, match="changed since it was indexed.*position 1"):
        list(iter_samples(url, keys=["a", "c"]))
    with pytest.raises(BadTarError, match="changed since it was indexed: 2 samples read, the index has 3"):
        list(iter_samples(url, keys=["a", "b", "c"]))
    with pytest.raises(BadTarError, match=re.escape(f"{url}: tar changed")):
        list(iter_samples(url, keys=["a"]))


def test_memory_url(memfs):
    memfs.pipe("/kdcache-test/m-0.tar", tar_bytes(sample("a", 3, (1, 2, 3)) + sample("b", 4)))
    (url,) = expand_urls("memory://kdcache-test/m-*.tar")
    index = index_tar(url)
    assert index.keys == ["a", "b"] and index.size == memfs.size("/kdcache-test/m-0.tar")
    a, b = iter_samples(url, keys=index.keys)
    assert (a.label, b.label) == (3, 4) and a.image.getpixel((0, 0)) == (1, 2, 3)


def test_gzip_compressed_tar(tmp_path):
    data = gzip.compress(tar_bytes(sample("a") + sample("b")), mtime=0)
    (tmp_path / "s.tar.gz").write_bytes(data)
    url = str(tmp_path / "s.tar.gz")
    assert index_tar(url).keys == ["a", "b"]
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadTarError, match="cut.tar.gz"):
        index_tar(str(tmp_path / "cut.tar.gz"))


def test_meta_and_uppercase_extension(tmp_path):
    members = [("dir/n01_1.JPEG", encode(Image.new("RGB", (2, 2), (9, 9, 9)), "JPEG")), ("dir/n01_1.cls", b" 7\n"),
               ("dir/n01_1.json", b'{"wnid": "n01"}'), ("README", b"no extension: ignored")]
    url = write_tar(tmp_path / "s.tar", members)
    (s,) = iter_samples(url, num_classes=10)
    assert (s.key, s.label, s.meta) == ("dir/n01_1", 7, {"wnid": "n01"})


def test_key_rule_is_webdatasets():
    """The tar reader's key rule (written out so that the index pass does not import torch through webdataset)
    splits every name as webdataset's own ``base_plus_ext`` does."""
    from webdataset.tariterators import base_plus_ext as webdatasets

    names = ["n01440764/n01440764_10026.JPEG", "a.v2.jpg", "k.cls", "README", "dir.d/x", "dir.d/x.png", ".hidden",
             "a/.b.c", "a/b/", "a..b", "x.", "./a.jpg", "sp ace/é.Jpeg", "__key__.txt", "a/b.c/d.e.f", ""]
    assert [base_plus_ext(n) for n in names] == [webdatasets(n) for n in names]
    assert base_plus_ext("a.v2.jpg") == ("a", "v2.jpg") and base_plus_ext("README") == (None, None)


# ---------------------------------------------------------------------------------------- bad samples

BAD = {
    "not_an_image": ([("k.cls", b"1"), ("k.jpg", b"this is not a jpeg")], "k.jpg is not a decodable image"),
    "no_image_member": ([("k.cls", b"1"), ("k.txt", b"hello")], "no image member"),
    "dotted_key": ([("k.v2.cls", b"1"), ("k.v2.png", encode(Image.new("RGB", (1, 1))))], "first '.'"),
    "missing_label": ([("k.png", encode(Image.new("RGB", (1, 1))))], "no label member"),
    "non_integer_label": ([("k.cls", b"cat"), ("k.png", encode(Image.new("RGB", (1, 1))))], "not an integer"),
    "float_label": ([("k.cls", b"1.0"), ("k.png", encode(Image.new("RGB", (1, 1))))], "not an integer"),
    "label_too_big": ([("k.cls", b"10"), ("k.png", encode(Image.new("RGB", (1, 1))))], r"label 10 out of range \[0, 10\)"),
    "negative_label": ([("k.cls", b"-1"), ("k.png", encode(Image.new("RGB", (1, 1))))], "out of range"),
    "bad_json": ([("k.cls", b"1"), ("k.json", b"{oops"), ("k.png", encode(Image.new("RGB", (1, 1))))], "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_error_and_skip(tmp_path, case):
    members, reason = BAD[case]
    url = write_tar(tmp_path / "s.tar", sample("a", 2) + members + sample("z", 3))
    with pytest.raises(BadSampleError, match=reason) as err:
        list(iter_samples(url, num_classes=10))
    assert str(err.value).startswith(f"{url}: key k: ") and (err.value.url, err.value.key) == (url, "k")

    a, k, z = iter_samples(url, num_classes=10, on_bad_sample="skip", keys=index_tar(url).keys)
    assert [s.position for s in (a, k, z)] == [0, 1, 2]
    assert (a.label, z.label) == (2, 3) and a.image is not None and z.image is not None
    assert k.key == "k" and k.image is None and k.label is None
    assert k.skip_reason == err.value.reason


@pytest.mark.parametrize("layout", ["adjacent_member", "key_comes_back"])
def test_duplicate_key(tmp_path, layout):
    if layout == "adjacent_member":  # k.png twice within one run of k
        members = sample("k", 1, (1, 1, 1)) + [("k.png", encode(Image.new("RGB", (3, 2), (2, 2, 2))))] + sample("z")
        keys = ["k", "z"]
    else:  # k, z, then k again
        members = sample("k", 1, (1, 1, 1)) + sample("z") + sample("k", 5, (2, 2, 2))
        keys = ["k", "z"]
    url = write_tar(tmp_path / "s.tar", members)
    for run in (lambda: index_tar(url), lambda: list(iter_samples(url))):
        with pytest.raises(BadSampleError, match=re.escape(f"{url}: key k: duplicate")):
            run()
    index = index_tar(url, on_bad_sample="skip")
    assert index.keys == keys and index.truncated is None
    k, z = iter_samples(url, on_bad_sample="skip", keys=index.keys)
    assert (k.label, k.image.getpixel((0, 0)), z.position) == (1, (1, 1, 1), 1)  # the first one is kept


def test_exceptions_carry_fields_and_pickle():
    e = pickle.loads(pickle.dumps(BadSampleError("s3://b/x.tar", "k1", "no label member (KEY.cls)")))
    assert (str(e), e.url, e.key, e.reason) == ("s3://b/x.tar: key k1: no label member (KEY.cls)", "s3://b/x.tar",
                                                "k1", "no label member (KEY.cls)")
    e2 = pickle.loads(pickle.dumps(BadTarError("s3://b/x.tar", "tar cut short")))
    assert (str(e2), e2.url, e2.reason) == ("s3://b/x.tar: tar cut short", "s3://b/x.tar", "tar cut short")
    assert isinstance(e, ValueError) and isinstance(e2, ValueError)
    with pytest.raises(ValueError, match="on_bad_sample"):
        index_tar("unused.tar", on_bad_sample="ignore")


# ---------------------------------------------------------------------------------------- damaged tars


def _cut_cases() -> dict[str, tuple[Callable[[bytes], bytes], int]]:
    """name -> (bytes -> damaged bytes, complete samples before the damage); tar of samples a, b, c."""
    def at_member_boundary(data):  # after b.png, before c: tarfile alone reads this as a valid tar
        return data[: member_spans(data)[3][1]]

    def mid_member(data):  # inside b.png's data
        return data[: member_spans(data)[3][0] + 10]

    def bad_header(data):  # garbage where c.cls's header should be
        end = member_spans(data)[3][1]
        return data[:end] + b"\x07" * 512 + data[end + 512:]

    # b's members all end before the damage in the first and third case: b is kept (issue 16, item 4)
    return {"at_member_boundary": (at_member_boundary, 2), "mid_member": (mid_member, 1),
            "bad_header": (bad_header, 2), "empty_file": (lambda d: b"", 0)}


def test_a_sample_whose_extra_member_is_cut_goes_with_the_damage(tmp_path):
    """b has its image and label, but the cut falls in its JSON member: b is dropped by both passes alike."""
    members = sample("a", 0) + sample("b", 1) + [("b.json", b'{"note": "' + b"x" * 3000 + b'"}')] + sample("c", 2)
    data = tar_bytes(members)
    url = str(tmp_path / "s.tar")
    with open(url, "wb") as f:
        f.write(data[: member_spans(data)[4][0] + 100])  # inside b.json's data
    index = index_tar(url, on_bad_sample="skip")
    assert index.keys == ["a"] and index.truncated
    assert [s.key for s in iter_samples(url, on_bad_sample="skip", keys=index.keys)] == ["a"]


@pytest.mark.parametrize("case", sorted(_cut_cases()))
def test_damaged_tar(tmp_path, case):
    cut, complete = _cut_cases()[case]
    data = tar_bytes(sample("a", 0) + sample("b", 1) + sample("c", 2))
    url = str(tmp_path / "s.tar")
    with open(url, "wb") as f:
        f.write(cut(data))
    with pytest.raises(BadTarError, match=f"^{re.escape(url)}: tar (cut short|corrupt)"):
        index_tar(url)
    with pytest.raises(BadTarError, match=f"^{re.escape(url)}: tar"):
        list(iter_samples(url))
    index = index_tar(url, on_bad_sample="skip")
    assert index.keys == ["a", "b"][:complete] and index.truncated and index.size == len(cut(data))
    assert [s.key for s in iter_samples(url, on_bad_sample="skip", keys=index.keys)] == index.keys


def test_intact_tar_is_not_flagged(tmp_path):
    url = write_tar(tmp_path / "s.tar", sample("a") + sample("b"))
    assert index_tar(url) == TarIndex(url=url, size=os.path.getsize(url), keys=["a", "b"], truncated=None)
    empty = write_tar(tmp_path / "empty.tar", [])
    assert index_tar(empty).keys == [] and list(iter_samples(empty)) == []


def test_dataset_fingerprint():
    shards = [TarIndex("s3://b/0.tar", 100, ["a", "b"]), TarIndex("s3://b/1.tar", 50, ["c"])]
    fp = dataset_fingerprint(shards)
    assert len(fp) == 64 and fp == dataset_fingerprint([TarIndex("s3://b/0.tar", 100, ["x", "y"]), shards[1]])
    changed = [
        shards[::-1],
        [TarIndex("s3://b/0.tar", 101, ["a", "b"]), shards[1]],
        [TarIndex("s3://b/0.tar", 100, ["a"]), shards[1]],
        [TarIndex("s3://b/2.tar", 100, ["a", "b"]), shards[1]],
    ]
    assert len({fp, *map(dataset_fingerprint, changed)}) == 5


# ---------------------------------------------------------------------------------------- colour


def _p_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 200] + [0] * 759)
    img.putdata([0, 1, 2])
    if transparent:
        img.info["transparency"] = bytes([255, 128, 0] + [255] * 253)  # per-index alpha (PNG tRNS)
    return img


def _cmyk_jpeg() -> tuple[bytes, list]:
    data = encode(Image.new("CMYK", (4, 4), (30, 200, 100, 60)), "JPEG", quality=100)
    c, m, y, k = Image.open(io.BytesIO(data)).getpixel((0, 0))  # as decoded (JPEG is lossy)
    return data, [[[round((255 - v) * (255 - k) / 255) for v in (c, m, y)]] * 4] * 4


COLOUR = {
    # name: (encoded bytes, expected RGB pixels [H][W][3], computed by hand)
    "L": (encode(Image.frombytes("L", (2, 1), bytes([0, 200]))), [[[0, 0, 0], [200, 200, 200]]]),
    "P": (encode(_p_image(False)), [[[255, 0, 0], [0, 255, 0], [0, 0, 200]]]),
    # composited over black: round(c * a / 255); 255*128/255 = 128
    "P_transparency": (encode(_p_image(True)), [[[255, 0, 0], [0, 128, 0], [0, 0, 0]]]),
    "RGBA": (encode(Image.frombytes("RGBA", (3, 1), bytes([200, 100, 50, 128, 9, 8, 7, 255, 250, 250, 250, 0]))),
             [[[100, 50, 25], [9, 8, 7], [0, 0, 0]]]),  # 200*128/255 = 100.4, 50*128/255 = 25.1
    "LA": (encode(Image.frombytes("LA", (2, 1), bytes([200, 64, 77, 255]))), [[[50, 50, 50], [77, 77, 77]]]),
    "RGBA_webp": (encode(Image.frombytes("RGBA", (1, 1), bytes([200, 100, 50, 51])), "WEBP", lossless=True),
                  [[[40, 20, 10]]]),
    "CMYK_jpeg": _cmyk_jpeg(),
    # 16 bit: round(v * 255 / 65535): 65535 -> 255, 32768 -> 127.5 -> 128, 257 -> 1, 128 -> 0.498 -> 0,
    # 129 -> 0.502 -> 1 (clipping, as PIL's own I;16 -> L does, would give 255 for 32768)
    "I16_png": (encode(Image.fromarray(np.array([[0, 32768, 65535, 257, 128, 129]], dtype=np.uint16))),
                [[[v] * 3 for v in (0, 128, 255, 1, 0, 1)]]),
    "1_bit": (encode(Image.frombytes("1", (8, 1), bytes([0b10100000]))),
              [[[255] * 3, [0] * 3, [255] * 3] + [[0] * 3] * 5]),
    "1x1_RGB": (encode(Image.new("RGB", (1, 1), (7, 8, 9))), [[[7, 8, 9]]]),
    "1x1_L_jpeg": (encode(Image.new("L", (1, 1), 77), "JPEG", quality=100), [[[77, 77, 77]]]),
}


@pytest.mark.parametrize("case", sorted(COLOUR))
def test_colour_conversion(case):
    data, expected = COLOUR[case]
    img = decode_image(data)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.array(expected, dtype=np.uint8))


def test_colour_through_a_shard(tmp_path):
    data, expected = COLOUR["I16_png"]
    url = write_tar(tmp_path / "s.tar", [("k.cls", b"0"), ("k.png", data)])
    (s,) = iter_samples(url)
    np.testing.assert_array_equal(np.asarray(s.image), np.array(expected, dtype=np.uint8))


def test_skip_mode_records_what_it_drops(tmp_path):
    """A repeated key or member: error mode refuses it, skip mode keeps the first and records the drop with the
    same reason (issue 16, item 3)."""
    url = write_tar(tmp_path / "d.tar", sample("a", 0) + sample("b", 1) + sample("a", 2) + [("b.cls", b"3")])
    with pytest.raises(BadSampleError, match="key a: duplicate key"):
        index_tar(url)
    index = index_tar(url, on_bad_sample="skip")
    assert index.keys == ["a", "b"]
    assert [k for k, _ in index.dropped] == ["a", "b"]  # a's second run, then b's lone label after it
    assert index.dropped[0][1].startswith("duplicate key: its members are not adjacent")
    url2 = write_tar(tmp_path / "m.tar", sample("a", 0) + [("a.cls", b"5")] + sample("b", 1))
    index = index_tar(url2, on_bad_sample="skip")
    assert index.keys == ["a", "b"] and index.dropped == [("a", "duplicate member a.cls (dropped, the first kept)")]
    assert [s.label for s in iter_samples(url2, on_bad_sample="skip")] == [0, 1]  # the first a.cls


def test_a_cache_records_the_dropped_members_as_skipped(tiny_teacher, tmp_path):
    """Through the caching job (in process): the repeated key's drop is in the manifest's skipped samples and in
    ``inspect``, with the reason error mode gives."""
    from jobs.report import format_summary
    from pipeline.job import build_cache_in_process
    from storage_schemas.config import CacheConfig
    from tests.conftest import cache_config

    url = write_tar(tmp_path / "in-000000.tar", sample("a", 0) + sample("b", 1) + sample("a", 2) + sample("c", 3))
    d = cache_config({"train": url}, tiny_teacher, str(tmp_path / "c.zarr"), input__on_bad_sample="skip",
                     views__num_views=1, targets__tpp=None)
    m = build_cache_in_process(CacheConfig.model_validate(d), log=lambda s: None)
    assert m.dataset.shards[0].count == 3 and m.stats.num_valid_rows == 3
    assert [(s.key, s.reason.split(":")[0]) for s in m.stats.skipped] == [("a", "duplicate key")]
    assert m.summary()["skipped_samples"][0]["reason"].endswith("(dropped, the first kept)")
    assert "in-000000.tar: key a: duplicate key" in format_summary(m.summary(), "c.zarr")
