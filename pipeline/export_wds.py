"""``kdcache export-wds``: a cache as plain WebDataset tars, readable with ``webdataset`` alone.

One output tar per input tar, ``OUT/shard-{i:06d}.tar`` for input tar ``i``, its samples in the
input's order, each under its original key (``__key__``):

    KEY.jpg|jpeg|png|webp   the original image member, byte for byte (never decoded)
    KEY.json                the original metadata member, when the input tar has one
    KEY.cls                 the label
    KEY.views.json          a list over views of the view record (crop, flip, ops, erase, noise_seed;
                            for a cache of mixed views also mix: partner position, mode, lam, box)
    KEY.NAME.npy            each target array ``[num_views, ...]`` (logits, taps, scales, pred_top1,
                            fingerprint), the stored bytes: the cache's dtype, no dequantisation

Samples the cache skipped (``valid`` = 0: undecodable or unlabelled in the input) are left out and
counted. Beside the tars: ``cache-manifest.json`` (the cache's manifest: teacher, k, taps, dtypes;
not named ``manifest.json``, which would make ``kdcache ls`` and ``--root`` take the export for a
cache), a done-record ``shard-{i:06d}.json`` written right after each tar, and ``export.json``,
written last. Each tar is written to a local temporary file and then moved or uploaded whole, so a
reader never sees half a tar; a rerun keeps every tar whose done-record names this cache and whose
sha256 still matches. ``.npy`` members are written by numpy with ``allow_pickle=False``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm
from webdataset import TarWriter

from storage_schemas import arrays as A
from storage_schemas.errors import ConfigError
from storage_schemas.manifest import Manifest
from storage_schemas.version import IncompatibleSchemaError

from .store import FILE_MODE, CacheStore, atomic_write, url_to_fs

# The tar reading and grouping the caching job indexed the tars with, so keys and positions agree.
from .tars import IMAGE_EXTS, BadTarError, TarDamaged, raw_groups

# What ``decode_view`` turns into a ViewRecord: exported in views.json, not as .npy.
VIEW_RECORD_ARRAYS = A.VIEW_RECORD_ARRAYS
CACHE_MANIFEST = "cache-manifest.json"
EXPORT = "export.json"
FORMAT = ("WebDataset, one tar per input tar, samples in input order under their original keys: "
          "KEY.<jpg|jpeg|png|webp> the original image bytes, KEY.json the original metadata (if any), "
          "KEY.cls the label, KEY.views.json a list over views of the view record, KEY.<array>.npy each "
          "target array [num_views, ...] as stored (see arrays); cached-but-skipped samples left out")


class ExportConflictError(ConfigError):
    """OUT_URL already holds an export of a different cache, or files this export would overwrite."""


def tar_name(tar: int) -> str:
    return f"shard-{tar:06d}.tar"


def record_name(tar: int) -> str:
    return f"shard-{tar:06d}.json"


def exported_arrays(m: Manifest) -> list[str]:
    """The arrays exported as ``NAME.npy``: every array but label, valid and the view-record arrays."""
    return [n for n in m.arrays if n not in (A.LABEL, A.VALID, *VIEW_RECORD_ARRAYS)]


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` in .npy format, dtype and shape kept; refuses object arrays (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def export_wds(cache_url: str, out_url: str, *, storage_options: dict | None = None,
               out_storage_options: dict | None = None, input_storage_options: dict | None = None,
               allow_partial: bool = False, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Export the cache at ``cache_url`` to WebDataset tars under ``out_url`` (see the module docstring).

    With ``allow_partial``, an unfinished cache exports the tars whose every view is cached;
    the others are listed under ``missing`` in ``export.json``. Returns ``export.json``'s content.
    """
    store = CacheStore(cache_url, storage_options, read_only=True)
    m = store.read_manifest(allow_partial=allow_partial)
    ident = getattr(m, "identity", None) or m.content_identity()
    fs, root = url_to_fs(out_url, out_storage_options)
    _check_out(fs, root, out_url, m, ident, cache_url)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    atomic_write(fs, f"{root}/{CACHE_MANIFEST}", m.model_dump_json(indent=1).encode())  # claims OUT before any tar

    V, shards = m.num_views, m.dataset.shards
    if m.status == "complete":
        ready = list(range(len(shards)))
    else:
        done = store.completed_units()
        ready = [i for i in range(len(shards)) if all((i, v) in done for v in range(V))]
    records = {i: rec for i in ready if (rec := _done_record(fs, root, i, ident, V)) is not None}
    todo = [i for i in ready if i not in records]
    if records:
        log(f"{out_url}: {len(records)} tar(s) already exported (done-record and sha256 match), kept")
    bar = tqdm(total=sum(shards[i].count for i in todo), desc="export-wds", unit="sample", disable=not progress)
    try:
        for i in todo:
            rec = _export_tar(store, m, i, fs, root, input_storage_options, bar)
            records[i] = {**rec, "identity": ident, "num_views": V}
            atomic_write(fs, f"{root}/{record_name(i)}", json.dumps(records[i], indent=1).encode())
    finally:
        bar.close()

    export = {
        "cache_url": cache_url,
        "identity": ident,
        "num_views": V,
        "cache_status": m.status,
        "manifest": CACHE_MANIFEST,
        "format": FORMAT,
        "arrays": {n: {"dtype": m.arrays[n].dtype, "shape": [V, *m.arrays[n].shape[2:]]} for n in exported_arrays(m)},
        "shards": [{k: records[i][k] for k in ("tar", "input", "samples", "skipped", "sha256", "bytes")}
                   for i in ready],
        "missing": [shards[i].url for i in range(len(shards)) if i not in records],
    }
    atomic_write(fs, f"{root}/{EXPORT}", json.dumps(export, indent=1).encode())
    n, skipped = sum(s["samples"] for s in export["shards"]), sum(s["skipped"] for s in export["shards"])
    log(f"{out_url}: {len(ready)} tar(s), {n} samples × {V} views, {skipped} skipped sample(s) left out"
        + (f"; {len(export['missing'])} tar(s) not cached yet, not exported" if export["missing"] else ""))
    return export


