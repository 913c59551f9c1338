"""The caching job body: index the shards, plan the store, run units on Ray, finalise.

``run_cache_job`` is what ``kdcache cache`` calls. Work units are (input tar, view);
Ray Data maps them over an actor pool of :class:`~pipeline.unit.UnitRunner` (one actor
per GPU where there are GPUs), which restarts lost actors and retries their units.
A rerun resumes: units with a completion record are skipped, and a unit recomputed
after a crash produces the same bytes.
"""

from __future__ import annotations

import datetime as dt
import getpass
import importlib.metadata as md
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from storage_schemas.identity import SHORT, cache_identity, lineage_key, recipe_dict
from storage_schemas.manifest import (
    ArrayInfo,
    DatasetInfo,
    FeatureInfo,
    FidelityAcc,
    HistoryEntry,
    LogitsInfo,
    Manifest,
    ShardInfo,
    Stats,
    TeacherInfo,
    TPPInfo,
    UnitRecord,
)

from . import catalog
from . import tpp as tpp_mod
from .lease import Lease
from .shards import ShardIndex, dataset_fingerprint, expand_urls, index_shard
from .store import CacheStore
from .teacher import Teacher
from .unit import UnitRunner

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


def secrets_of(cfg: CacheConfig) -> dict[str, dict]:
    return {"input": cfg.input.storage_options, "output": cfg.output.storage_options,
            "checkpoint": cfg.teacher.checkpoint_storage_options}


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a private local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True)


# --- index pass ------------------------------------------------------------------------


def index_dataset(cfg: CacheConfig, urls: list[str], progress: bool) -> list[ShardIndex]:
    """Count the samples of every shard in parallel on Ray."""
    remote = ray.remote(num_cpus=1)(index_shard)
    fut = {i: remote.remote(u, cfg.input.storage_options, cfg.input.on_bad_sample) for i, u in enumerate(urls)}
    out: dict[int, ShardIndex] = {}
    with tqdm(total=len(urls), desc="index shards", unit="tar", disable=not progress) as bar:
        while fut:
            ready, _ = ray.wait(list(fut.values()), num_returns=1)
            i = next(k for k, v in fut.items() if v == ready[0])
            out[i] = ray.get(fut.pop(i))
            bar.update(1)
    return [out[i] for i in range(len(urls))]


# --- prepare: teacher probe and TPP pack ------------------------------------------------


def prepare_teacher(cfg: CacheConfig) -> dict[str, Any]:
    """Load the teacher once (on a Ray worker); return its identity, tap shapes and, with
    ``targets.tpp``, its tail (tensors + spec) for the TPP pack. Keeps the driver free of the
    teacher's weights; only the tail travels back."""
    teacher = Teacher(cfg.teacher, cfg.targets.features, keep_prefix_tokens=cfg.targets.keep_prefix_tokens)
    info = TeacherInfo(
        model=cfg.teacher.model, model_kwargs=cfg.teacher.model_kwargs,
        weights_sha256=teacher.weights_sha256, input_size=teacher.input_size, mean=teacher.mean,
        std=teacher.std, num_classes=teacher.num_classes, num_prefix_tokens=teacher.num_prefix_tokens,
    )
    taps = [FeatureInfo(name=t.name, index=t.index, norm=t.norm, tokens=t.tokens, dim=t.dim, grid=t.grid,
                        prefix_tokens=t.prefix_tokens, dtype=cfg.targets.feature_dtype)
            for t in teacher.tap_shapes()]
    tail = None
    if cfg.targets.tpp is not None:
        tensors, spec = tpp_mod.extract_tail(teacher.model, cfg.targets.tpp.tail, model_name=cfg.teacher.model,
                                             model_kwargs=cfg.teacher.model_kwargs)
        spec["input_index"] = tpp_mod.tail_input_index(teacher.model, cfg.targets.tpp.tail)
        tail = (tensors, spec)
    return {"teacher": info, "features": taps, "tail": tail}


