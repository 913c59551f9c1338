"""The caching job's pure planning: what a cache will hold and what a run must add to one.

No I/O and no Ray here (the orchestration is :mod:`pipeline.job`): each function maps a config,
the indexed tars and the teacher probe (or an existing manifest) to a manifest, a decision or
statistics, so each is tested on plain values.
"""

from __future__ import annotations

import datetime as dt
import getpass
import importlib.metadata as md
import math
import socket
from dataclasses import dataclass

import numpy as np

from storage_schemas import arrays as A
from storage_schemas.codecs import FidelityAcc, LogitsInfo, codecs_of
from storage_schemas.config import CacheConfig
from storage_schemas.errors import CacheMismatchError, InputDataError
from storage_schemas.identity import cache_identity, lineage_key, recipe_dict
from storage_schemas.manifest import (
    ArrayInfo,
    DatasetInfo,
    DroppedMembers,
    HistoryEntry,
    Manifest,
    ShardInfo,
    SkippedSample,
    Stats,
    TeacherInfo,
    TPPInfo,
    UnitCompletion,
)
from storage_schemas.taps import TapInfo
from storage_schemas.tpp_spec import TPPSpec

from .tars import TarIndex, dataset_fingerprint

LIBRARIES = ("kdcache", "torch", "timm", "zarr", "numcodecs", "ray", "webdataset", "numpy")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class TailPack:
    """The teacher's tail as the probe sends it: ``weights`` (safetensors bytes), ``spec``, ``num_params``."""

    weights: bytes
    spec: TPPSpec
    num_params: int


@dataclass
class TeacherProbe:
    """What the job learns from loading the teacher once: its identity, its taps resolved (shapes,
    grids) and, with ``targets.tpp``, its tail for the TPP pack: the weights as safetensors bytes
    (:func:`pipeline.tpp.pack_weights`), the spec and the number of parameters. Bytes, not tensors: the
    probe runs on a Ray worker and the driver that receives it never imports torch."""

    teacher: TeacherInfo
    taps: list[TapInfo]
    tail: TailPack | None = None


def requested_identity(cfg: CacheConfig, probe: TeacherProbe, tars: list[TarIndex]) -> tuple[str, str]:
    """(identity, lineage) of the cache ``cfg`` asks for (see storage_schemas.identity)."""
    d = cfg.public_dict()
    teacher = probe.teacher.model_dump(mode="json")
    return (cache_identity(teacher, dataset_fingerprint(tars), d["views"], d["targets"]),
            lineage_key(teacher, d["views"], d["targets"]))


def _dataset(tars: list[TarIndex]) -> DatasetInfo:
    return DatasetInfo(shards=[ShardInfo(url=t.url, size=t.size, count=len(t.keys), truncated=t.truncated,
                                         dropped=[DroppedMembers(key=k, reason=r) for k, r in t.dropped])
                               for t in tars], fingerprint=dataset_fingerprint(tars))


def plan_manifest(cfg: CacheConfig, tars: list[TarIndex], probe: TeacherProbe, tpp: TPPInfo | None) -> Manifest:
    """The ``building`` manifest: layout of every array from the one table in storage_schemas."""
    teacher, lg = probe.teacher, cfg.targets.logits
    logits = LogitsInfo(mode=lg.mode, k=min(lg.k, teacher.num_classes), num_classes=teacher.num_classes,
                        rest_logmass=lg.mode == "topk") if lg else None
    specs = A.cache_arrays(cfg.views, codecs_of(logits, probe.taps), cfg.targets.fingerprint_size)
    S = A.rows_per_shard(max(t.count for t in tars), cfg.job.chunk_rows)
    chunk = min(cfg.job.chunk_rows, S)
    V, R = cfg.views.num_views, len(tars) * S
    arrays = {s.name: ArrayInfo(shape=list(s.shape(R, V)), dtype=s.dtype, chunks=list(s.chunk_shape(chunk)),
                                shards=list(s.shard_shape(S)), fill=s.fill, target=s.target) for s in specs}
    t = now()
    m = Manifest(status="building", created=t, updated=t, library_versions=library_versions(),
                 config=cfg.with_secrets({}),
                 teacher=teacher, dataset=_dataset(tars), num_views=V, rows_per_shard=S, chunk_rows=chunk,
                 logits=logits, features=probe.taps, tpp=tpp, arrays=arrays, units_total=len(tars) * V)
    ident = m.content_identity()
    entry = HistoryEntry(time=t, user=who(), action="create", views=(0, V), shards_added=[t_.url for t_ in tars],
                         identity=ident, kdcache=m.library_versions.get("kdcache", "unknown"))
    return m.model_copy(update={"identity": ident, "history": [entry]})


