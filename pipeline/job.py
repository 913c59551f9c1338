"""The caching job body: index the tars, plan the store, run units on Ray, finalise.

``run_cache_job`` is what ``kdcache cache`` calls. Work units are (input tar, view), grouped
into tasks of one tar and several views that read and decode the tar once (:func:`~pipeline.plan.plan_tasks`);
Ray Data maps the tasks over an actor pool of :class:`~pipeline.unit.UnitRunner` (one actor
per GPU where there are GPUs), which restarts lost actors and retries their tasks.
A rerun resumes: units with a completion record are skipped, and a unit recomputed
after a crash produces the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import ray
from tqdm.auto import tqdm

from storage_schemas import layout
from storage_schemas.config import CacheConfig
from storage_schemas.errors import (
    CacheError,
    ConfigError,
    Failed,
    InputDataError,
    returning_errors,
    task_result,
)
from storage_schemas.identity import SHORT
from storage_schemas.manifest import Manifest, TeacherInfo, TPPInfo, UnitCompletion

from . import catalog
from .crash_points import crash_point
from .lease import Lease
from .plan import (
    TailPack,
    TeacherProbe,
    grown_manifest,
    now,
    plan_change,
    plan_manifest,
    plan_tasks,
    requested_identity,
    summarize,
)
from .store import CacheStore
from .tars import TarIndex, dataset_fingerprint, expand_urls, index_tar
from .tpp_files import input_stats_of, save_input_stats, write_pack


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a private local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     log_to_driver=True)
    except (ConnectionError, TimeoutError, RuntimeError) as e:  # Ray's ways of saying it could not start or attach
        if address:
            # Ray turns token authentication on for an explicit address only when RAY_AUTH_MODE says so, while
            # `ray start` turns it on whenever ~/.ray/auth_token exists: the usual reason a local attach fails
            auth = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN, or "
                    "the token in ~/.ray/auth_token)") if not os.environ.get("RAY_AUTH_MODE") else ""
            raise ConfigError(f"Ray at {address} (--address or RAY_ADDRESS): cannot attach: {e}; check that the "
                              f"cluster is up and reachable from here, or unset RAY_ADDRESS to run locally{auth}") from e
        raise CacheError(f"a local Ray instance did not start: {e}; on a loaded machine rerun when it is quieter, "
                         "or run `ray stop` first if an old instance is in the way") from e


# --- index pass ------------------------------------------------------------------------


def index_dataset(cfg: CacheConfig, urls: list[str], progress: bool) -> list[TarIndex]:
    """Count the samples of every tar in parallel on Ray."""
    remote = ray.remote(num_cpus=1)(returning_errors(index_tar))
    fut = {i: remote.remote(u, cfg.input.storage_options, cfg.input.on_bad_sample) for i, u in enumerate(urls)}
    out: dict[int, TarIndex] = {}
    with tqdm(total=len(urls), desc="index tars", unit="tar", disable=not progress) as bar:
        while fut:
            ready, _ = ray.wait(list(fut.values()), num_returns=1)
            i = next(k for k, v in fut.items() if v == ready[0])
            out[i] = task_result(ray.get(fut.pop(i)))
            bar.update(1)
    return [out[i] for i in range(len(urls))]


# --- prepare: teacher probe and TPP pack ------------------------------------------------


def probe_teacher(cfg: CacheConfig) -> TeacherProbe:
    """Load the teacher once (on a Ray worker): its identity, taps resolved and, with ``targets.tpp``,
    its tail for the TPP pack (:class:`~pipeline.plan.TailPack`: safetensors bytes + spec). Keeps the driver free
    of the teacher's weights and of torch."""
    from . import tpp as tpp_mod  # torch, timm: imported where the teacher runs, never by the job's driver
    from .teacher import Teacher

    teacher = Teacher(cfg.teacher, cfg.targets.features, keep_prefix_tokens=cfg.targets.keep_prefix_tokens)
    info = TeacherInfo(
        model=cfg.teacher.model, model_kwargs=cfg.teacher.model_kwargs,
        weights_sha256=teacher.weights_sha256, input_size=teacher.input_size, mean=teacher.mean,
        std=teacher.std, num_classes=teacher.num_classes, num_prefix_tokens=teacher.num_prefix_tokens,
        num_levels=teacher.num_levels, stochastic_depth=cfg.teacher.stochastic_depth,
    )
    tail = None
    if cfg.targets.tpp is not None:
        tensors, spec = tpp_mod.extract_tail(teacher.model, cfg.targets.tpp.tail, model_name=cfg.teacher.model,
                                             model_kwargs=cfg.teacher.model_kwargs)
        tail = TailPack(weights=tpp_mod.pack_weights(tensors, spec), spec=spec,
                        num_params=int(sum(t.numel() for t in tensors.values())))
    return TeacherProbe(teacher=info, taps=teacher.tap_infos(cfg.targets.feature_dtype), tail=tail)


