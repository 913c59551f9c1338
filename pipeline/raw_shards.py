"""Rows of a Zarr v3 shard stored without compression, read straight from the shard's bytes.

Why not Zarr itself: the student's reader reads whole units of large uncompressed arrays (ViTKD taps, 1.2 MB a
sample at ViT-L's size) once per epoch, and Zarr 3.1 spends 0.9–1.2 ms of CPU a sample on it, against 0.24 ms
for reading the same bytes into one array (scratch microbenchmark, 2026-12-01, the ``bench.scale`` reader
caches; its ``breakdown_ms_per_sample.read_rows`` shows the same 1.2 ms): it reads each shard into a fresh
``bytes`` object and then copies every decoded chunk into a fresh output array (py-spy: ``NDBuffer.__setitem__``
44 % of a read). Zarr offers no way to decode into the bytes it read; ``out=`` still copies, and the compiled
``zarrs`` codec pipeline read no faster (1.27 against 1.26 ms a sample). Here a local shard is read with
``readinto`` into one array whose chunks become the rows (a part of it checksummed as the read lands: :meth:`RawShard.rows_into`),
zero copies after the read (from an object store: one
request for a whole shard instead of Zarr's two, index and chunk).

Only the chain kdcache writes for an uncompressed array is read here — ``sharding_indexed`` with the index at
the end, ``bytes`` (little-endian) + ``crc32c`` for both the inner chunks and the index
(:func:`storage_schemas.arrays.zarr_codecs` with ``compress=False``) — checked against the array's own Zarr
metadata by :func:`is_raw_sharded`; anything else (zstd, a cache from another writer) is left to Zarr. Both
checksums are verified, as Zarr verifies them, with the same ``google_crc32c``. The layout is the Zarr v3
sharding codec's (its spec, "Binary shard format"): the inner chunks, then the index, one little-endian
``uint64`` (offset, nbytes) pair per inner chunk in C order, ``2**64 - 1`` twice for a chunk not stored (all
fill value), followed by the index's crc32c; a shard whose chunks are all fill is not stored at all.

A reader that reads a shard a block of rows at a time (:class:`student.stream.BlockRows`, the student's path
for taps at ImageNet's tar size) reads each row straight into the buffer of the sample it belongs to
(:meth:`RawShard.rows_into`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import google_crc32c
import numpy as np
import zarr
import zarr.codecs as zc
from fsspec.implementations.local import LocalFileSystem

from storage_schemas.errors import CacheError

MISSING = 2**64 - 1  # an index entry of a chunk not stored
MAX_INDEXES = 4096  # shard indexes a read-only store keeps (16 bytes a chunk each)
CRC_BYTES = 4
PIECE = 256 << 10  # bytes a read lands at a time, each checksummed at once (RawShard._land)


Fill = Callable[[memoryview, int], int]  # fill(view, at): the next bytes into view (at: written before); how many
OpenRange = Callable[[int, "int | None"], contextlib.AbstractContextManager[tuple[int, Fill]]]


@contextlib.contextmanager
def file_range(path: str, start: int, end: int | None) -> Iterator[tuple[int, Fill]]:
    """``(n, fill)`` of bytes ``start..end`` of a local file (``start`` < 0: from the end), read with
    ``readinto`` straight into the caller's views."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        lo = size + start if start < 0 else start
        hi = size if end is None else min(end, size)
        f.seek(lo)
        yield max(0, hi - lo), lambda view, at: f.readinto(view)


@contextlib.contextmanager
def buffer_range(data) -> Iterator[tuple[int, Fill]]:
    """``(n, fill)`` of bytes already read (obstore's or fsspec's answer), copied into the caller's views."""
    src = memoryview(data).cast("B")

    def copy(view: memoryview, at: int) -> int:
        view[:] = src[at:at + len(view)]
        return len(view)

    yield len(src), copy


def damaged(path: str, what: str) -> CacheError:
    """The error for a shard object whose stored bytes are not what was written (also for Zarr's reads)."""
    return CacheError(f"{path}: {what}; the shard is damaged: run `kdcache verify` on the cache")


def is_raw_sharded(arr: zarr.Array) -> bool:
    """Whether ``arr`` is stored as kdcache stores an uncompressed array: one shard codec, index at the end, the
    inner chunks and the index each ``bytes`` (little-endian) + ``crc32c``, a little-endian (or one-byte) dtype,
    shards of whole rows ``[rows, 1, ...]`` split along the rows only."""
    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or len(md.codecs) != 1 or not isinstance(md.codecs[0], zc.ShardingCodec):
        return False
    sc = md.codecs[0]

    def plain(chain) -> bool:
        return (len(chain) == 2 and isinstance(chain[0], zc.BytesCodec) and isinstance(chain[1], zc.Crc32cCodec)
                and (chain[0].endian is None or chain[0].endian.value == "little"))

    shard = tuple(md.chunk_grid.chunk_shape)
    return (plain(sc.codecs) and plain(sc.index_codecs) and sc.index_location.value == "end"
            and arr.dtype.byteorder in "<|=" and len(shard) >= 2 and shard[1] == 1
            and tuple(sc.chunk_shape[1:]) == shard[1:] and shard[0] % sc.chunk_shape[0] == 0)


