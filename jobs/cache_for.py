"""``kdcache cache --for vitkd,scalekd`` (or ``targets.for`` in a cache config): the targets a set of KD
methods needs, derived from what each method states it needs (``KDMethod.requires``, with its
published default options) instead of matching tap names by convention.

The derived taps, logits and TPP tail are added to what the config lists; ``targets.for`` itself is
not stored: the cache records what it holds, so two configs that ask for the same targets, one by
listing them and one by naming methods, make the same cache (same identity).
"""

from __future__ import annotations

from storage_schemas.config import CacheConfig, TPPConfig
from storage_schemas.errors import ConfigError
from student.methods import needs_of


def resolve_targets_for(cfg: CacheConfig) -> CacheConfig:
    """``cfg`` with ``targets.for`` expanded into ``targets.features`` / ``tpp`` (and checked against
    ``logits``); unchanged when it names no methods."""
    t = cfg.targets
    if not t.for_methods:
        return cfg
    methods = "+".join(t.for_methods)
    try:
        needs = needs_of(methods)
    except ConfigError as e:
        raise ConfigError(f"targets.for: {e}") from e
    features = list(t.features)
    for spec in needs.taps:
        # a norm tap is the last level by definition; others are matched as written (-1 and 11 are
        # not known to be one level before the teacher is loaded: both are then cached, correctly)
        if any((f.norm and spec.norm) or (f.index, f.norm) == (spec.index, spec.norm) for f in features):
            continue
        if any(f.name == spec.name for f in features):
            clash = next(f for f in features if f.name == spec.name)
            raise ConfigError(f"targets.for: {methods} need tap {spec.yaml()}, but targets.features names "
                              f"{clash.yaml()} {spec.name!r}; rename one of them")
        features.append(spec)
    if needs.logits and t.logits is None:
        raise ConfigError(f"targets.for: {methods} need the teacher's logits, but targets.logits is null; "
                          "remove that line (default: top-10) or set targets.logits: {mode: full}")
    tpp = t.tpp or (TPPConfig() if needs.tpp else None)
    targets = t.model_copy(update={"features": features, "tpp": tpp, "for_methods": []})
    return cfg.model_copy(update={"targets": targets})