def probe_remotely(cfg: CacheConfig) -> ray.ObjectRef:
    """:func:`probe_teacher` as a Ray task (its user errors returned: read it with :func:`result`)."""
    return ray.remote(num_cpus=1)(returning_errors(probe_teacher)).remote(cfg)


def write_tpp_pack(store: CacheStore, probe: TeacherProbe) -> TPPInfo | None:
    if probe.tail is None:
        return None
    tail = probe.tail
    nbytes = write_pack(store, tail.weights, tail.spec)
    return TPPInfo(family=tail.spec.family, num_params=tail.num_params, bytes=nbytes, spec=tail.spec)


# --- Ray Data actor ---------------------------------------------------------------------


class UnitActor:
    """Ray Data callable class: the teacher is loaded once per actor in ``__init__``."""

    def __init__(self, url: str, secrets: dict, num_threads: int, manifest: str) -> None:
        from .unit import UnitRunner  # torch, timm: in the actor, not in the driver that defines the pool

        self.runner = UnitRunner(url, secrets, num_threads=num_threads, manifest=Manifest.model_validate_json(manifest))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per task (``tar``, ``views`` as "0,1,…"), one row out per unit it caches: a task decodes its tar
        once for all its views (:meth:`~pipeline.unit.UnitRunner.run_views`); retried after a lost worker, it skips
        the units that have a record. A task that fails on something the user can fix (bad input with
        ``on_bad_sample: error``) returns its error as a row (see :func:`storage_schemas.errors.portable`)
        instead of raising, so the driver can say it in one line."""
        run, rows = returning_errors(self.runner.run_views), []
        for t, vs in zip(batch["tar"], batch["views"], strict=True):
            views = [int(v) for v in str(vs).split(",")]
            r = run(int(t), views, skip_done=True)
            if isinstance(r, Failed):
                rows.append((int(t), views[0], 0, 0.0, *r))
            else:
                rows += [(u.tar, u.view, u.valid, u.seconds, "", "") for u in r]
        cols = ("tar", "view", "valid", "seconds", "error_kind", "error")
        return {c: np.array([r[i] for r in rows]) for i, c in enumerate(cols)}


def run_units(cfg: CacheConfig, m: Manifest, url: str, pending: list[tuple[int, int]], progress: bool,
              on_unit: Callable[[dict], None] | None = None) -> None:
    """Cache the ``pending`` units of ``m`` (the layout being written: during a growth, not yet the
    stored manifest) on a Ray Data actor pool, in tasks of one tar and several views (:func:`plan_tasks`)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.job.device == "cuda" or (cfg.job.device == "auto" and gpus > 0)
    num_actors = cfg.job.num_actors or (max(gpus, 1) if use_gpu else 1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts units and samples
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-operator INFO lines drown the bar
    tasks = plan_tasks(m, pending, min_tasks=num_actors)
    ds = ray.data.from_items([{"tar": t, "views": ",".join(map(str, vs))} for t, vs in tasks],
                             override_num_blocks=len(tasks))
    with warnings.catch_warnings():
        # Ray 2.5x deprecates passing actor options as keyword arguments but has no named
        # replacement for max_task_retries yet; the bound on retries per unit matters (a unit
        # that kills its worker every time must fail the job, not loop forever).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        ds = ds.map_batches(
            UnitActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(tasks))),
            num_cpus=cfg.job.cpus_per_actor, num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={"url": url, "secrets": cfg.secrets(), "manifest": m.model_dump_json(),
                                   "num_threads": max(1, int(cfg.job.cpus_per_actor))},
            max_restarts=-1, max_task_retries=cfg.job.max_retries,
        )
    with tqdm(total=len(pending), desc="cache units", unit="unit", disable=not progress) as bar:
        for row in ds.iter_rows():
            if row["error"]:
                task_result(Failed(str(row["error_kind"]), str(row["error"])))
            bar.update(1)
            bar.set_postfix(tar=int(row["tar"]), view=int(row["view"]))
            if on_unit:
                on_unit(row)


