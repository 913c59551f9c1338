"""The cache store: Zarr arrays, completion records, index and manifest behind any fsspec URL.

Write discipline (see DESIGN.md "Cache layout"):
- array metadata and a ``building`` manifest are written once, by the driver, before any unit;
- a unit (input tar, view) writes one whole Zarr shard per array in one call (never two
  writers on one shard), then its completion record — so a record's presence means its
  data is complete; a crash before it leaves a unit that a rerun recomputes whole;
- ``manifest.json`` with ``status: complete`` is written last.
Local files are replaced atomically (write to a temporary name, then rename); object
stores make each PUT atomic themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import partial
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from obstore.exceptions import BaseError as ObstoreError

from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.errors import CacheError
from storage_schemas.manifest import Manifest, UnitCompletion

from . import s3_reads
from .buffers import ReusedBuffers
from .crash_points import crash_point
from .raw_shards import RawShard, buffer_range, damaged, is_raw_sharded
from .s3_ranges import RangeReader


class CacheNotReadyError(CacheError):
    """The cache has no manifest, or its manifest is not complete."""


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a cache is shared between teams, so stored objects get the mode a
# plain open() would give them (0666 minus the umask), like the files Zarr writes itself.
FILE_MODE = 0o666 & ~_umask()


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, name: str | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: a local file through a temporary name and a rename
    (mode as a plain ``open`` would give), an object store in one PUT (atomic by itself). Every object
    kdcache writes outside Zarr (cache objects, exports, checkpoints) goes through here. ``name`` (default:
    the file name) names its :mod:`~pipeline.crash_points`."""
    name = name or os.path.basename(path)
    crash_point(f"write:{name}")
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        crash_point(f"wrote:{name}")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        crash_point(f"rename:{name}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    crash_point(f"wrote:{name}")


# A local file's temporary copy, which a writer killed between writing and renaming it leaves behind:
# ``atomic_write``'s (mkstemp prefix) and Zarr LocalStore's (``NAME.<uuid4 hex>.partial``).
_DEBRIS = re.compile(r"(^|/)\.tmp-[^/]*$|\.[0-9a-f]{32}\.partial$")


def is_debris(rel: str) -> bool:
    """Whether ``rel`` is a temporary file left by a writer killed mid-write (never part of a cache)."""
    return _DEBRIS.search(rel) is not None


_UNSET = object()


class CacheStore:
    """A kdcache store at ``url`` (local path, ``file://``, ``s3://``, ``memory://`` …); one per process (open
    another in a forked or spawned one: s3fs's and obstore's clients do not cross a fork)."""

    def __init__(self, url: str, storage_options: dict | None = None, *, read_only: bool = False) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self.fs, self.root = url_to_fs(url, self.storage_options)
        self._arrays: dict[str, zarr.Array] = {}
        self._raw: dict[str, bool] = {}  # whether an array is read by raw_shards (uncompressed, kdcache's chain)
        self._indexes: dict[str, np.ndarray] = {}  # raw shards' indexes, kept when read-only (see RawShard)
        # this process's reused memory (pipeline.buffers): each sample's rows of the arrays read by the block
        # (student.stream.BlockRows)
        self.row_buffers = ReusedBuffers()
        self._group: zarr.Group | None = None
        self._s3: Any = _UNSET  # read-only S3: arrays read through obstore (pipeline.s3_reads), else None: fsspec
        self._ranges: RangeReader | None = None  # with obstore: raw shards' GETs read into the caller's buffers

    def _obstore(self):
        """The obstore store the cache's arrays are read through, or None (fsspec reads them); chosen at the
        first read (:func:`pipeline.s3_reads.s3_config`), with the :class:`~pipeline.s3_ranges.RangeReader` that
        reads the raw shards for the same bucket and credentials where it can."""
        if self._s3 is _UNSET:
            got = s3_reads.s3_config(self.url, self.storage_options) if self.read_only else None
            self._s3 = None if got is None else s3_reads.store_for(*got)
            self._ranges = RangeReader(*got) if got is not None and RangeReader.usable() else None
        return self._s3

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["row_buffers"] = ReusedBuffers()  # not this process's
        if state["_s3"] not in (None, _UNSET):  # obstore's client is per process: chosen again where unpickled
            state.update(_s3=_UNSET, _ranges=None, _group=None, _arrays={})
        return state

    # --- plain objects ------------------------------------------------------------

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.read_only:
            raise PermissionError(f"{self.url} is open read-only; refusing to write {rel}")
        atomic_write(self.fs, self.path(rel), data, name=rel)

    def remove(self, rel: str) -> None:
        if self.read_only:
            raise PermissionError(f"{self.url} is open read-only; refusing to remove {rel}")
        crash_point(f"remove:{rel}")
        self.fs.rm(self.path(rel))
        crash_point(f"removed:{rel}")

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # --- manifest -----------------------------------------------------------------

    def has_manifest(self) -> bool:
        return self.exists(layout.MANIFEST)

    def read_manifest(self, *, allow_partial: bool = False) -> Manifest:
        """The manifest; refuses a missing one, an unknown schema major, or (unless
        ``allow_partial``) a cache still ``building``."""
        if not self.has_manifest():
            raise CacheNotReadyError(
                f"{self.url}: no {layout.MANIFEST}; this is not a kdcache cache, or its caching job never "
                "started. Run `kdcache cache CONFIG` to build it."
            )
        m = Manifest.parse(self.read_bytes(layout.MANIFEST).decode(), where=self.url)
        if m.status != "complete" and not allow_partial:
            raise CacheNotReadyError(
                f"{self.url}: cache is {m.status} ({m.units_complete}/{m.units_total} units recorded at the "
                "last manifest write). Finish it by rerunning its `kdcache cache` job (it resumes), or pass "
                "--allow-partial to read only the completed units."
            )
        return m

    def write_manifest(self, m: Manifest) -> None:
        data = m.model_dump_json(indent=1).encode()
        self.write_bytes(layout.MANIFEST, data)
        self.write_bytes(layout.MANIFEST_SHA256, hashlib.sha256(data).hexdigest().encode())

    # --- integrity ------------------------------------------------------------------

    def objects(self, *, debris: bool = False) -> list[str]:
        """Every object in the store, as paths relative to its root, sorted; with ``debris``, only the
        temporary files a killed writer left behind (see :func:`is_debris`), which are otherwise left out."""
        root = self.root.rstrip("/")
        rels = (p[len(root) + 1:] for p in self.fs.find(root) if p.startswith(root + "/"))
        return sorted(p for p in rels if is_debris(p) == debris)

    def remove_debris(self) -> list[str]:
        """Remove the temporary files of writers killed mid-write (the job calls it under its lease, when no
        one else writes); returns them."""
        found = self.objects(debris=True)
        for rel in found:
            self.fs.rm(self.path(rel))
        return found

    def checksummed_objects(self) -> list[str]:
        """The objects ``checksums.json`` covers: all but array shards (in the unit records) and
        the manifest, its sidecar and the checksums file itself."""
        skip = {layout.MANIFEST, layout.MANIFEST_SHA256, layout.CHECKSUMS, layout.LEASE, layout.GROWTH}
        return [p for p in self.objects() if p not in skip and not layout.is_array_shard(p)]

    def write_checksums(self) -> str:
        """Write ``checksums.json`` (sha256 of every :meth:`checksummed_objects`); returns its own sha256."""
        sums = {p: hashlib.sha256(self.read_bytes(p)).hexdigest() for p in self.checksummed_objects()}
        data = json.dumps(sums, indent=0, sort_keys=True).encode()
        self.write_bytes(layout.CHECKSUMS, data)
        return hashlib.sha256(data).hexdigest()

    # --- arrays -------------------------------------------------------------------

    def _zarr_store(self):
        if isinstance(self.fs, LocalFileSystem):
            return zarr.storage.LocalStore(self.root, read_only=self.read_only)
        if (s3 := self._obstore()) is not None:
            s3_reads.claim()
            return zarr.storage.ObjectStore(s3, read_only=True)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options,
                                                 read_only=self.read_only)

    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self._zarr_store(), mode="r" if self.read_only else "a", zarr_format=3)
        return self._group

    def create_arrays(self, m: Manifest) -> None:
        """Create every array of the manifest (metadata only), replacing same-named ones."""
        g = self.group()
        for name, info in m.arrays.items():
            g.create_array(
                name, shape=tuple(info.shape), dtype=info.dtype, chunks=tuple(info.chunks),
                shards=tuple(info.shards), fill_value=info.fill, overwrite=True,
                **A.zarr_codecs(m.compressed(name)),
            )
        self._arrays.clear()
        self._raw.clear()

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group()[name]
            except KeyError as e:
                raise KeyError(f"{self.url}: array {name!r} is not in this cache") from e
        return self._arrays[name]

    def read_shard_object(self, m: Manifest, name: str, tar: int, view: int) -> bytes:
        """The stored bytes of unit (``tar``, ``view``)'s Zarr shard of array ``name`` (b"" when all fill:
        Zarr stores no such shard); the manifest gives the array's rank, no Zarr metadata is read."""
        key = self.path(layout.array_shard_key(name, tar, view, len(m.arrays[name].shape) - 2))
        return self.fs.cat_file(key) if self.fs.exists(key) else b""

    def write_unit(
        self, m: Manifest, tar: int, view: int, data: dict[str, np.ndarray]
    ) -> tuple[dict[str, str], dict[str, int]]:
        """Write unit (tar, view): each array's rows ``[count, ...]`` padded to one whole
        Zarr shard. Returns sha256 and byte size of each stored shard object."""
        if set(data) != set(m.arrays):
            raise ValueError(
                f"unit s{tar} v{view}: arrays {sorted(set(data) ^ set(m.arrays))} missing or unexpected"
            )
        S = m.rows_per_shard
        shas, sizes = {}, {}
        for name, rows in data.items():
            arr = self.array(name)
            if rows.shape[0] > S or rows.shape[1:] != arr.shape[2:]:
                raise ValueError(f"unit s{tar} v{view}: {name} rows {rows.shape} do not fit {arr.shape}")
            block = np.full((S, 1, *arr.shape[2:]), arr.fill_value, dtype=arr.dtype)
            block[: rows.shape[0], 0] = rows
            arr[tar * S:(tar + 1) * S, view:view + 1] = block
            crash_point(f"shard:{name} t{tar} v{view}")
            stored = self.read_shard_object(m, name, tar, view)
            shas[name], sizes[name] = hashlib.sha256(stored).hexdigest(), len(stored)
        return shas, sizes

    def raw_shard(self, tar: int, view: int, name: str) -> RawShard | None:
        """Unit (``tar``, ``view``)'s shard of array ``name`` as a :class:`~pipeline.raw_shards.RawShard` when the
        array is stored uncompressed as kdcache stores it (:func:`~pipeline.raw_shards.is_raw_sharded`; the taps
        by default), read without Zarr's copies (from S3 through obstore where it can); else None: Zarr reads it.
        A read-only store keeps each shard's index for the next reads of a part of it."""
        arr = self.array(name)
        if self._raw.get(name) is None:
            self._raw[name] = is_raw_sharded(arr)
        if not self._raw[name]:
            return None
        rel = layout.array_shard_key(name, tar, view, arr.ndim - 2)
        key = self.path(rel)
        s3, url = self._obstore(), f"s3://{key}"
        if self._ranges is not None:  # straight from the socket into the rows' buffers
            open_range = partial(self._ranges.open, rel, name=url)
        elif s3 is not None:
            def open_range(start: int, end: int | None):
                return buffer_range(s3_reads.get(s3, rel, start, end, name=url))
        else:
            open_range = None
        return RawShard(self.fs, key, arr, open_range, self._indexes if self.read_only else None)

    def read_unit(
        self, m: Manifest, tar: int, view: int, names: list[str] | None = None, lo: int = 0, hi: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Rows ``[count, ...]`` of unit (tar, view) for ``names`` (default: all arrays); with ``lo``/``hi``
        only the tar's positions ``lo..hi-1`` (Zarr then reads only the chunks holding them)."""
        S, count = m.rows_per_shard, m.dataset.shards[tar].count
        hi = count if hi is None else min(hi, count)
        out = {}
        for n in list(m.arrays) if names is None else names:
            raw = self.raw_shard(tar, view, n)
            if raw is not None:  # uncompressed (the taps by default): read without Zarr's copies, see raw_shards
                out[n] = raw.rows(lo, hi)
                continue
            arr = self.array(n)
            key = self.path(layout.array_shard_key(n, tar, view, arr.ndim - 2))
            try:
                out[n] = arr[tar * S + lo: tar * S + hi, view]
            except ValueError as e:  # Zarr's crc32c codec: the stored bytes changed since they were written
                if "checksum" not in str(e):
                    raise
                raise damaged(key, f"{e} (array {n}, tar {tar}, view {view})") from e
            except ObstoreError as e:  # Zarr reading S3 through obstore
                raise s3_reads.request_error(e, f"s3://{key}") from e
        return out

    # --- completion records and index --------------------------------------------

    def write_unit_record(self, rec: UnitCompletion) -> None:
        self.write_bytes(layout.unit_record_path(rec.tar, rec.view), rec.model_dump_json().encode())

    def completed_units(self) -> set[tuple[int, int]]:
        d = self.path(layout.UNITS_DIR)
        self.fs.invalidate_cache(d)  # s3fs caches listings; records appear from other processes (the actors)
        if not self.fs.exists(d):
            return set()
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False))
        return {unit for unit in map(layout.parse_unit_record_name, names) if unit is not None}

    def read_unit_records(self) -> list[UnitCompletion]:
        return [
            UnitCompletion.model_validate_json(self.read_bytes(layout.unit_record_path(s, v)))
            for s, v in sorted(self.completed_units())
        ]

    def write_index(self, tar: int, url: str, keys: list[str]) -> None:
        self.write_json(layout.index_path(tar), {"url": url, "keys": keys})

    def read_index(self, tar: int) -> list[str]:
        return self.read_json(layout.index_path(tar))["keys"]