def write_tpp_pack(store: CacheStore, prepared: dict[str, Any]) -> TPPInfo | None:
    if prepared["tail"] is None:
        return None
    tensors, spec = prepared["tail"]
    nbytes = tpp_mod.save_pack(store.fs, store.root, tensors, spec)
    return TPPInfo(family=spec["family"], num_params=int(sum(t.numel() for t in tensors.values())),
                   bytes=nbytes, spec=spec)


def requested_identity(cfg: CacheConfig, prepared: dict[str, Any], shards: list[ShardIndex]) -> tuple[str, str]:
    """(identity, lineage) of the cache ``cfg`` asks for (see storage_schemas.identity)."""
    d = cfg.public_dict()
    teacher = prepared["teacher"].model_dump(mode="json")
    return (cache_identity(teacher, dataset_fingerprint(shards), d["views"], d["targets"]),
            lineage_key(teacher, d["views"], d["targets"]))


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def plan_manifest(cfg: CacheConfig, shards: list[ShardIndex], prepared: dict[str, Any], tpp: TPPInfo | None
                  ) -> Manifest:
    """The ``building`` manifest: layout of every array from the one table in storage_schemas."""
    teacher: TeacherInfo = prepared["teacher"]
    features: list[FeatureInfo] = prepared["features"]
    lg = cfg.targets.logits
    logits = LogitsInfo(mode=lg.mode, k=min(lg.k, teacher.num_classes), num_classes=teacher.num_classes) if lg else None
    specs = A.cache_arrays(
        cfg.views, logits_mode=lg.mode if lg else None, logits_k=lg.k if lg else 0,
        num_classes=teacher.num_classes, features=[(f.name, f.tokens, f.dim, f.dtype) for f in features],
        fingerprint_size=cfg.targets.fingerprint_size,
    )
    S = A.rows_per_shard(max(s_.count for s_ in shards), cfg.job.chunk_rows)
    chunk = min(cfg.job.chunk_rows, S)
    V, R = cfg.views.num_views, len(shards) * S
    arrays = {s.name: ArrayInfo(shape=list(s.shape(R, V)), dtype=s.dtype, chunks=list(s.chunk_shape(chunk)),
                                shards=list(s.shard_shape(S)), fill=s.fill, target=s.target) for s in specs}
    dataset = DatasetInfo(shards=[ShardInfo(url=s.url, size=s.size, count=len(s.keys), truncated=s.truncated)
                                  for s in shards],
                          fingerprint=dataset_fingerprint(shards))
    t = now()
    m = Manifest(status="building", created=t, updated=t, library_versions=library_versions(),
                 config=cfg.public_dict(), teacher=teacher, dataset=dataset, num_views=V, rows_per_shard=S,
                 chunk_rows=chunk, logits=logits, features=features, tpp=tpp, arrays=arrays,
                 units_total=len(shards) * V)
    ident = m.content_identity()
    entry = HistoryEntry(time=t, user=who(), action="create", views=(0, V), shards_added=[s_.url for s_ in shards],
                         identity=ident, kdcache=m.library_versions.get("kdcache", "unknown"))
    return m.model_copy(update={"identity": ident, "history": [entry]})