# --- finalise ---------------------------------------------------------------------------


def write_tpp_stats(store: CacheStore, done: list[UnitCompletion]) -> None:
    """Per-channel mean/std of the TPP tail's input over every cached view (ScaleKD TPP)."""
    recs = [r for r in done if r.tpp_input_sum is not None]
    if not recs:
        return
    n = sum(r.tpp_input_count for r in recs)
    mean, std = input_stats_of([r.tpp_input_sum for r in recs], [r.tpp_input_sumsq for r in recs], n)
    save_input_stats(store, mean, std, n)


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
    if cfg.targets.for_methods:
        raise ConfigError(f"targets.for {cfg.targets.for_methods} names KD methods, which the caching job does not "
                          "know: expand it first with jobs.cache_for.resolve_targets_for(cfg) (kdcache cache does)")
    urls = expand_urls(cfg.input.urls, cfg.input.storage_options)  # fails fast, before Ray starts
    if cfg.output.root is not None:
        return _run_in_root(cfg, urls, address, progress, log, resume)
    return _run_at_url(cfg, urls, address, progress, log, resume)


def _run_in_root(cfg: CacheConfig, urls: list[str], address: str | None, progress: bool,
                 log: Callable[[str], None], resume: bool) -> Manifest:
    root = cfg.output.root
    assert root is not None
    init_ray(address)
    probing = probe_remotely(cfg)  # loads the teacher while the tars are indexed
    tars = index_dataset(cfg, urls, progress)
    probe = task_result(ray.get(probing))
    identity, lineage = requested_identity(cfg, probe, tars)
    entries = catalog.discover(root, cfg.output.storage_options, missing_ok=True)
    choice = catalog.choose(entries, identity=identity, lineage=lineage, urls=urls, num_views=cfg.views.num_views,
                            root=root, name=catalog.cache_name(cfg.teacher.model, identity))
    log(f"identity {identity[:SHORT]}: {choice.describe(cfg.views.num_views, urls)}")
    out = cfg.output.model_copy(update={"url": choice.url, "root": None})
    return _run_at_url(cfg.model_copy(update={"output": out}), urls, address, progress, log, resume,
                       tars=tars, probe=probe)


def _run_at_url(cfg: CacheConfig, urls: list[str], address: str | None, progress: bool, log: Callable[[str], None],
                resume: bool, tars: list[TarIndex] | None = None, probe: TeacherProbe | None = None) -> Manifest:
    url = cfg.output.url
    assert url is not None
    store = CacheStore(url, cfg.output.storage_options)
    existing = _existing(store)
    done = existing and existing.status == "complete" and plan_change(existing, cfg, urls, url) is None
    if done and not store.exists(layout.LEASE):
        log(f"{url}: cache is complete ({existing.num_views} views × {len(existing.dataset.shards)} tars, "
            f"identity {(existing.identity or existing.content_identity())[:SHORT]}); nothing to do.")
        return existing
    with Lease(store, cfg.job.lease_ttl_s, resume=resume):
        existing = _existing(store)  # again, now that no other job writes
        change = plan_change(existing, cfg, urls, url) if existing else None
        if existing and existing.status == "complete" and change is None:
            return tidy_complete(store, existing, log)
        return _run_leased(cfg, store, existing, change, urls, address, progress, log, tars, probe)


