"""Part 4 of :mod:`bench.scale`: bytes per view at real shapes, as the job stored them and through the other
codecs (int8, with and without zstd), written as the cache writes a unit."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.store import CacheStore
from storage_schemas import arrays as A
from storage_schemas.codecs import tap_codec

from .spec import SWIN, VIT


def stored_bytes(arrays: dict[str, np.ndarray], specs: dict, *, rows_per_shard: int, chunk_rows: int,
                 compress: bool = True) -> int:
    """Bytes Zarr stores for one unit's rows ``arrays[name]`` [count, ...] laid out as the cache lays out a unit
    (one shard of ``rows_per_shard`` rows padded with the fill value, chunks of ``chunk_rows`` rows, the cache's
    codec chain, zstd unless not ``compress``), written to memory; ``specs[name]`` is its
    :class:`storage_schemas.arrays.ArraySpec`."""
    import zarr

    objects: dict = {}
    g = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w", zarr_format=3)
    for name, rows in arrays.items():
        s = specs[name]
        arr = g.create_array(name, shape=s.shard_shape(rows_per_shard), dtype=s.dtype,
                             chunks=s.chunk_shape(chunk_rows), shards=s.shard_shape(rows_per_shard), fill_value=s.fill,
                             **A.zarr_codecs(compress))
        block = np.full(s.shard_shape(rows_per_shard), s.fill, dtype=s.dtype)
        block[: len(rows), 0] = rows
        arr[...] = block
    return sum(len(v.to_bytes()) for k, v in objects.items() if not k.endswith("zarr.json"))


def tap_bytes_per_view(url: str, tap: str, dtype: str, compress: bool = True) -> float:
    """Bytes per view of ``tap`` had the cache at ``url`` (fp16 taps) stored it as ``dtype``, with zstd or not
    (``output.feature_compression``): its stored tokens, decoded, encoded by the ``dtype`` codec and written as the
    cache writes a unit (:func:`stored_bytes`)."""
    store = CacheStore(url, read_only=True)
    m = store.read_manifest()
    info = next(t for t in m.features if t.name == tap)
    src, dst = tap_codec(info), tap_codec(info.model_copy(update={"dtype": dtype}))
    specs = {s.name: s for s in dst.arrays()}
    total, views = 0, 0
    for tar in range(len(m.dataset.shards)):
        for view in range(m.num_views):
            rows = store.read_unit(m, tar, view, [*src.names, A.VALID])
            x = src.decode({k: torch.from_numpy(np.asarray(rows[k])) for k in src.names})
            enc, _ = dst.encode(x)
            total += stored_bytes({k: v.numpy() for k, v in enc.items()}, specs, rows_per_shard=m.rows_per_shard,
                                  chunk_rows=m.chunk_rows, compress=compress)
            views += int(rows[A.VALID].sum())
    return total / views


def bytes_table(caches: dict[str, str]) -> dict:
    """Bytes per view of every target of the kept caches: as stored (fp16 taps, the default chain), and each tap
    as fp16 and int8, with zstd and without (``_raw``), through :func:`tap_bytes_per_view`, the stored way
    recomputed too as a check; the TPP pack's bytes."""
    out: dict = {"per_view": {}, "tpp_pack_bytes": {}, "check_fp16_recomputed_vs_stored": {}}
    short = {SWIN: "swinl", VIT: "vitl"}
    for model, url in caches.items():
        m = CacheStore(url, read_only=True).read_manifest()
        s = m.summary()
        key = short[model]
        out["per_view"][f"logits_top10[{key}]"] = s["targets"]["logits"]["bytes_per_view"]
        taps = [t for t in s["targets"] if t.startswith("feature:")]
        for dtype, compress in (("fp16", True), ("int8", True), ("fp16", False), ("int8", False)):
            total, raw = 0.0, "" if compress else "_raw"
            for t in taps:
                name = t.split(":", 1)[1]
                b = tap_bytes_per_view(url, name, dtype, compress)
                out["per_view"][f"{t}[{key}, {dtype}{raw}]"] = b
                total += b
                if dtype == "fp16" and compress == m.compressed(tap_codec(m.tap(name)).names[0]):  # as stored
                    out["check_fp16_recomputed_vs_stored"][f"{t}[{key}]"] = b / s["targets"][t]["bytes_per_view"]
            label = "scalekd_swinl_final" if model == SWIN else "vitkd_3taps"
            out["per_view"][f"{label}_{dtype}{raw}"] = total
        out["per_view"][f"all_targets_as_stored[{key}]"] = s["bytes_per_view"]
        out["tpp_pack_bytes"][model] = s["targets"]["tpp"]["bytes"]
        out["tpp_num_params"] = {**out.get("tpp_num_params", {}), model: s["targets"]["tpp"]["num_params"]}
    return out
