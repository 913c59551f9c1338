"""The TPP pack's files in a cache store, written without torch.

The caching job's driver writes the pack (``TPP_WEIGHTS`` + ``TPP_SPEC``) and, at the end, the tail's
input statistics (``TPP_STATS``), but never runs the teacher: the probe on a Ray worker serialises the
tail's tensors (:func:`pipeline.tpp.pack_weights`) and the driver only stores bytes and numbers. Keeping
this module free of torch keeps the driver (and ``kdcache verify``/``inspect``) free of importing torch,
timm and torchvision: ~7 s of CPU at every ``kdcache cache`` before Ray even starts. Reading the pack back
(:func:`pipeline.tpp.load_pack`, :func:`pipeline.tpp.load_input_stats`) builds torch modules and stays there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import safetensors.numpy

from storage_schemas.layout import TPP_SPEC, TPP_STATS, TPP_WEIGHTS
from storage_schemas.tpp_spec import TPPSpec

from .store import CacheStore


def write_pack(store: CacheStore, weights: bytes, spec: TPPSpec) -> int:
    """Write the pack into ``store``: ``weights`` (safetensors bytes of the tail) as ``TPP_WEIGHTS``, then
    ``spec`` with their sha256 as ``TPP_SPEC`` JSON (last: its sha names the weights it belongs to, so
    :func:`pipeline.tpp.load_pack` detects a torn or mixed pack); bytes written."""
    spec_bytes = spec.with_weights(hashlib.sha256(weights).hexdigest()).to_json_bytes()
    store.write_bytes(TPP_WEIGHTS, weights)
    store.write_bytes(TPP_SPEC, spec_bytes)
    return len(weights) + len(spec_bytes)


def save_input_stats(store: CacheStore, mean, std, count: int) -> None:
    """Write ``TPP_STATS``: safetensors ``mean`` [C] and ``std`` [C] (float32), ``count`` [1] (int64).
    ``mean``/``std``: anything :func:`numpy.asarray` takes (float64 arrays, CPU tensors)."""
    store.write_bytes(TPP_STATS, safetensors.numpy.save({
        "mean": np.asarray(mean).astype(np.float32), "std": np.asarray(std).astype(np.float32),
        "count": np.array([count], dtype=np.int64)}))


def input_stats_of(sums: list[list[float]], sumsqs: list[list[float]], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, population std), float64, from per-unit channel sums and sums of squares over
    ``count`` tokens in all (each unit's completion record carries its sums)."""
    s1 = np.asarray(sums, dtype=np.float64).sum(0)
    s2 = np.asarray(sumsqs, dtype=np.float64).sum(0)
    mean = s1 / count
    return mean, np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