# ------------------------------------------------------------------------------------- one tar


def _export_tar(store: CacheStore, m: Manifest, i: int, fs: Any, root: str, input_storage_options: dict | None,
                bar: tqdm) -> dict:
    """Write ``shard-{i}.tar`` whole (temporary file, then rename or upload); its done-record fields."""
    sh = m.dataset.shards[i]
    url, count = sh.url, sh.count
    keys = store.read_index(i)
    in_fs, in_path = url_to_fs(url, input_storage_options)
    size = in_fs.size(in_path)
    if size is not None and size != sh.size:
        raise BadTarError(url, f"changed since it was cached: {size} bytes, the cache recorded {sh.size}")
    names = exported_arrays(m)
    views = [n for n in VIEW_RECORD_ARRAYS if n in m.arrays]
    rows = _RowBlocks(store, m, i, [A.LABEL, A.VALID, *views, *names])
    on_bad = m.config.input.on_bad_sample
    local = isinstance(fs, LocalFileSystem)
    fd, tmp = tempfile.mkstemp(dir=root if local else None, prefix=".tmp-", suffix=".tar")
    samples = skipped = seen = 0
    try:
        with os.fdopen(fd, "wb") as f, TarWriter(f, encoder=False, user="kdcache", group="kdcache",
                                                 mtime=_mtime(m), format="PAX_FORMAT") as w:
            for position, key, group in _raw_samples(url, in_fs, in_path, on_bad, truncated=sh.truncated is not None):
                if position >= len(keys) or keys[position] != key:
                    cached = repr(keys[position]) if position < len(keys) else "no sample"
                    raise BadTarError(url, f"key {key}: the tar changed since it was cached: position {position} "
                                             f"holds {key!r}, the cache has {cached}")
                seen = position + 1
                r = rows.at(position)
                bar.update(1)
                if not r[A.VALID].any():
                    skipped += 1
                    continue
                if not r[A.VALID].all():
                    raise BadTarError(url, f"key {key}: cached in views {np.flatnonzero(r[A.VALID]).tolist()} "
                                             f"only, of {m.num_views}; rerun the cache job")
                w.write(_entry(url, key, group, r, views, names))
                samples += 1
        if seen != count:
            raise BadTarError(url, f"the tar changed since it was cached: {seen} samples read, the cache has {count}")
        with open(tmp, "rb") as f:
            sha, nbytes = _sha256(f), os.path.getsize(tmp)
        dest = f"{root}/{tar_name(i)}"
        if local:
            os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600 files; an export is meant to be read by other teams
            os.replace(tmp, dest)
        else:
            fs.put_file(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"tar": tar_name(i), "input": url, "samples": samples, "skipped": skipped, "sha256": sha, "bytes": nbytes}


def _raw_samples(url: str, fs: Any, path: str, on_bad_sample: str, *, truncated: bool
                 ) -> Iterator[tuple[int, str, dict[str, bytes | None]]]:
    """``(position, key, {ext: bytes})`` of the input tar, grouped as the caching job indexed it."""
    try:
        yield from raw_groups(url, fs, path, on_bad_sample)
    except TarDamaged as exn:
        if not truncated:  # it was whole when cached
            raise BadTarError(url, f"the tar changed since it was cached: {exn.reason}") from exn