def grown_manifest(m: Manifest, cfg: CacheConfig, shards: list[ShardIndex], num_views: int) -> Manifest:
    """``m`` grown to ``num_views`` views and the tars ``shards`` (its own first, then new ones): same
    rows per tar, same chunking; arrays longer along the tar and/or view axis. Status ``building``."""
    S, old = m.rows_per_shard, len(m.dataset.shards)
    for s_ in shards[old:]:
        if len(s_.keys) > S:
            raise ValueError(f"{s_.url}: {len(s_.keys)} samples, but this cache holds at most {S} per tar "
                             "(rows_per_shard, fixed when it was created). Cache these tars into a new cache, or "
                             "split the tar.")
    R, V = len(shards) * S, num_views
    arrays = {n: a.model_copy(update={"shape": [R, V, *a.shape[2:]]}) for n, a in m.arrays.items()}
    dataset = DatasetInfo(shards=[ShardInfo(url=s_.url, size=s_.size, count=len(s_.keys), truncated=s_.truncated)
                                  for s_ in shards], fingerprint=dataset_fingerprint(shards))
    config = cfg.public_dict()
    config["views"]["num_views"] = V
    g = m.model_copy(update={"status": "building", "updated": now(), "config": config, "dataset": dataset,
                             "num_views": V, "arrays": arrays, "units_total": len(shards) * V})
    ident = g.content_identity()
    entry = HistoryEntry(time=now(), user=who(), action="grow", views=(m.num_views, V),
                         shards_added=[s_.url for s_ in shards[old:]], identity=ident,
                         kdcache=library_versions().get("kdcache", "unknown"))
    return g.model_copy(update={"identity": ident, "history": [*m.history, entry],
                                "library_versions": library_versions()})


def plan_change(existing: Manifest, cfg: CacheConfig, urls: list[str], url: str) -> tuple[int, list[str]] | None:
    """What a job asking for ``cfg`` over ``urls`` must add to the cache ``existing``: ``None`` when nothing,
    else (views after, new tar URLs). Refuses any change that would mix two caches: another teacher,
    recipe or targets, or tars that are not ``existing``'s followed by new ones."""
    new, old = cfg.public_dict(), existing.config
    changed = [k for k in ("teacher", "targets") if old.get(k) != new.get(k)]
    if recipe_dict(old["views"]) != recipe_dict(new["views"]):
        changed.append("views (other than num_views)")
    if old["input"].get("on_bad_sample") != new["input"].get("on_bad_sample"):
        changed.append("input.on_bad_sample")
    had = [s.url for s in existing.dataset.shards]
    if urls[:len(had)] != had:
        changed.append(f"input tars (the cache's {len(had)} tars must come first, in order, then any new ones)")
    if changed:
        raise ValueError(
            f"{url} already holds a cache built with a different {'; '.join(changed)}; writing there would "
            "mix two caches. Use a new output.url (or output.root to find a matching cache), or delete the old one."
        )
    views = max(existing.num_views, cfg.views.num_views)
    added = urls[len(had):]
    if views == existing.num_views and not added:
        return None
    if existing.status != "complete":
        raise ValueError(f"{url}: this cache is still being built ({existing.units_complete}/{existing.units_total} "
                         f"units); finish it with its own config (num_views {existing.num_views}, its {len(had)} "
                         "tars) before adding views or tars.")
    return views, added


# --- Ray Data actor ---------------------------------------------------------------------


class UnitActor:
    """Ray Data callable class: the teacher is loaded once per actor in ``__init__``."""

    def __init__(self, url: str, secrets: dict, num_threads: int, manifest: str) -> None:
        self.runner = UnitRunner(url, secrets, num_threads=num_threads, manifest=Manifest.model_validate_json(manifest))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        recs = [self.runner(int(s), int(v)) for s, v in zip(batch["shard"], batch["view"], strict=True)]
        return {"shard": np.array([r.shard for r in recs]), "view": np.array([r.view for r in recs]),
                "valid": np.array([r.valid for r in recs]), "seconds": np.array([r.seconds for r in recs])}


