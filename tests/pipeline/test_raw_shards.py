"""pipeline.raw_shards reads kdcache's uncompressed shards as Zarr reads them: every row range, with inner chunks
and whole shards left unstored (all fill), locally and from S3; other chains are left to Zarr; damage is one
clear error naming the shard."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from pipeline.raw_shards import RawShard, is_raw_sharded
from pipeline.store import CacheStore, url_to_fs
from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.errors import CacheError

S, CR, INNER = 12, 4, (3, 5)  # rows a shard (unit), rows an inner chunk, a row's shape
TARS, VIEWS = 3, 2
RANGES = [(0, S), (0, 1), (3, 9), (4, 8), (5, 6), (11, 12), (0, 10), (2, 12), (7, 7)]


def make_array(url: str, dtype: str, storage_options: dict | None = None, compress: bool = False) -> zarr.Array:
    """An array shaped as a cache's ``[tars * S, views, *INNER]``, written as the job writes units; unit (1, 1)
    never written (no shard object) and in unit (2, 0) the middle inner chunk all fill (not stored)."""
    store = CacheStore(url, storage_options)
    g = store.group()
    arr = g.create_array("a", shape=(TARS * S, VIEWS, *INNER), dtype=dtype, chunks=(CR, 1, *INNER),
                         shards=(S, 1, *INNER), fill_value=7, **A.zarr_codecs(compress))
    rng = np.random.default_rng(0)
    for t in range(TARS):
        for v in range(VIEWS):
            if (t, v) == (1, 1):
                continue
            block = (rng.standard_normal((S, 1, *INNER)) * 50).astype(dtype)
            if (t, v) == (2, 0):
                block[CR:2 * CR] = 7
            arr[t * S:(t + 1) * S, v:v + 1] = block
    return arr


def manifest(count: int) -> SimpleNamespace:
    """The two fields of a manifest that ``CacheStore.read_unit`` reads: rows a shard, samples a tar."""
    return SimpleNamespace(rows_per_shard=S, dataset=SimpleNamespace(shards=[SimpleNamespace(count=count)] * TARS))


def shard(store: CacheStore, arr: zarr.Array, t: int, v: int) -> RawShard:
    return RawShard(store.fs, store.path(layout.array_shard_key("a", t, v, len(INNER))), arr)


@pytest.mark.parametrize("dtype", ["float16", "int8", "float32", "uint8"])
def test_every_row_range_reads_as_zarr_reads_it(tmp_path, dtype):
    url = str(tmp_path / "c.zarr")
    arr = make_array(url, dtype)
    store = CacheStore(url, read_only=True)
    assert is_raw_sharded(arr)
    assert not store.fs.exists(store.path(layout.array_shard_key("a", 1, 1, len(INNER))))
    for t in range(TARS):
        for v in range(VIEWS):
            for lo, hi in RANGES:
                got, want = shard(store, arr, t, v).rows(lo, hi), arr[t * S + lo:t * S + hi, v]
                assert got.dtype == want.dtype and got.shape == want.shape, (t, v, lo, hi)
                np.testing.assert_array_equal(got, want, err_msg=f"unit {t},{v} rows {lo}..{hi}")
                assert got.flags.writeable
    assert (shard(store, arr, 2, 0).rows(0, S)[CR:2 * CR] == 7).all()


def test_from_s3_reads_as_zarr_reads_it(moto_s3):
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/raw-{uuid.uuid4().hex[:8]}.zarr"
    arr = make_array(url, "float16", opts)
    store = CacheStore(url, opts, read_only=True)
    for t, v in [(0, 0), (1, 1), (2, 0)]:
        for lo, hi in RANGES:
            np.testing.assert_array_equal(shard(store, arr, t, v).rows(lo, hi), arr[t * S + lo:t * S + hi, v])


def test_other_chains_are_left_to_zarr(tmp_path):
    assert not is_raw_sharded(make_array(str(tmp_path / "z.zarr"), "float16", compress=True))
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    assert not is_raw_sharded(g.create_array("b", shape=(8, 1, 3), dtype="float16", chunks=(4, 1, 3)))


def test_the_cache_store_reads_raw_arrays_without_zarr_and_the_rest_with_it(tmp_path, monkeypatch):
    url = str(tmp_path / "c.zarr")
    make_array(url, "float16")
    store = CacheStore(url, read_only=True)
    arr = store.array("a")
    calls = []
    real = RawShard.rows

    def spy(self, lo, hi):
        calls.append((self.path, lo, hi))
        return real(self, lo, hi)

    monkeypatch.setattr(RawShard, "rows", spy)
    rows = store.read_unit(manifest(10), 2, 0, ["a"], 1, None)["a"]
    np.testing.assert_array_equal(rows, arr[2 * S + 1:2 * S + 10, 0])
    assert calls == [(store.path("a/c/2/0/0/0"), 1, 10)]


def test_a_read_only_store_reads_a_shard_index_once_for_its_blocks(tmp_path, monkeypatch):
    """Rows read a block at a time (student.stream.BlockRows): a read-only store reads each shard's index once,
    then only the chunks; a writable one (the job's, whose shards change) reads it every time."""
    url = str(tmp_path / "c.zarr")
    arr = make_array(url, "float16")
    reads, chunk_reads = [], []
    real, real_source = RawShard._read, RawShard._source

    def spy(self, start, end, **kw):  # index reads (a chunk's read goes through _source: below)
        if start < 0:
            reads.append((self.path.rsplit("/a/", 1)[1], True))
        return real(self, start, end, **kw)

    def spy_source(self, start, end):
        if start >= 0:
            chunk_reads.append((self.path.rsplit("/a/", 1)[1], False))
        return real_source(self, start, end)

    monkeypatch.setattr(RawShard, "_read", spy)
    monkeypatch.setattr(RawShard, "_source", spy_source)
    for read_only, index_reads in ((True, 1), (False, 6)):  # writable: each of the 6 block reads reads it
        store = CacheStore(url, read_only=read_only)
        reads.clear(), chunk_reads.clear()
        for lo in range(0, S, CR):  # three blocks of an inner chunk each, the tars in turn, both ways
            for t in range(TARS):
                got = store.read_unit(manifest(S), t, 0, ["a"], lo, lo + CR)["a"]
                np.testing.assert_array_equal(got, arr[t * S + lo:t * S + lo + CR, 0], err_msg=f"{t} {lo}")
                into = [np.empty(got[0].nbytes, np.uint8) for _ in range(CR)]
                store.raw_shard(t, 0, "a").rows_into(lo, lo + CR, into)
                np.testing.assert_array_equal(np.stack(into).view(got.dtype).reshape(got.shape), got)
        for t in range(TARS):
            stored = 3 - (t == 2)  # unit (2, 0)'s middle chunk is all fill: not stored, not read
            mine = sorted(r for r in reads if r[0] == f"c/{t}/0/0/0")
            assert mine == [(f"c/{t}/0/0/0", True)] * index_reads, (read_only, t)  # the chunks: spied below
            chunks = sorted(r for r in chunk_reads if r[0] == f"c/{t}/0/0/0")
            assert chunks == [(f"c/{t}/0/0/0", False)] * (2 * stored), (read_only, t)  # rows(), rows_into()


def damaged(tmp_path, where: str) -> tuple[RawShard, str]:
    url = str(tmp_path / f"{where}.zarr")
    arr = make_array(url, "float16")
    store = CacheStore(url, read_only=True)
    s = shard(store, arr, 0, 0)
    data = bytearray(open(s.path, "rb").read())
    if where == "chunk":
        data[5] ^= 0xFF
    elif where == "index":
        data[-7] ^= 0x01
    else:
        data = data[:10] + data[-s.index_bytes:]  # the chunks cut short, the index kept
    open(s.path, "wb").write(bytes(data))
    return s, s.path


@pytest.mark.parametrize(("where", "message"), [("chunk", r"inner chunk 0 does not match its crc32c checksum"),
                                                ("index", r"the shard index does not match its crc32c checksum"),
                                                ("truncated", r"inner chunk 0 runs past the end of the shard")])
def test_a_damaged_shard_is_one_error_naming_it(tmp_path, where, message):
    s, path = damaged(tmp_path, where)
    with pytest.raises(CacheError, match=message) as e:
        s.rows(0, S)
    assert path in str(e.value) and "kdcache verify" in str(e.value)
    fs, _ = url_to_fs(str(tmp_path))
    assert fs.exists(path)  # nothing repaired or removed behind the reader's back


@pytest.mark.parametrize("piece", [1, 5, 64, None])
def test_a_block_read_is_checksummed_as_it_lands(tmp_path, monkeypatch, piece):
    """A block of one inner chunk from a local file is checksummed piece by piece as it is read: the crc is the
    one computed over the whole chunk here, for pieces that end anywhere (the chunk here is 124 bytes: with 64,
    the stored checksum starts inside the second piece), and the rows are Zarr's."""
    import google_crc32c

    from pipeline import raw_shards

    if piece is not None:
        monkeypatch.setattr(raw_shards, "PIECE", piece)
    url = str(tmp_path / "c.zarr")
    arr = make_array(url, "float16")
    store = CacheStore(url, read_only=True)
    for t in range(TARS):
        s = shard(store, arr, t, 0)
        index = s._index(s._read(-s.index_bytes, None))
        for c in range(S // CR):
            if (t, c) == (2, 1):  # all fill: not stored
                continue
            offset, nbytes = (int(x) for x in index[c])
            chunk = np.empty(nbytes, np.uint8)
            with s._source(offset, offset + nbytes) as (n, fill):
                crc = s._land([chunk], fill, nbytes - 4)
            whole = open(s.path, "rb").read()[offset:offset + nbytes]
            assert chunk.tobytes() == whole
            assert crc == google_crc32c.value(whole[:-4]) == int.from_bytes(whole[-4:], "little"), (t, c)
            np.testing.assert_array_equal(s.rows(c * CR, (c + 1) * CR), arr[t * S + c * CR:t * S + (c + 1) * CR, 0])


@pytest.mark.parametrize("piece", [1, 7, None])
def test_rows_into_writes_each_wanted_row_as_zarr_reads_it(tmp_path, monkeypatch, piece):
    """``rows_into`` (student.stream.BlockRows' read: each row straight into its sample's buffer) for every row
    range, every third row not wanted, with pieces ending anywhere in a row: each wanted row is Zarr's (all fill
    for a chunk or a shard not stored), a row not wanted is left as it was."""
    from pipeline import raw_shards

    if piece is not None:
        monkeypatch.setattr(raw_shards, "PIECE", piece)
    url = str(tmp_path / "c.zarr")
    arr = make_array(url, "float16")
    store = CacheStore(url, read_only=True)
    row_bytes = 2 * INNER[0] * INNER[1]
    for t in range(TARS):
        for v in range(VIEWS):
            for lo, hi in RANGES:
                dests = [None if (p % 3 == 2) else np.full(row_bytes, 0xAB, np.uint8) for p in range(lo, hi)]
                untouched = np.full(row_bytes, 0xAB, np.uint8)
                shard(store, arr, t, v).rows_into(lo, hi, dests)
                for p, d in zip(range(lo, hi), dests, strict=True):
                    if d is not None:
                        want = arr[t * S + p, v]
                        np.testing.assert_array_equal(d.view(np.float16).reshape(INNER), want, err_msg=f"{t},{v} {p}")
                assert all(d is None or d.tobytes() != untouched.tobytes() for d in dests)  # each wanted row written
    with pytest.raises(ValueError, match="2 destinations for rows 0..2"):
        shard(store, arr, 0, 0).rows_into(0, 3, [None, None])


def test_rows_into_a_damaged_chunk_is_one_error_naming_it(tmp_path):
    arr, s, index = opened(tmp_path)
    data = bytearray(open(s.path, "rb").read())
    data[int(index[1, 0]) + 50] ^= 0x01
    open(s.path, "wb").write(bytes(data))
    dests = [np.empty(2 * INNER[0] * INNER[1], np.uint8) for _ in range(CR)]
    s.rows_into(0, CR, dests)  # chunk 0: untouched
    np.testing.assert_array_equal(np.stack(dests).view(np.float16).reshape(CR, *INNER), arr[0:CR, 0])
    with pytest.raises(CacheError, match=r"inner chunk 1 does not match its crc32c checksum") as e:
        s.rows_into(CR + 1, CR + 2, [dests[0]])  # one row wanted: its chunk is read and checked whole
    assert s.path in str(e.value) and "kdcache verify" in str(e.value)


def opened(tmp_path) -> tuple[zarr.Array, RawShard, np.ndarray]:
    """A local array, its unit (0, 0)'s shard and the shard's index."""
    arr = make_array(str(tmp_path / "c.zarr"), "float16")
    s = shard(CacheStore(str(tmp_path / "c.zarr"), read_only=True), arr, 0, 0)
    return arr, s, s._index(s._read(-s.index_bytes, None))


@pytest.mark.parametrize("at", [0, 61, 119, 120, 123])  # the chunk's first, a middle, its last row byte; its crc
def test_a_damaged_block_read_as_it_lands_is_one_error_naming_it(tmp_path, monkeypatch, at):
    from pipeline import raw_shards

    monkeypatch.setattr(raw_shards, "PIECE", 64)
    arr, s, index = opened(tmp_path)
    offset = int(index[1, 0])  # inner chunk 1
    data = bytearray(open(s.path, "rb").read())
    data[offset + at] ^= 0x10
    open(s.path, "wb").write(bytes(data))
    np.testing.assert_array_equal(s.rows(0, CR), arr[0:CR, 0])  # chunk 0: untouched, read
    with pytest.raises(CacheError, match=r"inner chunk 1 does not match its crc32c checksum") as e:
        s.rows(CR, 2 * CR)
    assert s.path in str(e.value) and "kdcache verify" in str(e.value)


@pytest.mark.parametrize("client", ["ranges", "obstore", "fsspec"])
def test_a_block_from_s3_is_checksummed_as_it_lands(moto_s3, monkeypatch, client):
    """From S3 (the GET read from the socket by ``pipeline.s3_ranges``; obstore's response with
    ``KDCACHE_S3_READS=obstore``, s3fs's with ``=fsspec``) a block's bytes land in the reader's buffer a piece at
    a time and are checksummed as they land: the rows are Zarr's, and a byte changed in the stored object is the
    checksum's one error naming it, the other blocks still read."""
    from pipeline import raw_shards, s3_reads
    from pipeline.s3_ranges import RangeReader

    monkeypatch.setattr(raw_shards, "PIECE", 64)  # a chunk is 124 bytes: its crc starts inside the second piece
    if client != "ranges":
        monkeypatch.setenv(s3_reads.ENV, client)
    gets, opens = [], []
    real_get, real_open = s3_reads.get, RangeReader.open
    monkeypatch.setattr(s3_reads, "get", lambda *a, **k: gets.append(a[1]) or real_get(*a, **k))
    monkeypatch.setattr(RangeReader, "open", lambda *a, **k: opens.append(a[1]) or real_open(*a, **k))
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/raw-{uuid.uuid4().hex[:8]}.zarr"
    arr = make_array(url, "float16", opts)
    def block(store: CacheStore, c: int) -> np.ndarray:  # as BlockRows reads it: straight into rows' buffers
        rows = np.empty((CR, *INNER), arr.dtype)
        store.raw_shard(0, 0, "a").rows_into(c * CR, (c + 1) * CR, [r.reshape(-1).view(np.uint8) for r in rows])
        return rows

    store = CacheStore(url, opts, read_only=True)
    for c in range(S // CR):
        np.testing.assert_array_equal(block(store, c), arr[c * CR:(c + 1) * CR, 0], err_msg=f"block {c}")
    assert (len(gets) > 0) == (client == "obstore") and (len(opens) > 0) == (client == "ranges")
    key = store.path(layout.array_shard_key("a", 0, 0, len(INNER)))
    data = bytearray(store.fs.cat_file(key))
    offset = int(np.frombuffer(bytes(data[-(16 * (S // CR) + 4):-4]), "<u8").reshape(-1, 2)[1, 0])
    data[offset + 100] ^= 0x10  # a row byte of inner chunk 1, in its second piece
    store.fs.pipe_file(key, bytes(data))
    store = CacheStore(url, opts, read_only=True)  # no index kept from before
    np.testing.assert_array_equal(block(store, 0), arr[0:CR, 0])
    with pytest.raises(CacheError, match=r"inner chunk 1 does not match its crc32c checksum") as e:
        block(store, 1)
    assert key.split("://")[-1] in str(e.value) and "kdcache verify" in str(e.value)


def test_a_block_cut_short_by_the_end_of_its_file_is_one_error(tmp_path):
    _, s, index = opened(tmp_path)
    open(s.path, "r+b").truncate(int(index[2, 0]) + 50)  # inside inner chunk 2
    s.indexes = {s.path: index}  # the index read before the file changed, as a read-only store keeps it
    with pytest.raises(CacheError, match=r"inner chunk 2 runs past the end of the shard"):
        s.rows(2 * CR, 3 * CR)
    with pytest.raises(CacheError, match=r"inner chunk 2 runs past the end of the shard"):  # as BlockRows reads
        s.rows_into(2 * CR, 3 * CR, [np.empty(2 * INNER[0] * INNER[1], np.uint8) for _ in range(CR)])


def test_a_damaged_zstd_shard_read_through_zarr_is_the_same_kind_of_error(tmp_path):
    url = str(tmp_path / "z.zarr")
    make_array(url, "float16", compress=True)
    store = CacheStore(url, read_only=True)
    path = store.path(layout.array_shard_key("a", 0, 1, len(INNER)))
    data = bytearray(open(path, "rb").read())
    data[5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CacheError, match=r"checksum do not match.*\(array a, tar 0, view 1\).*kdcache verify") as e:
        store.read_unit(manifest(S), 0, 1, ["a"])
    assert str(e.value).startswith(f"{path}: ")
    np.testing.assert_array_equal(store.read_unit(manifest(S), 0, 0, ["a"])["a"], store.array("a")[0:S, 0])  # others read