def tidy_complete(store: CacheStore, m: Manifest, log: Callable[[str], None]) -> Manifest:
    """A complete cache whose job died after writing the complete manifest (its lease still held): the
    manifest's sidecar rewritten if the job died before it, the temporary files of its last writes removed."""
    data = store.read_bytes(layout.MANIFEST)
    sidecar = store.read_bytes(layout.MANIFEST_SHA256).decode() if store.exists(layout.MANIFEST_SHA256) else ""
    if sidecar.strip() != hashlib.sha256(data).hexdigest():
        store.write_bytes(layout.MANIFEST_SHA256, hashlib.sha256(data).hexdigest().encode())
        log(f"{store.url}: its job died between writing the complete manifest and its sha256; wrote that now")
    store.remove_debris()
    log(f"{store.url}: cache is complete; nothing to do.")
    return m


def _existing(store: CacheStore) -> Manifest | None:
    return store.read_manifest(allow_partial=True) if store.has_manifest() else None


def _grow(store: CacheStore, existing: Manifest, cfg: CacheConfig, tars: list[TarIndex], num_views: int,
          log: Callable[[str], None]) -> Manifest:
    """Extend the arrays (metadata only: Zarr keeps every written shard) and index the new tars. The
    complete manifest stays in place, so readers keep reading the old extent until the growth ends;
    ``growth.json`` says a growth is under way (``ls`` shows it, ``verify`` names it)."""
    m = grown_manifest(existing, cfg, tars, num_views)
    entry = m.history[-1]
    old = len(existing.dataset.shards)
    log(f"growing {store.url}: views {existing.num_views} → {num_views}, tars {old} → {len(tars)}; only the "
        f"{m.units_total - existing.units_total} new units are computed")
    store.write_json(layout.GROWTH, entry.model_dump(mode="json"))
    g = store.group()
    for name, info in m.arrays.items():
        if list(g[name].shape) != info.shape:
            g[name].resize(tuple(info.shape))
    crash_point("grow:resized")
    for i, t in enumerate(tars[old:], start=old):
        store.write_index(i, t.url, t.keys)
    return m


def start(store: CacheStore, cfg: CacheConfig, existing: Manifest | None, change: tuple[int, list[str]] | None,
          tars: list[TarIndex], probe: Callable[[], TeacherProbe], log: Callable[[str], None]) -> Manifest:
    """The layout the run writes: a new cache planned and created (TPP pack, arrays, index, ``building``
    manifest), an existing one grown, or resumed as it is. ``probe`` loads the teacher when needed."""
    for t in tars:
        if t.truncated:
            log(f"warning: {t.url} is damaged ({t.truncated}); caching the {len(t.keys)} samples before the "
                "damage and recording it in the manifest (on_bad_sample: skip)")
    if existing:
        old = len(existing.dataset.shards)
        if existing.dataset.fingerprint != dataset_fingerprint(tars[:old]):
            raise InputDataError(f"{store.url}: the input tars changed since this cache was started "
                                 "(sizes or sample counts differ); cache them to a new output.url.")
        if change:
            return _grow(store, existing, cfg, tars, change[0], log)
        log(f"resuming {store.url}: {len(store.completed_units())}/{existing.units_total} units already done")
        return existing
    p = probe()
    m = plan_manifest(cfg, tars, p, write_tpp_pack(store, p))
    store.create_arrays(m)
    for i, t in enumerate(tars):
        store.write_index(i, t.url, t.keys)
    store.write_manifest(m)
    return m