class RawShard:
    """One stored shard of a raw-sharded array (:func:`is_raw_sharded`) at ``path`` on ``fs``: rows of it.
    ``open_range(start, end)``, when given, reads its bytes instead of ``fs`` (S3: :class:`.s3_ranges.RangeReader`,
    or obstore through :func:`.s3_reads.get`; see :meth:`_source`). ``indexes``, when given, keeps each shard's checked index by
    path for the next reads of a part of it (a read-only cache: :class:`~pipeline.store.CacheStore`'s), so a shard read a block of rows at a
    time (``student.stream.BlockRows``) costs one request a block, not two: at ImageNet's 1,250 rows a shard
    and 64 a block, 20 GETs of a tap's shard instead of 40 from an object store."""

    def __init__(self, fs, path: str, arr: zarr.Array, open_range: OpenRange | None = None,
                 indexes: dict[str, np.ndarray] | None = None) -> None:
        self.fs, self.path, self.open_range, self.indexes = fs, path, open_range, indexes
        self.shard_rows = arr.metadata.chunk_grid.chunk_shape[0]
        self.chunk_rows = arr.metadata.codecs[0].chunk_shape[0]
        self.row_shape = tuple(arr.shape[2:])
        self.dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == "=" else arr.dtype
        self.fill = arr.fill_value
        self.n_chunks = self.shard_rows // self.chunk_rows
        self.chunk_bytes = self.chunk_rows * math.prod(self.row_shape) * self.dtype.itemsize
        self.index_bytes = 16 * self.n_chunks + CRC_BYTES

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi-1`` of the shard ``[hi - lo, *row_shape]``: the whole shard in one read (its rows views
        of the bytes read), else the inner chunks holding them read straight into a fresh array
        (:meth:`rows_into`)."""
        if hi <= lo:
            return np.empty((0, *self.row_shape), self.dtype)
        if not (lo // self.chunk_rows == 0 and (hi - 1) // self.chunk_rows == self.n_chunks - 1):
            out = np.empty((hi - lo, *self.row_shape), self.dtype)
            self.rows_into(lo, hi, list(out.reshape(hi - lo, -1).view(np.uint8)))
            return out
        try:
            data = self._read(0, None)
        except FileNotFoundError:  # every chunk all fill value: Zarr stores no shard
            return np.full((hi - lo, *self.row_shape), self.fill, self.dtype)
        index = self._index(data[-self.index_bytes:])
        parts = []
        for c in range(self.n_chunks):
            offset, nbytes = int(index[c, 0]), int(index[c, 1])
            a, b = max(lo, c * self.chunk_rows) - c * self.chunk_rows, min(hi, (c + 1) * self.chunk_rows) - c * self.chunk_rows
            if offset == MISSING and nbytes == MISSING:
                parts.append(np.full((b - a, *self.row_shape), self.fill, self.dtype))
                continue
            self._check_size(c, nbytes)
            chunk = data[offset:offset + nbytes]
            if len(chunk) != nbytes:
                raise damaged(self.path, f"inner chunk {c} runs past the end of the shard")
            self._check(chunk, f"inner chunk {c}")
            parts.append(chunk[:-CRC_BYTES].view(self.dtype).reshape(self.chunk_rows, *self.row_shape)[a:b])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rows_into(self, lo: int, hi: int, dests: Sequence[np.ndarray | None]) -> None:
        """Rows ``lo..hi-1`` of the shard written into ``dests`` (one per row: a uint8 array of a row's bytes, or
        None for a row not wanted), read from the stored bytes straight into them and checksummed as they land:
        no block buffer and no copy after the read (:class:`student.stream.BlockRows` reads a sample's rows of
        every array into the one buffer the sample keeps). Each inner chunk holding a wanted row is read whole
        (its checksum covers all of it); rows not wanted land in a scratch row."""
        if len(dests) != hi - lo:
            raise ValueError(f"{len(dests)} destinations for rows {lo}..{hi - 1}")
        if all(d is None for d in dests):
            return
        row_bytes = self.chunk_bytes // self.chunk_rows
        index = self._chunk_index()
        scratch = None
        for c in range(lo // self.chunk_rows, (hi - 1) // self.chunk_rows + 1):
            start = c * self.chunk_rows
            wanted = [dests[p - lo] if lo <= p < hi else None for p in range(start, start + self.chunk_rows)]
            if all(d is None for d in wanted):
                continue
            offset, nbytes = (MISSING, MISSING) if index is None else (int(index[c, 0]), int(index[c, 1]))
            if offset == MISSING and nbytes == MISSING:  # all fill value: not stored
                fill = np.full(self.row_shape, self.fill, self.dtype).reshape(-1).view(np.uint8)
                for d in wanted:
                    if d is not None:
                        d[...] = fill
                continue
            self._check_size(c, nbytes)
            if scratch is None and any(d is None for d in wanted):
                scratch = np.empty(row_bytes, np.uint8)
            stored = np.empty(CRC_BYTES, np.uint8)
            with self._source(offset, offset + nbytes) as (n, fill_from):
                if n != nbytes:
                    raise damaged(self.path, f"inner chunk {c} runs past the end of the shard")
                crc = self._land([scratch if d is None else d for d in wanted] + [stored], fill_from, nbytes - CRC_BYTES)
            if crc != int(stored.view("<u4")[0]):
                raise damaged(self.path, f"inner chunk {c} does not match its crc32c checksum")

    def _chunk_index(self) -> np.ndarray | None:
        """The shard's checked index (kept in ``indexes`` when given, for the shard's next blocks), or None when
        the shard is not stored (every chunk all fill value)."""
        index = self.indexes.get(self.path) if self.indexes is not None else None
        if index is None:
            try:
                index = self._index(self._read(-self.index_bytes, None))
            except FileNotFoundError:  # every chunk all fill value: Zarr stores no shard
                return None
            if self.indexes is not None:
                if len(self.indexes) >= MAX_INDEXES:  # the oldest out
                    del self.indexes[next(iter(self.indexes))]
                self.indexes[self.path] = index.copy()  # not a view of a buffer that is reused
        return index

    def _read(self, start: int, end: int | None) -> np.ndarray:
        """Bytes ``start..end`` of the shard (``start`` < 0: from the end) as a fresh writable uint8 array: a
        local file read straight into it, an object store's response copied into it."""
        with self._source(start, end) as (n, fill):
            out = np.empty(n, np.uint8)
            self._land([out], fill, 0)
        return out

    def _source(self, start: int, end: int | None) -> contextlib.AbstractContextManager[tuple[int, Fill]]:
        """``(n, fill)`` for bytes ``start..end`` of the shard (``start`` < 0: from the end): their number, and
        ``fill(view, at)``, which writes the next of them (``at`` written before) into ``view`` and returns how
        many it wrote: ``open_range``'s when given (S3: a GET read from the socket into ``view``,
        :class:`pipeline.s3_ranges.RangeReader`, or obstore's response copied in), else a local file's
        ``readinto`` or fsspec's bytes copied in."""
        if self.open_range is not None:
            return self.open_range(start, end)
        if isinstance(self.fs, LocalFileSystem):
            return file_range(self.path, start, end)
        return buffer_range(self.fs.cat_file(self.path, start=start, end=end))

    def _land(self, dests: Sequence[np.ndarray], fill: Fill, checked: int) -> int:
        """Fill ``dests`` (uint8 arrays, in the order of the bytes) from ``fill`` (:meth:`_source`), :data:`PIECE`
        bytes at a time; returns the crc32c of the first ``checked`` bytes, each piece checksummed while it is
        still in the core's cache instead of read back from memory after the whole block: ``RawShard.rows`` of
        64-row chunks of ViT-L's three taps from the page cache, 0.534 → 0.491 ms of CPU a sample for read +
        checksum (medians of 30 interleaved rounds, per-round ratio 0.92, quartiles 0.87–0.95; 0.91–0.92 with
        pieces of 128 KiB to 1 MiB; scratch /tmp/s23/fuse_ab4.py and fuse_ab3.py, 2026-12-02). From S3 (moto on
        the same cores) the client's CPU a sample went 1.18 → 1.14 ms, a change its noise does not resolve
        (per-round ratio 0.99, quartiles 0.90–1.12, 20 rounds; scratch /tmp/s23/s3_ab.py)."""
        crc, at = 0, 0
        for out in dests:
            view, got = memoryview(out), 0
            while got < len(out):
                k = fill(view[got:got + PIECE], at)
                if not k:
                    raise CacheError(f"{self.path}: read {at} bytes, then nothing; the shard changed while read")
                if at < checked:  # an ndarray: the C extension's "y#" refuses a memoryview
                    crc = google_crc32c.extend(crc, out[got:got + min(k, checked - at)])
                got, at = got + k, at + k
        return crc

    def _check_size(self, c: int, nbytes: int) -> None:
        if nbytes != self.chunk_bytes + CRC_BYTES:
            raise damaged(self.path, f"inner chunk {c} is {nbytes} bytes, expected {self.chunk_bytes + CRC_BYTES} "
                                     f"for rows {self.row_shape} {self.dtype}")

    def _index(self, raw: np.ndarray) -> np.ndarray:
        if len(raw) != self.index_bytes:
            raise damaged(self.path, f"the shard index is {len(raw)} bytes, expected {self.index_bytes}")
        self._check(raw, "the shard index")
        return raw[:-CRC_BYTES].view("<u8").reshape(self.n_chunks, 2)

    def _check(self, block: np.ndarray, what: str) -> None:
        stored = int(block[-CRC_BYTES:].view("<u4")[0])
        if google_crc32c.value(block[:-CRC_BYTES]) != stored:  # as Zarr's crc32c codec computes it
            raise damaged(self.path, f"{what} does not match its crc32c checksum")