def grown_manifest(m: Manifest, cfg: CacheConfig, tars: list[TarIndex], num_views: int) -> Manifest:
    """``m`` grown to ``num_views`` views and the tars ``tars`` (its own first, then new ones): same
    rows per tar, same chunking; arrays longer along the tar and/or view axis. Status ``building``."""
    S, old = m.rows_per_shard, len(m.dataset.shards)
    for t in tars[old:]:
        if len(t.keys) > S:
            raise InputDataError(f"{t.url}: {len(t.keys)} samples, but this cache holds at most {S} per tar "
                                 "(rows_per_shard, fixed when it was created). Cache these tars into a new cache, or "
                                 "split the tar.")
    R, V = len(tars) * S, num_views
    arrays = {n: a.model_copy(update={"shape": [R, V, *a.shape[2:]]}) for n, a in m.arrays.items()}
    # the arrays keep the codec chain they were created with, whatever this job's output.feature_compression
    output = cfg.output.model_copy(update={"feature_compression": m.config.output.feature_compression})
    config = cfg.with_secrets({}).model_copy(
        update={"views": cfg.views.model_copy(update={"num_views": V}), "output": output})
    g = m.model_copy(update={"status": "building", "updated": now(), "config": config, "dataset": _dataset(tars),
                             "num_views": V, "arrays": arrays, "units_total": len(tars) * V})
    ident = g.content_identity()
    entry = HistoryEntry(time=now(), user=who(), action="grow", views=(m.num_views, V),
                         shards_added=[t.url for t in tars[old:]], identity=ident,
                         kdcache=library_versions().get("kdcache", "unknown"))
    return g.model_copy(update={"identity": ident, "history": [*m.history, entry],
                                "library_versions": library_versions()})


def plan_change(existing: Manifest, cfg: CacheConfig, urls: list[str], url: str) -> tuple[int, list[str]] | None:
    """What a job asking for ``cfg`` over ``urls`` must add to the cache ``existing``: ``None`` when nothing,
    else (views after, new tar URLs). Refuses any change that would mix two caches: another teacher,
    recipe or targets, or tars that are not ``existing``'s followed by new ones."""
    new, old = cfg.public_dict(), existing.config.public_dict()
    changed = [k for k in ("teacher", "targets") if old.get(k) != new.get(k)]
    if recipe_dict(old["views"]) != recipe_dict(new["views"]):
        changed.append("views (other than num_views)")
    if old["input"].get("on_bad_sample") != new["input"].get("on_bad_sample"):
        changed.append("input.on_bad_sample")
    had = [s.url for s in existing.dataset.shards]
    if urls[:len(had)] != had:
        changed.append(f"input tars (the cache's {len(had)} tars must come first, in order, then any new ones)")
    if changed:
        raise CacheMismatchError(
            f"{url} already holds a cache built with a different {'; '.join(changed)}; writing there would "
            "mix two caches. Use a new output.url (or output.root to find a matching cache), or delete the old one."
        )
    views = max(existing.num_views, cfg.views.num_views)
    added = urls[len(had):]
    if views == existing.num_views and not added:
        return None
    if existing.status != "complete":
        raise CacheMismatchError(
            f"{url}: this cache is still being built ({existing.units_complete}/{existing.units_total} units); finish "
            f"it with its own config (num_views {existing.num_views}, its {len(had)} tars) before adding views or tars.")
    return views, added