def run_units(cfg: CacheConfig, m: Manifest, url: str, pending: list[tuple[int, int]], progress: bool,
              on_unit: Callable[[dict], None] | None = None) -> None:
    """Cache the ``pending`` units of ``m`` (the layout being written: during a growth, not yet the
    stored manifest) on a Ray Data actor pool."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.job.device == "cuda" or (cfg.job.device == "auto" and gpus > 0)
    num_actors = cfg.job.num_actors or (max(gpus, 1) if use_gpu else 1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts units and samples
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-operator INFO lines drown the bar
    ds = ray.data.from_items([{"shard": s, "view": v} for s, v in pending], override_num_blocks=len(pending))
    with warnings.catch_warnings():
        # Ray 2.5x deprecates passing actor options as keyword arguments but has no named
        # replacement for max_task_retries yet; the bound on retries per unit matters (a unit
        # that kills its worker every time must fail the job, not loop forever).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        ds = ds.map_batches(
            UnitActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(pending))),
            num_cpus=cfg.job.cpus_per_actor, num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={"url": url, "secrets": secrets_of(cfg), "manifest": m.model_dump_json(),
                                   "num_threads": max(1, int(cfg.job.cpus_per_actor))},
            max_restarts=-1, max_task_retries=cfg.job.max_retries,
        )
    with tqdm(total=len(pending), desc="cache units", unit="unit", disable=not progress) as bar:
        for row in ds.iter_rows():
            bar.update(1)
            bar.set_postfix(shard=int(row["shard"]), view=int(row["view"]))
            if on_unit:
                on_unit(row)


# --- finalise ---------------------------------------------------------------------------


def summarize(m: Manifest, records: list[UnitRecord], seconds: float | None) -> Stats:
    skipped = {(s.shard, s.key): s for r in records for s in r.skipped}
    fid: dict[str, FidelityAcc] = {}
    for r in records:
        for k, acc in r.fidelity.items():
            fid[k] = fid[k].merge(acc) if k in fid else acc
    per_target: dict[str, int] = {}
    for r in records:
        for name, nbytes in r.array_bytes.items():
            t = m.arrays[name].target
            per_target[t] = per_target.get(t, 0) + nbytes
    valid = sum(r.valid for r in records)
    total = sum(per_target.values())
    return Stats(
        num_samples=m.dataset.num_samples, num_valid_rows=valid, num_skipped=len(skipped),
        skipped=sorted(skipped.values(), key=lambda s: (s.shard, s.key)), bytes_total=total,
        bytes_per_target=per_target,
        bytes_per_view={t: b / max(valid, 1) for t, b in per_target.items()} | {"total": total / max(valid, 1)},
        fidelity={k: v.summary() for k, v in fid.items()},
        teacher_top1=100.0 * sum(r.correct for r in records) / max(valid, 1),
        samples_per_second=(valid / seconds) if seconds else None, seconds=seconds,
    )


def write_tpp_stats(store: CacheStore, records: list[UnitRecord]) -> None:
    """Per-channel mean/std of the TPP tail's input over every cached view (ScaleKD TPP)."""
    recs = [r for r in records if r.tpp_input_sum is not None]
    if not recs:
        return
    n = sum(r.tpp_input_count for r in recs)
    s1 = torch.tensor([r.tpp_input_sum for r in recs], dtype=torch.float64).sum(0)
    s2 = torch.tensor([r.tpp_input_sumsq for r in recs], dtype=torch.float64).sum(0)
    mean = s1 / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    store.write_bytes(layout.TPP_STATS, st_save({"mean": mean.float(), "std": std.float(),
                                                "count": torch.tensor([n], dtype=torch.int64)}))


def run_cache_job(cfg: CacheConfig, *, address: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, resume: bool = False) -> Manifest:
    """Build, resume or grow the cache that ``cfg`` describes; returns the complete manifest.

    With ``output.url``: that cache. A complete one asked for more views, or for its tars plus new
    ones, grows (only the new units are computed); the manifest's history records it.
    With ``output.root``: the cache with the same identity under the root is reused, resumed or
    grown; else one of the same lineage whose tars are a prefix of the requested ones is
    extended; else a new one is created. Which one is logged.

    The job holds the cache's lease (:mod:`pipeline.lease`) while it writes: a second job on the
    same URL is refused; ``resume=True`` takes over the lease of a job that died."""
    urls = expand_urls(cfg.input.urls, cfg.input.storage_options)  # fails fast, before Ray starts
    if cfg.output.root is not None:
        return _run_in_root(cfg, urls, address, progress, log, resume)
    return _run_at_url(cfg, urls, address, progress, log, resume)


