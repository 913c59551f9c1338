"""Where things live inside a cache store (paths relative to the cache root)."""

from __future__ import annotations

MANIFEST = "manifest.json"
UNITS_DIR = "units"
INDEX_DIR = "index"
TPP_DIR = "tpp"
TPP_WEIGHTS = f"{TPP_DIR}/tail.safetensors"
TPP_SPEC = f"{TPP_DIR}/spec.json"
TPP_STATS = f"{TPP_DIR}/input_stats.safetensors"


def unit_record_path(shard: int, view: int) -> str:
    """Completion record of work unit (input tar ``shard``, ``view``), written after its data."""
    return f"{UNITS_DIR}/s{shard:06d}-v{view:04d}.json"


def index_path(shard: int) -> str:
    """Keys of input tar ``shard`` in order, written by the index pass."""
    return f"{INDEX_DIR}/s{shard:06d}.json"
