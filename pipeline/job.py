"""The caching job body: index the shards, plan the store, run units on Ray, finalise.

``run_cache_job`` is what ``kdcache cache`` calls. Work units are (input tar, view);
Ray Data maps them over an actor pool of :class:`~pipeline.unit.UnitRunner` (one actor
per GPU where there are GPUs), which restarts lost actors and retries their units.
A rerun resumes: units with a completion record are skipped, and a unit recomputed
after a crash produces the same bytes.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import logging
import os
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
from storage_schemas.manifest import (
    ArrayInfo,
    DatasetInfo,
    FeatureInfo,
    FidelityAcc,
    LogitsInfo,
    Manifest,
    ShardInfo,
    Stats,
    TeacherInfo,
    TPPInfo,
    UnitRecord,
)

from . import tpp as tpp_mod
from .lease import Lease
from .shards import ShardIndex, dataset_fingerprint, expand_urls, index_shard
from .store import CacheStore
from .teacher import Teacher
from .unit import UnitRunner

# Sections of the config that decide the cache's bytes; a resume must not change them.
IDENTITY_SECTIONS = ("input", "teacher", "views", "targets")
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


def prepare_teacher(cfg: CacheConfig, store_url: str, secrets: dict) -> dict[str, Any]:
    """Load the teacher once (on a Ray worker), return its identity and tap shapes, and
    write the TPP pack. Keeps the driver free of the teacher's weights."""
    teacher = Teacher(cfg.teacher, cfg.targets.features, keep_prefix_tokens=cfg.targets.keep_prefix_tokens)
    info = TeacherInfo(
        model=cfg.teacher.model, model_kwargs=cfg.teacher.model_kwargs,
        weights_sha256=teacher.weights_sha256, input_size=teacher.input_size, mean=teacher.mean,
        std=teacher.std, num_classes=teacher.num_classes, num_prefix_tokens=teacher.num_prefix_tokens,
    )
    taps = [FeatureInfo(name=t.name, index=t.index, norm=t.norm, tokens=t.tokens, dim=t.dim, grid=t.grid,
                        prefix_tokens=t.prefix_tokens, dtype=cfg.targets.feature_dtype)
            for t in teacher.tap_shapes()]
    tpp = None
    if cfg.targets.tpp is not None:
        store = CacheStore(store_url, secrets.get("output"))
        tensors, spec = tpp_mod.extract_tail(teacher.model, cfg.targets.tpp.tail, model_name=cfg.teacher.model,
                                             model_kwargs=cfg.teacher.model_kwargs)
        spec["input_index"] = tpp_mod.tail_input_index(teacher.model, cfg.targets.tpp.tail)
        nbytes = tpp_mod.save_pack(store.fs, store.root, tensors, spec)
        tpp = TPPInfo(family=spec["family"], num_params=int(sum(t.numel() for t in tensors.values())),
                      bytes=nbytes, spec=spec)
    return {"teacher": info, "features": taps, "tpp": tpp}


def plan_manifest(cfg: CacheConfig, shards: list[ShardIndex], prepared: dict[str, Any]) -> Manifest:
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
    return Manifest(status="building", created=t, updated=t, library_versions=library_versions(),
                    config=cfg.public_dict(), teacher=teacher, dataset=dataset, num_views=V, rows_per_shard=S,
                    chunk_rows=chunk, logits=logits, features=features, tpp=prepared["tpp"], arrays=arrays,
                    units_total=len(shards) * V)


def check_resumable(existing: Manifest, cfg: CacheConfig, url: str) -> None:
    new = cfg.public_dict()
    changed = [k for k in IDENTITY_SECTIONS if existing.config.get(k) != new.get(k)]
    if changed:
        raise ValueError(
            f"{url} already holds a cache built with a different {', '.join(changed)} config; resuming would "
            "mix two caches. Use a new output.url, or delete the old cache first."
        )


# --- Ray Data actor ---------------------------------------------------------------------