def _run_in_root(cfg: CacheConfig, urls: list[str], address: str | None, progress: bool,
                 log: Callable[[str], None], resume: bool) -> Manifest:
    root = cfg.output.root
    assert root is not None
    init_ray(address)
    probe = ray.remote(num_cpus=1)(prepare_teacher).remote(cfg)  # loads the teacher while the tars are indexed
    shards = index_dataset(cfg, urls, progress)
    prepared = ray.get(probe)
    identity, lineage = requested_identity(cfg, prepared, shards)
    entries = catalog.discover(root, cfg.output.storage_options, missing_ok=True)
    choice = catalog.choose(entries, identity=identity, lineage=lineage, urls=urls, num_views=cfg.views.num_views,
                            root=root, name=catalog.cache_name(cfg.teacher.model, identity))
    log(f"identity {identity[:SHORT]}: {choice.describe(cfg.views.num_views, urls)}")
    out = cfg.output.model_copy(update={"url": choice.url, "root": None})
    return _run_at_url(cfg.model_copy(update={"output": out}), urls, address, progress, log, resume,
                       shards=shards, prepared=prepared)


def _run_at_url(cfg: CacheConfig, urls: list[str], address: str | None, progress: bool, log: Callable[[str], None],
                resume: bool, shards: list[ShardIndex] | None = None, prepared: dict | None = None) -> Manifest:
    url = cfg.output.url
    assert url is not None
    store = CacheStore(url, cfg.output.storage_options)
    existing = _existing(store)
    if existing and existing.status == "complete" and plan_change(existing, cfg, urls, url) is None:
        log(f"{url}: cache is complete ({existing.num_views} views × {len(existing.dataset.shards)} tars, "
            f"identity {(existing.identity or existing.content_identity())[:SHORT]}); nothing to do.")
        return existing
    with Lease(store, cfg.job.lease_ttl_s, resume=resume):
        existing = _existing(store)  # again, now that no other job writes
        change = plan_change(existing, cfg, urls, url) if existing else None
        if existing and existing.status == "complete" and change is None:
            return existing
        return _run_leased(cfg, store, existing, change, urls, address, progress, log, shards, prepared)


def _existing(store: CacheStore) -> Manifest | None:
    return store.read_manifest(allow_partial=True) if store.has_manifest() else None


def _grow(store: CacheStore, existing: Manifest, cfg: CacheConfig, shards: list[ShardIndex], num_views: int,
          log: Callable[[str], None]) -> Manifest:
    """Extend the arrays (metadata only: Zarr keeps every written shard) and index the new tars. The
    complete manifest stays in place, so readers keep reading the old extent until the growth ends;
    ``growth.json`` says a growth is under way (``ls`` shows it, ``verify`` names it)."""
    m = grown_manifest(existing, cfg, shards, num_views)
    entry = m.history[-1]
    old = len(existing.dataset.shards)
    log(f"growing {store.url}: views {existing.num_views} → {num_views}, tars {old} → {len(shards)}; only the "
        f"{m.units_total - existing.units_total} new units are computed")
    store.write_json(layout.GROWTH, entry.model_dump(mode="json"))
    g = store.group()
    for name, info in m.arrays.items():
        if list(g[name].shape) != info.shape:
            g[name].resize(tuple(info.shape))
    for i, s_ in enumerate(shards[old:], start=old):
        store.write_index(i, s_.url, s_.keys)
    return m