def _entry(url: str, key: str, group: dict[str, bytes | None], r: dict[str, np.ndarray], views: list[str],
           names: list[str]) -> dict[str, Any]:
    """One sample's tar members; checks the tar's image and label against the cache row."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        raise BadTarError(url, f"key {key}: the tar changed since it was cached: no image member now")
    label = int(r[A.LABEL][0])
    try:
        tar_label = int(group["cls"]) if group.get("cls") is not None else None
    except ValueError:
        tar_label = None
    if tar_label != label:
        raise BadTarError(url, f"key {key}: the tar changed since it was cached: label "
                                 f"{group.get('cls', b'(none)')[:20]!r} in the tar, {label} in the cache")
    record_rows = {n: r[n] for n in views}
    out = {
        "__key__": key,
        ext: group[ext],
        "cls": str(label).encode(),
        "views.json": json.dumps([A.decode_view(record_rows, v).model_dump(mode="json")
                                  for v in range(len(r[A.VALID]))]).encode(),
    }
    if group.get("json") is not None:
        out["json"] = group["json"]
    for n in names:
        out[f"{n}.npy"] = npy_bytes(r[n])
    return out


class _RowBlocks:
    """Cache rows of one tar, all views at once, read ``m.chunk_rows`` rows (one Zarr chunk) at a time, each
    view's through :meth:`CacheStore.read_unit` (the student's and verify's one way to read rows: raw shards
    without Zarr's copies, a damaged shard a :class:`CacheError` naming it).

    Only the manifest's ``num_views`` views: a growth under way may have widened the arrays already.
    """

    def __init__(self, store: CacheStore, m: Manifest, tar: int, names: list[str]):
        self.store, self.m, self.tar, self.names = store, m, tar, names
        self.start, self.rows = -1, {}

    def at(self, position: int) -> dict[str, np.ndarray]:
        """Each array's row ``[num_views, ...]`` at ``position`` of the tar."""
        start = position - position % self.m.chunk_rows
        if start != self.start:
            stop = start + self.m.chunk_rows
            views = [self.store.read_unit(self.m, self.tar, v, self.names, start, stop)
                     for v in range(self.m.num_views)]
            self.rows = {n: np.stack([v[n] for v in views], axis=1) for n in self.names}
            self.start = start
        return {n: a[position - start] for n, a in self.rows.items()}


# ------------------------------------------------------------------------------------- OUT_URL


def _check_out(fs: Any, root: str, out_url: str, m: Manifest, ident: str, cache_url: str) -> None:
    """Refuse an OUT_URL that holds an export of another cache, or tars no export wrote."""
    path = f"{root}/{CACHE_MANIFEST}"
    if fs.exists(path):
        try:
            prev = Manifest.parse(fs.cat_file(path).decode(), where=f"{out_url}/{CACHE_MANIFEST}")
        except (ValueError, IncompatibleSchemaError) as e:
            raise ExportConflictError(f"{out_url}/{CACHE_MANIFEST} is not a manifest this kdcache reads ({e}); "
                                      "export to another OUT_URL") from e
        prev_ident = prev.identity or prev.content_identity()
        if prev_ident != ident and prev_ident not in {h.identity for h in m.history}:
            prev_url = "unknown"
            if fs.exists(f"{root}/{EXPORT}"):
                prev_url = json.loads(fs.cat_file(f"{root}/{EXPORT}")).get("cache_url", "unknown")
            raise ExportConflictError(
                f"{out_url} already holds an export of cache {prev_ident[:12]} (teacher {prev.teacher.model}, from "
                f"{prev_url}); {cache_url} is a different cache (teacher {m.teacher.model}, identity {ident[:12]}). "
                f"Export it to another OUT_URL, or delete {out_url} first")
    elif fs.exists(f"{root}/{EXPORT}") or fs.glob(f"{root}/shard-*.tar"):
        raise ExportConflictError(f"{out_url} holds shard tars or an {EXPORT} but no {CACHE_MANIFEST}: not an "
                                  "export of this cache; export to another OUT_URL")


def _done_record(fs: Any, root: str, i: int, ident: str, num_views: int) -> dict | None:
    """The done-record of tar ``i`` if it names this cache and view count and the tar's sha256 matches."""
    path, tar = f"{root}/{record_name(i)}", f"{root}/{tar_name(i)}"
    if not fs.exists(path) or not fs.exists(tar):
        return None
    rec = json.loads(fs.cat_file(path))
    if rec.get("identity") != ident or rec.get("num_views") != num_views:
        return None
    with fs.open(tar, "rb") as f:
        return rec if _sha256(f) == rec.get("sha256") else None


def _sha256(f: Any) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 22):
        h.update(chunk)
    return h.hexdigest()


def _mtime(m: Manifest) -> int:
    """Member mtime: the cache's creation time, so reruns write the same bytes (whole seconds: a
    fractional one costs a PAX header per member)."""
    return int(dt.datetime.fromisoformat(m.created).timestamp())