class UnitActor:
    """Ray Data callable class: the teacher is loaded once per actor in ``__init__``."""

    def __init__(self, url: str, secrets: dict, num_threads: int) -> None:
        self.runner = UnitRunner(url, secrets, num_threads=num_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        recs = [self.runner(int(s), int(v)) for s, v in zip(batch["shard"], batch["view"], strict=True)]
        return {"shard": np.array([r.shard for r in recs]), "view": np.array([r.view for r in recs]),
                "valid": np.array([r.valid for r in recs]), "seconds": np.array([r.seconds for r in recs])}


def run_units(cfg: CacheConfig, url: str, pending: list[tuple[int, int]], progress: bool,
              on_unit: Callable[[dict], None] | None = None) -> None:
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
            fn_constructor_kwargs={"url": url, "secrets": secrets_of(cfg),
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
    """Build (or resume) the cache that ``cfg`` describes; returns the complete manifest.

    The job holds the cache's lease (:mod:`pipeline.lease`) while it writes: a second job on the
    same URL is refused; ``resume=True`` takes over the lease of a job that died."""
    store = CacheStore(cfg.output.url, cfg.output.storage_options)
    existing = _existing(store, cfg)
    if existing and existing.status == "complete":
        log(f"{cfg.output.url}: cache is complete ({existing.units_total} units); nothing to do.")
        return existing
    urls = expand_urls(cfg.input.urls, cfg.input.storage_options)  # fails fast, before Ray starts
    with Lease(store, cfg.job.lease_ttl_s, resume=resume):
        existing = _existing(store, cfg)  # again, now that no other job writes
        if existing and existing.status == "complete":
            return existing
        return _run_leased(cfg, store, existing, urls, address, progress, log)


def _existing(store: CacheStore, cfg: CacheConfig) -> Manifest | None:
    existing = store.read_manifest(allow_partial=True) if store.has_manifest() else None
    if existing:
        check_resumable(existing, cfg, cfg.output.url)
    return existing


def _run_leased(cfg: CacheConfig, store: CacheStore, existing: Manifest | None, urls: list[str],
                address: str | None, progress: bool, log: Callable[[str], None]) -> Manifest:
    init_ray(address)
    t0 = time.time()
    shards = index_dataset(cfg, urls, progress)
    for s in shards:
        if s.truncated:
            log(f"warning: {s.url} is damaged ({s.truncated}); caching the {len(s.keys)} samples before the "
                "damage and recording it in the manifest (on_bad_sample: skip)")
    if existing:
        if existing.dataset.fingerprint != dataset_fingerprint(shards):
            raise ValueError(f"{cfg.output.url}: the input shards changed since this cache was started "
                             "(sizes or sample counts differ); cache them to a new output.url.")
        m = existing
        log(f"resuming {cfg.output.url}: {len(store.completed_units())}/{m.units_total} units already done")
    else:
        prepared = ray.get(ray.remote(num_cpus=1)(prepare_teacher).remote(cfg, cfg.output.url, secrets_of(cfg)))
        m = plan_manifest(cfg, shards, prepared)
        store.create_arrays(m)
        for i, s in enumerate(shards):
            store.write_index(i, s.url, s.keys)
        store.write_manifest(m)
    done = store.completed_units()
    pending = [(s, v) for s in range(len(shards)) for v in range(m.num_views) if (s, v) not in done]
    if pending:
        run_units(cfg, cfg.output.url, pending, progress)
    records = store.read_unit_records()
    if len(records) != m.units_total:
        raise RuntimeError(f"{cfg.output.url}: {len(records)}/{m.units_total} units recorded after the run; "
                           "rerun the same command to finish (it resumes).")
    write_tpp_stats(store, records)
    m = m.model_copy(update={"status": "complete", "updated": now(), "units_complete": len(records),
                             "stats": summarize(m, records, time.time() - t0 if pending else None),
                             "checksums_sha256": store.write_checksums()})
    store.write_manifest(m)  # last (then its sha256 sidecar)
    return m