def _run_leased(cfg: CacheConfig, store: CacheStore, existing: Manifest | None, change: tuple[int, list[str]] | None,
                urls: list[str], address: str | None, progress: bool, log: Callable[[str], None],
                shards: list[ShardIndex] | None, prepared: dict | None) -> Manifest:
    init_ray(address)
    t0 = time.time()
    url = store.url
    shards = shards or index_dataset(cfg, urls, progress)
    for s in shards:
        if s.truncated:
            log(f"warning: {s.url} is damaged ({s.truncated}); caching the {len(s.keys)} samples before the "
                "damage and recording it in the manifest (on_bad_sample: skip)")
    if existing:
        old = len(existing.dataset.shards)
        if existing.dataset.fingerprint != dataset_fingerprint(shards[:old]):
            raise ValueError(f"{url}: the input shards changed since this cache was started "
                             "(sizes or sample counts differ); cache them to a new output.url.")
        if change:
            m = _grow(store, existing, cfg, shards, change[0], log)
        else:
            m = existing
            log(f"resuming {url}: {len(store.completed_units())}/{m.units_total} units already done")
    else:
        prepared = prepared or ray.get(ray.remote(num_cpus=1)(prepare_teacher).remote(cfg))
        m = _create(store, cfg, shards, prepared)
    done = store.completed_units()
    pending = [(s, v) for s in range(len(shards)) for v in range(m.num_views) if (s, v) not in done]
    if pending:
        run_units(cfg, m, url, pending, progress)
    return _finalise(store, m, time.time() - t0 if pending else None)


def _create(store: CacheStore, cfg: CacheConfig, shards: list[ShardIndex], prepared: dict[str, Any]) -> Manifest:
    """Plan a new cache and lay it out: TPP pack, empty arrays, tar indexes, the ``building`` manifest."""
    m = plan_manifest(cfg, shards, prepared, write_tpp_pack(store, prepared))
    store.create_arrays(m)
    for i, s in enumerate(shards):
        store.write_index(i, s.url, s.keys)
    store.write_manifest(m)
    return m


def _finalise(store: CacheStore, m: Manifest, seconds: float | None) -> Manifest:
    """Once every unit of ``m`` is recorded: TPP stats, checksums, then the complete manifest."""
    records = [r for r in store.read_unit_records() if r.shard < len(m.dataset.shards) and r.view < m.num_views]
    if len(records) != m.units_total:
        raise RuntimeError(f"{store.url}: {len(records)}/{m.units_total} units recorded after the run; "
                           "rerun the same command to finish (it resumes).")
    write_tpp_stats(store, records)
    if store.exists(layout.GROWTH):
        store.fs.rm(store.path(layout.GROWTH))
    m = m.model_copy(update={"status": "complete", "updated": now(), "units_complete": len(records),
                             "stats": summarize(m, records, seconds),
                             "checksums_sha256": store.write_checksums()})
    store.write_manifest(m)  # last (then its sha256 sidecar)
    return m


# --- in process, without Ray --------------------------------------------------------------


def build_cache_in_process(cfg: CacheConfig) -> Manifest:
    """Build the new cache ``cfg`` describes at ``output.url`` in this process, without Ray: the
    steps of :func:`run_cache_job` (the same bytes), every unit run in turn by one
    :class:`~pipeline.unit.UnitRunner`. For tests and debugging: no lease, no resume, no growth."""
    url = cfg.output.url
    if url is None:
        raise ValueError("build_cache_in_process needs output.url (output.root is resolved on Ray)")
    store = CacheStore(url, cfg.output.storage_options)
    if store.has_manifest():
        raise ValueError(f"{url} already holds a cache; build_cache_in_process only creates new ones")
    t0 = time.time()
    urls = expand_urls(cfg.input.urls, cfg.input.storage_options)
    shards = [index_shard(u, cfg.input.storage_options, cfg.input.on_bad_sample) for u in urls]
    m = _create(store, cfg, shards, prepare_teacher(cfg))
    threads = torch.get_num_threads()  # UnitRunner sets the process-wide count an actor would use
    try:
        runner = UnitRunner(url, secrets_of(cfg), num_threads=max(1, int(cfg.job.cpus_per_actor)), manifest=m)
        for shard in range(len(shards)):
            for view in range(m.num_views):
                runner(shard, view)
    finally:
        torch.set_num_threads(threads)
    return _finalise(store, m, time.time() - t0)
