"""The manifest (``manifest.json``, written last) and the per-unit completion record."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .codecs import Codec, FidelityAcc, LogitsInfo, codecs_of, tap_codec
from .config import CacheConfig
from .errors import CacheError
from .identity import cache_identity, lineage_key
from .taps import TapInfo, TapSpec, find_serving
from .tpp_spec import TPPSpec
from .version import SCHEMA_VERSION, check_compatible, newer_minor, parse_version


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherInfo(_Model):
    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    num_prefix_tokens: int = 0
    num_levels: int | None = None  # forward_intermediates levels (blocks/stages); schema ≥ 1.3
    # drop-path on, seeded per view (pipeline.stochastic_depth); schema ≥ 1.5, written only when on
    stochastic_depth: bool = Field(False, exclude_if=lambda on: not on)


class DroppedMembers(_Model):
    key: str
    reason: str


class ShardInfo(_Model):
    url: str
    size: int  # bytes
    count: int  # samples
    truncated: str | None = None  # why the tar ends early (on_bad_sample: skip); samples after it are lost
    # members of a key dropped by on_bad_sample: skip (a repeated key, a repeated member): schema ≥ 1.5, written
    # only when there are some
    dropped: list[DroppedMembers] = Field(default_factory=list, exclude_if=lambda d: not d)


class DatasetInfo(_Model):
    shards: list[ShardInfo]
    fingerprint: str  # sha256 over (url, size, count) of every shard, in order

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)


class TPPInfo(_Model):
    family: str
    num_params: int
    bytes: int
    spec: TPPSpec  # tpp/spec.json without its weights_sha256


class ArrayInfo(_Model):
    shape: list[int]
    dtype: str
    chunks: list[int]
    shards: list[int]
    fill: float | int
    target: str

    @property
    def row_bytes(self) -> int:
        """Bytes of one (sample, view) row as decoded: the shape after its two leading axes."""
        return math.prod(self.shape[2:]) * np.dtype(self.dtype).itemsize


class SkippedSample(_Model):
    shard: int  # the input tar's index (stored name)
    url: str
    key: str
    reason: str

    @property
    def tar(self) -> int:
        return self.shard


class UnitCompletion(_Model):
    """Completion record of one work unit (input tar, view), written after all its data."""

    shard: int  # the input tar's index (stored name; ``tar`` in code)
    view: int
    url: str
    count: int  # samples in the tar (rows used)
    valid: int  # rows holding a cached sample
    correct: int  # rows where the teacher's top-1 equals the label
    skipped: list[SkippedSample] = Field(default_factory=list)
    array_sha256: dict[str, str]  # array name -> sha256 of the unit's stored shard object
    array_bytes: dict[str, int]
    fidelity: dict[str, FidelityAcc] = Field(default_factory=dict)
    tpp_input_sum: list[float] | None = None  # per-channel sums of the TPP tail input (float64)
    tpp_input_sumsq: list[float] | None = None
    tpp_input_count: int = 0
    seconds: float = 0.0

    @property
    def tar(self) -> int:
        return self.shard


class Stats(_Model):
    num_samples: int = 0
    num_valid_rows: int = 0
    num_skipped: int = 0
    skipped: list[SkippedSample] = Field(default_factory=list)
    bytes_total: int = 0
    bytes_per_target: dict[str, int] = Field(default_factory=dict)
    bytes_per_view: dict[str, float] = Field(default_factory=dict)
    fidelity: dict[str, dict[str, float]] = Field(default_factory=dict)
    teacher_top1: float | None = None  # percent, over all cached views
    samples_per_second: float | None = None
    seconds: float | None = None


class HistoryEntry(_Model):
    """One change to a cache: its creation, or a growth (more views, more tars)."""

    time: str
    user: str  # who ran the job: login name @ host
    action: Literal["create", "grow"]
    views: tuple[int, int]  # number of views before → after (0 → V at creation)
    shards_added: list[str] = Field(default_factory=list)  # tar URLs added (all of them at creation)
    identity: str  # the cache's identity after this change
    kdcache: str = "unknown"  # version of the library that made the change


class Manifest(_Model):
    schema_version: str = SCHEMA_VERSION
    status: Literal["building", "complete"]
    created: str
    updated: str
    library_versions: dict[str, str]
    config: CacheConfig  # the resolved config; credentials are never stored (the model excludes them)
    teacher: TeacherInfo
    dataset: DatasetInfo
    num_views: int
    rows_per_shard: int
    chunk_rows: int
    logits: LogitsInfo | None
    features: list[TapInfo]
    tpp: TPPInfo | None
    arrays: dict[str, ArrayInfo]
    units_total: int
    units_complete: int = 0
    stats: Stats = Stats()
    checksums_sha256: str | None = None  # sha256 of checksums.json (schema ≥ 1.1, complete caches)
    identity: str | None = None  # content key (storage_schemas.identity), schema ≥ 1.2; see content_identity()
    history: list[HistoryEntry] = Field(default_factory=list)  # creation and growths, oldest first (schema ≥ 1.2)

    @model_validator(mode="before")
    @classmethod
    def _zstd_before_1_8(cls, data: Any) -> Any:
        """Before schema 1.8, ``output.feature_compression`` was written only when "none": a manifest of 1.7 or
        earlier without it holds taps stored with zstd (the default then, and the only chain before 1.7)."""
        if not isinstance(data, dict) or parse_version(str(data.get("schema_version", SCHEMA_VERSION))) >= (1, 8):
            return data
        output = (data.get("config") or {}).get("output")
        if isinstance(output, dict) and "feature_compression" not in output:
            data = {**data, "config": {**data["config"], "output": {**output, "feature_compression": "zstd"}}}
        return data

    def content_identity(self) -> str:
        """The identity recomputed from the manifest's own fields (also for caches older than 1.2)."""
        d = self.config.public_dict()
        return cache_identity(self.teacher.model_dump(mode="json"), self.dataset.fingerprint, d["views"], d["targets"])

    def lineage(self) -> str:
        """The identity without the dataset: caches one can extend with more tars share it."""
        d = self.config.public_dict()
        return lineage_key(self.teacher.model_dump(mode="json"), d["views"], d["targets"])

    # --- targets ----------------------------------------------------------------------

    def codecs(self) -> list[Codec]:
        """Every stored target's codec: logits (if cached) first, then each tap, in manifest order."""
        return codecs_of(self.logits, self.features)

    def compressed(self, name: str) -> bool:
        """Whether array ``name`` is stored with zstd: all are, but the taps' when ``output.feature_compression``
        is ``none`` (schema >= 1.7)."""
        if self.config.output.feature_compression == "zstd":
            return True
        return name not in {n for f in self.features for n in tap_codec(f).names}

    def tap(self, name: str) -> TapInfo:
        for t in self.features:
            if t.name == name:
                return t
        raise KeyError(f"tap {name!r} is not in this cache; it holds {[t.name for t in self.features] or 'no taps'}")

    @property
    def num_levels(self) -> int | None:
        """The teacher's feature levels: stored since schema 1.3; for older caches derived from a tap asked for
        with a negative index (resolved = asked + levels), else from a ``norm`` tap (the last level); else None."""
        if self.teacher.num_levels is not None:
            return self.teacher.num_levels
        resolved = {t.name: t.index for t in self.features}
        for asked in self.config.targets.features:
            if asked.index < 0 and asked.name in resolved:
                return resolved[asked.name] - asked.index
        return next((t.index + 1 for t in self.features if t.norm), None)

    def tap_serving(self, spec: TapSpec) -> TapInfo | None:
        """The cached tap at the point ``spec`` names: the one of the same name if it serves, else any."""
        return find_serving(self.features, spec, self.num_levels)

    def summary(self) -> dict[str, Any]:
        """What ``kdcache inspect --json`` prints: status, sizes, teacher, and each target's
        dtype, bytes and fidelity."""
        st = self.stats
        targets: dict[str, dict[str, Any]] = {}
        if self.logits:
            codec = self.logits.codec()
            targets[codec.target] = {"mode": self.logits.mode, "k": self.logits.k, "dtype": codec.describe()}
        for f in self.features:
            targets[f.target] = {"index": f.index, "norm": f.norm, "shape": [f.tokens, f.dim],
                                 "grid": f.grid, "dtype": tap_codec(f).describe(),
                                 "compression": self.config.output.feature_compression}
        for name, t in targets.items():
            t["bytes"] = st.bytes_per_target.get(name, 0)
            t["bytes_per_view"] = st.bytes_per_view.get(name)
            t["fidelity"] = st.fidelity.get(name)
        if self.tpp:
            targets["tpp"] = {"family": self.tpp.family, "num_params": self.tpp.num_params, "bytes": self.tpp.bytes,
                              "dtype": "safetensors"}
        return {
            "identity": self.identity or self.content_identity(),
            "status": self.status,
            "schema_version": self.schema_version,
            "created": self.created,
            "updated": self.updated,
            "num_samples": self.dataset.num_samples,
            "num_shards": len(self.dataset.shards),
            "num_views": self.num_views,
            # the view mix recipe (schema >= 1.6), None when the views are not mixed
            "mix": None if self.config.views.mix is None else self.config.views.mix.model_dump(mode="json"),
            "units": {"complete": self.units_complete, "total": self.units_total},
            "teacher": {"model": self.teacher.model, "weights_sha256": self.teacher.weights_sha256,
                        "input_size": self.teacher.input_size, "num_classes": self.teacher.num_classes,
                        "stochastic_depth": self.teacher.stochastic_depth, "top1": st.teacher_top1},
            "dataset_fingerprint": self.dataset.fingerprint,
            "targets": targets,
            "skipped": st.num_skipped,
            "skipped_samples": [{"key": k.key, "tar": k.url, "reason": k.reason} for k in st.skipped],
            "truncated_shards": [{"url": s.url, "reason": s.truncated} for s in self.dataset.shards if s.truncated],
            "bytes_total": st.bytes_total + (self.tpp.bytes if self.tpp else 0),
            "bytes_per_view": st.bytes_per_view.get("total"),
            "samples_per_second": st.samples_per_second,
            "history": [h.model_dump(mode="json") for h in self.history],
        }

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        """Parse manifest JSON, refusing an unknown schema major version before field checks."""
        import json

        raw = json.loads(text)
        if not isinstance(raw, dict) or "schema_version" not in raw:
            raise CacheError(f"{where}: not a kdcache manifest (no schema_version)")
        check_compatible(str(raw["schema_version"]), where)
        if newer_minor(str(raw["schema_version"])):  # a later minor only adds optional fields: ignore them
            raw = known_fields(cls, raw)
        return cls.model_validate(raw)



def known_fields(model: type[BaseModel], data: Any) -> Any:
    """``data`` (JSON for ``model``) with every key ``model`` does not know dropped, at every depth: how this
    reader reads a manifest of a later minor version (its models refuse unknown keys otherwise, which is
    right for the versions they were written for)."""
    if not isinstance(data, dict):
        return data
    out = {}
    for name, f in model.model_fields.items():
        key = next((k for k in (f.alias, name) if k is not None and k in data), None)
        if key is not None:
            out[key] = _known(f.annotation, data[key])
    return out


def _known(annotation: Any, value: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return known_fields(annotation, value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return known_fields(models[0], value) if models and isinstance(value, dict) else value
    if origin is list and isinstance(value, list):
        return [_known(args[0], v) for v in value]
    if origin is dict and isinstance(value, dict):
        return {k: _known(args[1], v) for k, v in value.items()}
    return value
