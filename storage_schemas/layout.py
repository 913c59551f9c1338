"""Where things live inside a cache store (paths relative to the cache root): every key is formatted,
and where it must be read back, parsed, here and nowhere else."""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
# sha256 (hex) of the manifest's bytes, written right after it: the root of the integrity chain
# manifest → checksums.json → every other object, unit records → every array shard object.
MANIFEST_SHA256 = "manifest.json.sha256"
# {relative path: sha256} of every object that is not an array shard (those are in the unit
# records), written just before the final manifest, which records this file's sha256.
CHECKSUMS = "checksums.json"
# the writing job's lease (holder, heartbeat), present only while a job runs: see pipeline.lease
LEASE = "lease.json"
# present while a job grows a complete cache (more views or tars): who, when, what. The old
# manifest stays in place, so readers keep reading the cache's previous extent meanwhile.
GROWTH = "growth.json"
UNITS_DIR = "units"
INDEX_DIR = "index"
TPP_DIR = "tpp"
TPP_WEIGHTS = f"{TPP_DIR}/tail.safetensors"
TPP_SPEC = f"{TPP_DIR}/spec.json"
TPP_STATS = f"{TPP_DIR}/input_stats.safetensors"


_UNIT_RECORD = re.compile(r"s(\d+)-v(\d+)\.json")


def array_shard_key(name: str, tar: int, view: int, inner_dims: int) -> str:
    """Zarr v3 key of the shard object holding unit (``tar``, ``view``) of array ``name`` with ``inner_dims``
    dimensions after ``[rows, views]`` (the default chunk key encoding: ``NAME/c/i/j/0/…``)."""
    return "/".join([name, "c", str(tar), str(view)] + ["0"] * inner_dims)


def is_array_shard(rel: str) -> bool:
    """Whether ``rel`` is a Zarr v3 shard object of an array (``NAME/c/…``), covered by a completion record."""
    parts = rel.split("/")
    return len(parts) > 2 and parts[1] == "c"


def unit_record_path(tar: int, view: int) -> str:
    """Completion record of work unit (input tar ``tar``, ``view``), written after its data."""
    return f"{UNITS_DIR}/s{tar:06d}-v{view:04d}.json"


def parse_unit_record_name(name: str) -> tuple[int, int] | None:
    """``(tar, view)`` of a completion record's file name (:func:`unit_record_path`'s last part), else None."""
    m = _UNIT_RECORD.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def index_path(tar: int) -> str:
    """Keys of input tar ``tar`` in order, written by the index pass."""
    return f"{INDEX_DIR}/s{tar:06d}.json"
