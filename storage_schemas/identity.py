"""A cache's identity: a content key of what it caches, so teams find and reuse caches.

Two caches with the same identity hold the same bytes for every unit they both have:
the same teacher (timm name, kwargs, weights sha256, input size and normalisation), the
same input tars (the dataset fingerprint: URL, size and sample count of every tar, in
order), the same view recipe and the same targets. The number of views is *not* part of
it: view ``v`` of a sample is seeded by (recipe seed, tar, position, v) alone, so the first
N views of an M-view cache are exactly an N-view cache, and adding views grows a cache
without changing what it is a cache *of*. Adding tars changes the dataset, hence the
identity; the manifest's ``history`` keeps the earlier ones.

The *lineage* key is the identity without the dataset: caches of one teacher, recipe and
targets over different tars share it, which is how ``kdcache cache --root`` finds a cache
to extend with new tars.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SHORT = 12  # hex digits shown by ``kdcache ls``; any unique prefix of at least MIN_PREFIX names a cache
MIN_PREFIX = 6
TEACHER_FIELDS = ("model", "model_kwargs", "weights_sha256", "input_size", "mean", "std")


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def teacher_key(teacher: dict[str, Any]) -> dict[str, Any]:
    """The fields of a teacher (a ``TeacherInfo`` dump) that decide its outputs. ``stochastic_depth`` (schema
    1.5) counts only when on, so every cache of an eval-mode teacher keeps the identity it had before."""
    key = {k: list(teacher[k]) if isinstance(teacher[k], tuple) else teacher[k] for k in TEACHER_FIELDS}
    if teacher.get("stochastic_depth"):
        key["stochastic_depth"] = True
    return key


def recipe_dict(views: dict[str, Any]) -> dict[str, Any]:
    """The view recipe (a ``ViewRecipe`` JSON dump) without ``num_views``."""
    return {k: v for k, v in views.items() if k != "num_views"}


def lineage_key(teacher: dict[str, Any], views: dict[str, Any], targets: dict[str, Any]) -> str:
    """sha256 over teacher, view recipe (without ``num_views``) and targets: caches that differ only in
    their tars or number of views share it."""
    return _key({"teacher": teacher_key(teacher), "views": recipe_dict(views), "targets": targets})


def cache_identity(teacher: dict[str, Any], dataset_fingerprint: str, views: dict[str, Any],
                   targets: dict[str, Any]) -> str:
    """The content key (64 hex digits) of a cache: lineage key + dataset fingerprint."""
    return _key({"lineage": lineage_key(teacher, views, targets), "dataset": dataset_fingerprint})