def pending_units(store: CacheStore, m: Manifest) -> list[tuple[int, int]]:
    done = store.completed_units()
    return [(t, v) for t in range(len(m.dataset.shards)) for v in range(m.num_views) if (t, v) not in done]


def finalise(store: CacheStore, m: Manifest, seconds: float | None) -> Manifest:
    """Check every unit of ``m`` is recorded, then write the TPP input statistics, the checksums and, last,
    the ``complete`` manifest (``seconds``: how long this run computed units, None if it computed none)."""
    done = [r for r in store.read_unit_records() if r.tar < len(m.dataset.shards) and r.view < m.num_views]
    if len(done) != m.units_total:
        raise RuntimeError(f"{store.url}: {len(done)}/{m.units_total} units recorded after the run; "
                           "rerun the same command to finish (it resumes).")
    for rel in store.remove_debris():
        logging.getLogger(__name__).info("%s: removed %s, left by a writer killed mid-write", store.url, rel)
    write_tpp_stats(store, done)
    if store.exists(layout.GROWTH):
        store.remove(layout.GROWTH)
    m = m.model_copy(update={"status": "complete", "updated": now(), "units_complete": len(done),
                             "stats": summarize(m, done, seconds), "checksums_sha256": store.write_checksums()})
    store.write_manifest(m)  # last (then its sha256 sidecar)
    return m


def _run_leased(cfg: CacheConfig, store: CacheStore, existing: Manifest | None, change: tuple[int, list[str]] | None,
                urls: list[str], address: str | None, progress: bool, log: Callable[[str], None],
                tars: list[TarIndex] | None, probe: TeacherProbe | None) -> Manifest:
    init_ray(address)
    t0 = time.time()
    # a new cache needs the teacher probed: load it on a worker while the tars are indexed
    probing = probe_remotely(cfg) if existing is None and probe is None else None
    tars = tars or index_dataset(cfg, urls, progress)
    m = start(store, cfg, existing, change, tars,
              lambda: probe or task_result(ray.get(probing)), log)  # start() probes a new cache only
    pending = pending_units(store, m)
    if pending:
        run_units(cfg, m, store.url, pending, progress)
    return finalise(store, m, time.time() - t0 if pending else None)


# --- in process, without Ray --------------------------------------------------------------


def build_cache_in_process(cfg: CacheConfig, log: Callable[[str], None] = print) -> Manifest:
    """Build the new cache ``cfg`` describes at ``output.url`` in this process, without Ray: the
    steps of :func:`run_cache_job` (the same bytes), every task (a tar, its views decoded once) run in turn by one
    :class:`~pipeline.unit.UnitRunner`. For tests and debugging: no lease, no resume, no growth."""
    import torch

    from .unit import UnitRunner

    url = cfg.output.url
    if url is None:
        raise ConfigError("build_cache_in_process needs output.url (output.root is resolved on Ray)")
    store = CacheStore(url, cfg.output.storage_options)
    if store.has_manifest():
        raise ConfigError(f"{url} already holds a cache; build_cache_in_process only creates new ones")
    t0 = time.time()
    urls = expand_urls(cfg.input.urls, cfg.input.storage_options)
    tars = [index_tar(u, cfg.input.storage_options, cfg.input.on_bad_sample) for u in urls]
    m = start(store, cfg, None, None, tars, lambda: probe_teacher(cfg), log)
    threads = torch.get_num_threads()  # UnitRunner sets the process-wide count an actor would use
    try:
        runner = UnitRunner(url, cfg.secrets(), num_threads=max(1, int(cfg.job.cpus_per_actor)), manifest=m)
        for tar, views in plan_tasks(m, pending_units(store, m)):
            runner.run_views(tar, views)
    finally:
        torch.set_num_threads(threads)
    return finalise(store, m, time.time() - t0)