# What the target rows of one task may take in memory: a task holds a full-unit row buffer per view until its tar
# has streamed (a unit's Zarr shard is written whole, by one writer). ImageNet-sized tars (1,250 samples): top-k
# logits and ScaleKD's Swin-L final tap (147 KB a view, 184 MB a unit) fit any number of views; ViTKD's three
# taps (0.9-1.2 MB a view, up to 1.5 GB a unit) fit 2 views a task.
TASK_ROW_BYTES = 3 << 30


def unit_row_bytes(m: Manifest, tar: int) -> int:
    """Bytes of one unit's row buffers (every array, the tar's sample count of rows): what a task holds per view."""
    row = sum(math.prod(a.shape[2:]) * np.dtype(a.dtype).itemsize for a in m.arrays.values())
    return m.dataset.shards[tar].count * row


def plan_tasks(m: Manifest, pending: list[tuple[int, int]], *, min_tasks: int = 1,
               row_bytes: int = TASK_ROW_BYTES) -> list[tuple[int, tuple[int, ...]]]:
    """Group the ``pending`` units (tar, view) into tasks (tar, views): one read and decode of a tar serves every
    view of its task (decode once). A tar's pending views go into as few tasks as ``row_bytes`` allows (each
    task holds :func:`unit_row_bytes` per view), split evenly, in view order; then, while there are fewer than
    ``min_tasks`` tasks (e.g. actors to keep busy), the task with the most views is halved. Tasks come in tar
    order, then view order; every pending unit is in exactly one task."""
    by_tar: dict[int, list[int]] = {}
    for t, v in pending:
        by_tar.setdefault(t, []).append(v)
    tasks: list[tuple[int, tuple[int, ...]]] = []
    for t, views in by_tar.items():
        views = sorted(views)
        cap = max(1, row_bytes // max(1, unit_row_bytes(m, t)))
        parts = -(-len(views) // cap)
        tasks += [(t, tuple(int(v) for v in chunk)) for chunk in np.array_split(views, parts)]
    while len(tasks) < min_tasks:
        i = max(range(len(tasks)), key=lambda k: (len(tasks[k][1]), -k), default=None)
        if i is None or len(tasks[i][1]) < 2:
            break
        t, views = tasks[i]
        half = -(-len(views) // 2)
        tasks[i:i + 1] = [(t, views[:half]), (t, views[half:])]
    return tasks


def summarize(m: Manifest, done: list[UnitCompletion], seconds: float | None) -> Stats:
    """The manifest's totals from the units' completion records."""
    skipped = {(s.tar, s.key, ""): s for r in done for s in r.skipped}
    for i, sh in enumerate(m.dataset.shards):  # dropped while the tars were indexed, whether or not a unit ran
        skipped |= {(i, d.key, d.reason): SkippedSample(shard=i, url=sh.url, key=d.key, reason=d.reason)
                    for d in sh.dropped}
    fid: dict[str, FidelityAcc] = {}
    for r in done:
        for k, acc in r.fidelity.items():
            fid[k] = fid[k].merge(acc) if k in fid else acc
    per_target: dict[str, int] = {}
    for r in done:
        for name, nbytes in r.array_bytes.items():
            t = m.arrays[name].target
            per_target[t] = per_target.get(t, 0) + nbytes
    valid = sum(r.valid for r in done)
    total = sum(per_target.values())
    return Stats(
        num_samples=m.dataset.num_samples, num_valid_rows=valid, num_skipped=len(skipped),
        skipped=sorted(skipped.values(), key=lambda s: (s.tar, s.key)), bytes_total=total,
        bytes_per_target=per_target,
        bytes_per_view={t: b / max(valid, 1) for t, b in per_target.items()} | {"total": total / max(valid, 1)},
        fidelity={k: v.summary() for k, v in fid.items()},
        teacher_top1=100.0 * sum(r.correct for r in done) / valid if valid else None,  # none: no view to score
        samples_per_second=(valid / seconds) if seconds else None, seconds=seconds,
    )
