"""Where things live inside a cache store (paths relative to the cache root)."""

from __future__ import annotations

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


def is_array_shard(rel: str) -> bool:
    """Whether ``rel`` is a Zarr v3 shard object of an array (``NAME/c/…``), covered by a unit record."""
    parts = rel.split("/")
    return len(parts) > 2 and parts[1] == "c"


def unit_record_path(shard: int, view: int) -> str:
    """Completion record of work unit (input tar ``shard``, ``view``), written after its data."""
    return f"{UNITS_DIR}/s{shard:06d}-v{view:04d}.json"


def index_path(shard: int) -> str:
    """Keys of input tar ``shard`` in order, written by the index pass."""
    return f"{INDEX_DIR}/s{shard:06d}.json"
