"""Real scale on a small machine (issue 15): real-size teachers through the caching job, the student's reader at
real target sizes, and one report of items 1–4 (``python -m bench --scale``).

    python -m bench.scale                                   # the report (≤ 25 min on 2 idle cores)
    python -m bench.scale --images 16 --rounds 1 --reader-rounds 1 --data-path-images 8   # a quick look

Four parts, on ImageNet-shaped synthetic JPEGs (:mod:`pipeline.synthetic`, 1,000 classes, ~110 KB, ~500×375):

1. **Data path per core, cores per GPU** (item 2): :func:`bench.decode_once.main`, called as it is (its views/s
   per core with and without decode-once, and from them the cores needed per GPU by each teacher at its published
   rate).
2. **Caching job vs the teacher's forward alone** (item 3): swin_large_patch4_window7_224 (cached for KD + ScaleKD:
   top-10 logits, the final tap 49×1536, the TPP tail) and vit_large_patch16_224 (KD + ViTKD + ScaleKD: top-10
   logits, blocks 0 and 1 and the final tap, 3×196×1024, the TPP tail), random init (timm builds them without
   weights; the job seeds a teacher that has none), 224 px, fp16 taps. In each of ``--rounds`` rounds: the
   teacher's forward alone over the first half of the job's own batches (replayed as the job replays them; run
   in a Ray worker with the actor's threads and teacher, :class:`ForwardActor`), the full Ray job into a fresh
   cache, the other half of the forward (:mod:`bench.cache_throughput`'s functions). The data are ``--images`` images in tars of
   ``--per-tar``; the first tar is the actor's warm-up (its first forward calls) and is left out of the steady
   state, which is views/s inside the other units (their completion records); end to end is every view over the
   job's whole time (index pass, teacher probe, TPP pack, actor start, manifest: fixed costs that a job of
   1,024 tars amortises). Ray workers run at nice 0, as this process does.
3. **Student reader** (item 4): samples/s of :class:`student.data.CacheDataset` (tars + cache rows + view replay
   at 224 px, ``--workers`` DataLoader workers handing batches over through the loader's reused shared-memory
   slots, :mod:`student.ring`, each batch copied out in the main process as the trainer's loader copies it to its
   device) over caches of synthetic-forward rows (:func:`reader_caches`), with targets (a) none, (b) top-10
   logits, (c) Swin-L's final tap, (d) ViT-L's three ViTKD taps (also with zstd and as int8); from local disk
   and from S3 (a moto server in its own process on
   127.0.0.1, tars and cache uploaded, the manifest's tar URLs pointed at the bucket). The configurations
   take turns in ``--reader-rounds`` rounds (:func:`bench.common.round_orders`, :func:`bench.common.interleave`:
   each reads ``--reader-epochs`` epochs of its cache a round, in slices of ``--reader-slice`` epochs, one
   DataLoader per slice); ratios (b), (c), (d) to (a) are paired by round.
4. **Bytes per view** at real shapes: as stored by the job (fp16), and the same tokens through the int8 codec
   and the cache's Zarr codec chain (same chunks and shards, in memory); the fp16 figure recomputed that way
   too, as a check of the method. The TPP pack's size per cache.

Writes ``bench/scale.json``, the key ``scale`` of ``bench/results.json`` and a "Real scale" section of
``bench/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jobs.cache_for import resolve_targets_for
from pipeline import tpp as tpp_mod
from pipeline.job import init_ray
from pipeline.store import CacheStore
from pipeline.tars import expand_urls
from pipeline.teacher import Teacher, TeacherOutput
from storage_schemas import arrays as A
from storage_schemas.codecs import tap_codec
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import Manifest
from student.batch import collate_rows, received, stack
from student.data import CacheDataset
from student.ring import BatchRing, packed_bytes

from . import decode_once
from .cache_throughput import forward_seconds, job_seconds, replay
from .common import (
    OUT,
    RATIO_COLUMNS,
    interleave,
    judge,
    markdown_table,
    quantile,
    ratio_rows,
    ratio_summary,
    round_orders,
    spread,
    update_report,
    verdict_lines,
    with_spread,
)
from .common import with_section as common_with_section

SWIN, VIT = "swin_large_patch4_window7_224", "vit_large_patch16_224"
# teacher: the KD methods it is cached for (jobs.cache_for derives taps, logits and TPP tail from them)
TEACHERS = {SWIN: ("kd", "scalekd"), VIT: ("kd", "vitkd", "scalekd")}
WARM_TARS = 1  # the first tar of each job: the actor's warm-up, not in the steady state
SETTLE_S = 5.0  # seconds between a job's end and the forward's second half
# the reader's caches: (teacher, targets.feature_dtype, output.feature_compression, None: the default, taps
# without zstd since schema 1.8); the ViT-L taps also with zstd and as int8, to show what each costs the reader
# (the goals are set for the defaults)
READER_CACHES = {"swin": (SWIN, "fp16", None), "vit": (VIT, "fp16", None), "vit_zstd": (VIT, "fp16", "zstd"),
                 "vit_int8": (VIT, "int8", None)}
VIT_TAPS = ("block0", "block1", "final")
# reader configuration: (the cache it reads, logits, taps)
READER = {
    "images_only": ("swin", False, ()),
    "logits_top10": ("swin", True, ()),
    "scalekd_swinl_final": ("swin", False, ("final",)),
    "vitkd_3taps": ("vit", False, VIT_TAPS),
    "vitkd_3taps_zstd": ("vit_zstd", False, VIT_TAPS),
    "vitkd_3taps_int8": ("vit_int8", False, VIT_TAPS),
}
SOURCES = ("local", "s3")
GOALS = {"job_vs_forward": [(SWIN, 0.95), (VIT, 0.95)],
         "reader": [("scalekd_swinl_final", 0.95), ("vitkd_3taps", 0.90)]}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 224
MD_BEGIN, MD_END = "<!-- scale: begin (python -m bench --scale) -->", "<!-- scale: end -->"


# --- part 2: caching job vs forward alone ------------------------------------------------------


def scale_config(model: str, methods: Sequence[str], shards: str, out: str, *, batch_size: int,
                 chunk_rows: int, feature_dtype: str = "fp16", feature_compression: str | None = None) -> CacheConfig:
    """A real-size teacher's cache config: random init (no checkpoint), 224 px, one view, RandAugment, the
    targets of ``methods`` (top-10 logits; taps and TPP tail as :func:`jobs.cache_for.resolve_targets_for`
    derives them), one actor with this process's threads; ``feature_compression`` None: the schema's default."""
    output = {"url": out} | ({"feature_compression": feature_compression} if feature_compression else {})
    cfg = CacheConfig.model_validate({
        "input": {"urls": shards}, "output": output,
        "teacher": {"model": model, "input_size": SIZE},
        "views": {"num_views": 1, "randaugment": "rand-m9-mstd0.5-inc1"},
        "targets": {"logits": {"mode": "topk", "k": 10}, "feature_dtype": feature_dtype, "for": list(methods)},
        "job": {"batch_size": batch_size, "cpus_per_actor": torch.get_num_threads(), "chunk_rows": chunk_rows},
    })
    return resolve_targets_for(cfg)


def job_teacher(cfg: CacheConfig) -> Teacher:
    """The teacher as the job's actor runs it (:meth:`pipeline.teacher.Teacher.from_manifest`): its taps and,
    with a TPP pack, the tail's input among the intermediates."""
    t = Teacher(cfg.teacher, cfg.targets.features, keep_prefix_tokens=cfg.targets.keep_prefix_tokens)
    if cfg.targets.tpp is not None:
        _, spec = tpp_mod.extract_tail(t.model, cfg.targets.tpp.tail, model_name=cfg.teacher.model,
                                       model_kwargs=cfg.teacher.model_kwargs)
        t.tail_input_index = spec.input_index
    return t


class ForwardActor:
    """The teacher's forward alone in a Ray worker, as the job's actor runs it: the same kind of process (Ray
    worker, the same niceness), the same threads (``torch.set_num_threads`` and ``OMP_NUM_THREADS``, as
    :class:`pipeline.unit.UnitRunner` on a ``cpus_per_actor`` actor), the same teacher (:func:`job_teacher`).
    Measured in the driver instead, Swin-L's forward alone ran 1.7× slower than inside the job's units in every
    round on this machine (ViT-L 1.1×), which made the ratio a property of the driver process."""

    def __init__(self, cfg: CacheConfig, batches: list[torch.Tensor], threads: int) -> None:
        torch.set_num_threads(threads)
        self.teacher, self.batches = job_teacher(cfg), batches
        self.teacher(batches[0])  # warm-up

    def seconds(self, lo: int, hi: int) -> float:
        """Seconds of the forward over ``batches[lo:hi]``."""
        return forward_seconds(self.teacher, self.batches[lo:hi])


def caching(model: str, data: dict, tmp: Path, rounds: int, batch_size: int, chunk_rows: int) -> dict:
    """One teacher, ``rounds`` rounds of: forward alone over the first half of the steady-state batches, the Ray
    job into a fresh cache, the other half. The last round's cache stays (``cache``): the real bytes per view."""
    urls = expand_urls(data["train"])
    make = partial(scale_config, model, TEACHERS[model], data["train"], batch_size=batch_size, chunk_rows=chunk_rows)
    import ray

    cfg = make(str(tmp / "probe.zarr"))
    teacher = job_teacher(cfg)
    batches = replay(cfg, urls, teacher, tars=range(WARM_TARS, len(urls)))
    del teacher
    gc.collect()
    n = sum(len(b) for b in batches)
    total = data["counts"]["train"]  # one view a sample
    threads = max(1, int(cfg.job.cpus_per_actor))
    # no CPUs reserved (the job's actor needs them all); it only runs while the job does not
    fwd_actor = ray.remote(num_cpus=0, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})(
        ForwardActor).remote(cfg, batches, threads)
    half = len(batches) // 2
    secs: dict[str, list[float]] = {"forward": [], "job": [], "in_units": [], "warm_unit": []}
    for r in range(rounds):
        fwd = ray.get(fwd_actor.seconds.remote(0, half))
        out = tmp / f"{model}-round{r}.zarr"
        shutil.rmtree(out, ignore_errors=True)  # a last round's cache kept by an earlier run in this --workdir
        js = job_seconds(make(str(out)), len(urls), unit_runner=False, warm_tars=WARM_TARS)
        time.sleep(SETTLE_S)  # Ray winds the job's actor down after it returns: not on the forward's clock
        secs["forward"].append(fwd + ray.get(fwd_actor.seconds.remote(half, len(batches))))
        secs["job"].append(js["job"])
        secs["in_units"].append(js["in_units"])
        secs["warm_unit"].append(sum(u.seconds for u in CacheStore(str(out)).read_unit_records()
                                     if u.tar < WARM_TARS))
        if r < rounds - 1:
            shutil.rmtree(out)  # the last round's stays: bytes per view (bytes_table)
        print(f"{model} round {r + 1}/{rounds}: forward {n / secs['forward'][-1]:.2f}, job steady state "
              f"{n / js['in_units']:.2f}, job end to end {total / js['job']:.2f} views/s "
              f"(job {js['job']:.0f} s)", flush=True)
    ray.kill(fwd_actor)
    del batches
    gc.collect()
    rate = {"forward": [n / s for s in secs["forward"]], "steady": [n / s for s in secs["in_units"]],
            "end_to_end": [total / s for s in secs["job"]]}
    fixed = [j - u - w for j, u, w in zip(secs["job"], secs["in_units"], secs["warm_unit"], strict=True)]
    return {"teacher": model, "methods": list(TEACHERS[model]), "views_steady": n, "views_total": total,
            "rounds": rounds, "batch_size": batch_size, "threads": threads, "seconds": secs,
            "views_per_s": {k: spread(v) for k, v in rate.items()},
            "job_vs_forward": ratio_summary(rate["steady"], rate["forward"]),
            "job_end_to_end_vs_forward": ratio_summary(rate["end_to_end"], rate["forward"]),
            "job_fixed_seconds": quantile(fixed, 0.5), "cache": str(out)}


# --- part 4: bytes per view -----------------------------------------------------------------------


def stored_bytes(arrays: dict[str, np.ndarray], specs: dict, *, rows_per_shard: int, chunk_rows: int,
                 compress: bool = True) -> int:
    """Bytes Zarr stores for one unit's rows ``arrays[name]`` [count, ...] laid out as the cache lays out a unit
    (one shard of ``rows_per_shard`` rows padded with the fill value, chunks of ``chunk_rows`` rows, the cache's
    codec chain, zstd unless not ``compress``), written to memory; ``specs[name]`` is its
    :class:`storage_schemas.arrays.ArraySpec`."""
    import zarr

    objects: dict = {}
    g = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w", zarr_format=3)
    for name, rows in arrays.items():
        s = specs[name]
        arr = g.create_array(name, shape=s.shard_shape(rows_per_shard), dtype=s.dtype,
                             chunks=s.chunk_shape(chunk_rows), shards=s.shard_shape(rows_per_shard), fill_value=s.fill,
                             **A.zarr_codecs(compress))
        block = np.full(s.shard_shape(rows_per_shard), s.fill, dtype=s.dtype)
        block[: len(rows), 0] = rows
        arr[...] = block
    return sum(len(v.to_bytes()) for k, v in objects.items() if not k.endswith("zarr.json"))


def tap_bytes_per_view(url: str, tap: str, dtype: str, compress: bool = True) -> float:
    """Bytes per view of ``tap`` had the cache at ``url`` (fp16 taps) stored it as ``dtype``, with zstd or not
    (``output.feature_compression``): its stored tokens, decoded, encoded by the ``dtype`` codec and written as the
    cache writes a unit (:func:`stored_bytes`)."""
    store = CacheStore(url, read_only=True)
    m = store.read_manifest()
    info = next(t for t in m.features if t.name == tap)
    src, dst = tap_codec(info), tap_codec(info.model_copy(update={"dtype": dtype}))
    specs = {s.name: s for s in dst.arrays()}
    total, views = 0, 0
    for tar in range(len(m.dataset.shards)):
        for view in range(m.num_views):
            rows = store.read_unit(m, tar, view, [*src.names, A.VALID])
            x = src.decode({k: torch.from_numpy(np.asarray(rows[k])) for k in src.names})
            enc, _ = dst.encode(x)
            total += stored_bytes({k: v.numpy() for k, v in enc.items()}, specs, rows_per_shard=m.rows_per_shard,
                                  chunk_rows=m.chunk_rows, compress=compress)
            views += int(rows[A.VALID].sum())
    return total / views


def bytes_table(caches: dict[str, str]) -> dict:
    """Bytes per view of every target of the kept caches: as stored (fp16 taps, the default chain), and each tap
    as fp16 and int8, with zstd and without (``_raw``), through :func:`tap_bytes_per_view`, the stored way
    recomputed too as a check; the TPP pack's bytes."""
    out: dict = {"per_view": {}, "tpp_pack_bytes": {}, "check_fp16_recomputed_vs_stored": {}}
    short = {SWIN: "swinl", VIT: "vitl"}
    for model, url in caches.items():
        m = CacheStore(url, read_only=True).read_manifest()
        s = m.summary()
        key = short[model]
        out["per_view"][f"logits_top10[{key}]"] = s["targets"]["logits"]["bytes_per_view"]
        taps = [t for t in s["targets"] if t.startswith("feature:")]
        for dtype, compress in (("fp16", True), ("int8", True), ("fp16", False), ("int8", False)):
            total, raw = 0.0, "" if compress else "_raw"
            for t in taps:
                name = t.split(":", 1)[1]
                b = tap_bytes_per_view(url, name, dtype, compress)
                out["per_view"][f"{t}[{key}, {dtype}{raw}]"] = b
                total += b
                if dtype == "fp16" and compress == m.compressed(tap_codec(m.tap(name)).names[0]):  # as stored
                    out["check_fp16_recomputed_vs_stored"][f"{t}[{key}]"] = b / s["targets"][t]["bytes_per_view"]
            label = "scalekd_swinl_final" if model == SWIN else "vitkd_3taps"
            out["per_view"][f"{label}_{dtype}{raw}"] = total
        out["per_view"][f"all_targets_as_stored[{key}]"] = s["bytes_per_view"]
        out["tpp_pack_bytes"][model] = s["targets"]["tpp"]["bytes"]
        out["tpp_num_params"] = {**out.get("tpp_num_params", {}), model: s["targets"]["tpp"]["num_params"]}
    return out


@contextlib.contextmanager
def synthetic_forward(seed: int = 0) -> Iterator[None]:
    """Within: every :class:`~pipeline.teacher.Teacher` runs its real forward once, on the first two rows of its
    first batch, and from then on answers random outputs of the same shapes, drawn per channel with the mean and
    standard deviation of that real output (logits, each tap, the TPP tail's input), seeded. Everything else
    of a cache build is real (tars, views, encoding, compression, Zarr writes, manifest): the rows a reader
    reads have the real shapes and dtypes and about the real compressibility, at the cost of the data path,
    not of the teacher's forward, which on 2 CPU cores takes seconds an image."""
    real = Teacher.__call__
    stats: dict[int, dict] = {}
    g = torch.Generator().manual_seed(seed)

    def moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.reshape(-1, t.shape[-1])
        return flat.mean(0), flat.std(0) if len(flat) > 1 else torch.zeros(t.shape[-1])

    def draw(shape: tuple, m: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
        return m[0] + m[1] * torch.randn((n, *shape), generator=g)

    def forward(self: Teacher, x: torch.Tensor, views=None) -> TeacherOutput:
        if id(self) not in stats:
            out = real(self, x[:2], None if views is None else views[:2])
            stats[id(self)] = {"logits": (out.logits.shape[1:], moments(out.logits)),
                               "features": {k: (v.shape[1:], moments(v)) for k, v in out.features.items()},
                               "tail_input": None if out.tail_input is None else
                               (out.tail_input.shape[1:], moments(out.tail_input))}
        st, n = stats[id(self)], len(x)
        return TeacherOutput(logits=draw(*st["logits"], n),
                             features={k: draw(*v, n) for k, v in st["features"].items()},
                             tail_input=None if st["tail_input"] is None else draw(*st["tail_input"], n))

    Teacher.__call__ = forward
    try:
        yield
    finally:
        Teacher.__call__ = real


def reader_caches(tmp: Path, per_tar: int, tars: int, batch_size: int) -> tuple[dict, dict[str, str]]:
    """The caches the reader reads: ``tars`` synthetic tars of ``per_tar`` images cached for each real-size teacher
    by :func:`pipeline.job.build_cache_in_process` (the job's steps and bytes, without Ray) under
    :func:`synthetic_forward`, one Zarr chunk a unit. Larger than the caching benchmark's data, which the real
    forward makes costly: a reader pays fixed costs per tar (opening it and its unit's arrays; on S3 a few requests
    an array) that ImageNet's 1,250 samples a tar amortise, and reads the next tar's rows ahead only when a worker
    has more than one tar an epoch. Reused from an earlier run in the same ``--workdir`` with the same config."""
    from pipeline.job import build_cache_in_process
    from pipeline.synthetic import write_synthetic

    data = write_synthetic(str(tmp / "reader-data"), classes=1000, images=per_tar * tars, per_tar=per_tar, seed=1)
    caches = {}
    for key, (model, dtype, compression) in READER_CACHES.items():
        t0 = time.perf_counter()
        cfg = scale_config(model, TEACHERS[model], data["train"], str(tmp / f"reader-{key}.zarr"),
                           batch_size=batch_size, chunk_rows=per_tar, feature_dtype=dtype,
                           feature_compression=compression)
        caches[key] = cfg.output.url
        store = CacheStore(cfg.output.url)
        if (store.has_manifest() and (m := store.read_manifest(allow_partial=True)).status == "complete"
                and m.config.public_dict() == cfg.public_dict()):  # from an earlier run in the same --workdir
            continue
        if Path(cfg.output.url).exists():
            shutil.rmtree(cfg.output.url)
        with synthetic_forward():
            build_cache_in_process(cfg, log=lambda s: None)
        print(f"reader cache {key} ({model}, {dtype}, {cfg.output.feature_compression}): {per_tar * tars} views in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return data, caches


# --- part 3: the student reader -------------------------------------------------------------------


class Epochs(IterableDataset):
    """``epochs`` consecutive epochs of ``ds`` in one iteration (one DataLoader start for all of them), as the
    trainer's loop reads them one after another."""

    def __init__(self, ds: CacheDataset, epochs: int, first: int = 0) -> None:
        self.ds, self.epochs, self.first = ds, epochs, first

    def __iter__(self) -> Iterator:
        for e in range(self.first, self.first + self.epochs):
            self.ds.set_epoch(e)
            yield from iter(self.ds)


def timed_collate(samples: list, names: Sequence[str], ring: BatchRing | None = None) -> dict:
    """:func:`student.batch.collate_rows` (through ``ring`` as the trainer's loader does), stamped with when the
    worker finished the batch (``perf_counter``: the system-wide monotonic clock on Linux, the same in every
    process), which worker, and the CPU seconds that worker process had used by then (``process_time``: all its
    threads)."""
    info = get_worker_info()
    return {**collate_rows(samples, names, ring=ring), "produced": time.perf_counter(),
            "worker": info.id if info else -1, "cpu": time.process_time()}


def steady_cpu(stamps: list[tuple[int, float, int]]) -> tuple[int, float]:
    """Samples and CPU seconds of the workers in their steady state, from ``(worker, cpu seconds, batch size)`` of
    each batch: each worker's batches after its first, and the CPU it used from its first batch to its last. CPU
    time, unlike a rate, hardly moves with what else runs on the machine: the reader's cost per sample."""
    by_worker: dict[int, list[tuple[float, int]]] = {}
    for w, cpu, n in stamps:
        by_worker.setdefault(w, []).append((cpu, n))
    n_total, cpu_total = 0, 0.0
    for got in by_worker.values():
        got.sort()
        n_total += sum(n for _, n in got[1:])
        cpu_total += got[-1][0] - got[0][0]
    return n_total, cpu_total


def steady_rate(produced: list[tuple[float, int]], workers: int) -> tuple[int, float]:
    """Samples and seconds of the steady state of one DataLoader from its batches' ``(production time, size)``:
    the batches made after the first ``max(workers, 1)`` (by then every worker has started: its start, opening the
    cache and its first tar lie before) over the time from the last of those to the last batch. Production times,
    not arrival times: batches a worker made while the main process still waited for another worker's first batch
    count at the time they were made."""
    times = sorted(produced)
    k = min(max(workers, 1), len(times) - 1)
    if k < 1:
        return 0, 0.0
    return sum(n for _, n in times[k:]), times[-1][0] - times[k - 1][0]


def read(ds: CacheDataset, epochs: int, *, batch_size: int, workers: int) -> dict:
    """``epochs`` epochs of ``ds`` through a DataLoader of ``workers`` workers, as the trainer's loader runs it, up
    to the batches it hands out (``collate_rows`` in the workers; decoding the targets to fp32 is the training
    device's work, in the step: :func:`decode_ms`). Returns samples and seconds in all (``n``, ``s``), the seconds
    to the first batch (``first_s``: the workers' start, opening the cache and the first tar) and the steady
    state's samples and seconds (``n_steady``, ``s_steady``: :func:`steady_rate`), which an epoch of ImageNet's
    size is all but made of."""
    with ds.batch_ring(batch_size, workers) if workers else contextlib.nullcontext() as ring:
        dl = DataLoader(Epochs(ds, epochs), batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(timed_collate, names=ds.targets, ring=ring), persistent_workers=False)
        produced: list[tuple[float, int]] = []
        cpu: list[tuple[int, float, int]] = []
        t0 = time.perf_counter()
        t_first = None
        for raw in dl:
            raw = received(raw, ring)  # out of its slot, as the loader copies it to the training device
            produced.append((raw["produced"], len(raw["label"])))
            cpu.append((raw["worker"], raw["cpu"], len(raw["label"])))
            t_first = t_first or time.perf_counter()
    t1 = time.perf_counter()
    n_steady, s_steady = steady_rate(produced, workers)
    n_cpu, s_cpu = steady_cpu(cpu)
    return {"n": sum(n for _, n in produced), "s": t1 - t0, "first_s": (t_first or t1) - t0, "n_steady": n_steady,
            "s_steady": s_steady, "n_cpu": n_cpu, "s_cpu": s_cpu}


def breakdown_ms(ds: CacheDataset, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """CPU milliseconds per sample, in this process, of what a worker does for ``ds``'s targets on top of the
    images: reading every tar's target rows (:meth:`pipeline.store.CacheStore.read_unit`: read, checksums, and for
    arrays with zstd Zarr's decompression and copies; uncompressed ones by :mod:`pipeline.raw_shards`) and handing them over in batches as the loader does (:meth:`student.ring.BatchRing.put`, the
    worker's stack into a reused shared-memory slot, and :meth:`~student.ring.BatchRing.take`, the main
    process's copy out of it; ``fresh_shared_memory``: :func:`student.batch.stack` into a new shared segment, the
    DataLoader's usual way, for comparison)."""
    if not ds.targets:
        return {"read_rows": 0.0, "hand_over": 0.0, "fresh_shared_memory": 0.0}
    store, m = ds.store(), ds.m
    one = store.read_unit(m, 0, 0, ds.targets)  # warm-up (metadata); rows of one tar kept for the collation
    n = 0
    t0 = time.process_time()
    for _ in range(repeats):
        for t in range(len(m.dataset.shards)):  # each tar's rows dropped before the next, as a worker drops them
            n += len(store.read_unit(m, t, 0, ds.targets)[ds.targets[0]])
    read = time.process_time() - t0
    out = {"read_rows": 1e3 * read / n}
    ring = BatchRing(1, 1, packed_bytes({k: ((batch_size, *v.shape[1:]), v.dtype) for k, v in one.items()}))
    ways = {"hand_over": lambda rows: ring.take(ring.put(rows, worker=0)),
            "fresh_shared_memory": lambda rows: {k: stack(v, shared=True) for k, v in rows.items()}}
    for way, hand_over in ways.items():
        hand_over({k: list(v[:batch_size]) for k, v in one.items()})  # warm-up: the slot's pages
        t0 = time.process_time()
        done = 0
        for _ in range(repeats):
            for lo in range(0, len(one[ds.targets[0]]), batch_size):
                done += len(hand_over({k: list(v[lo:lo + batch_size]) for k, v in one.items()})[ds.targets[0]])
        out[way] = 1e3 * (time.process_time() - t0) / done
    return out


def decode_ms(ds: CacheDataset, batch_size: int, batches: int = 2, repeats: int = 3) -> float:
    """Milliseconds per sample of decoding a batch's targets to fp32 on this CPU (:meth:`CacheDataset.collate`),
    what the training step does on its device."""
    it = iter(DataLoader(Epochs(ds, 1), batch_size=batch_size, num_workers=0,
                         collate_fn=partial(collate_rows, names=ds.targets)))
    raws = [next(it) for _ in range(batches)]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for raw in raws:
            ds.collate(raw)
    return 1e3 * (time.perf_counter() - t0) / (repeats * sum(len(r["label"]) for r in raws))


def relocated(m: Manifest, urls: dict[str, str]) -> Manifest:
    """``m`` with its tars' URLs replaced by ``urls[old]`` (a cache and its tars copied elsewhere together);
    the dataset fingerprint recomputed as the job computes it, over (url, size, count)."""
    import hashlib

    shards = [s.model_copy(update={"url": urls[s.url]}) for s in m.dataset.shards]
    rows = [[s.url, s.size, s.count] for s in shards]
    fp = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return m.model_copy(update={"dataset": m.dataset.model_copy(update={"shards": shards, "fingerprint": fp})})


class MotoS3:
    """A moto S3 server in its own process on 127.0.0.1 (so that serving does not hold this process's GIL), one
    bucket, and the s3fs options to reach it (as ``tests/conftest.py``'s ``moto_s3``)."""

    SERVER = ("import sys; from moto.server import ThreadedMotoServer; s = ThreadedMotoServer(ip_address='127.0.0.1', "
              "port=0); s.start(); print('endpoint %s:%d' % s.get_host_and_port(), flush=True); sys.stdin.read(); s.stop()")

    def __init__(self, bucket: str = "kdcache") -> None:
        import boto3

        self.log = tempfile.TemporaryFile("w+")  # its request log: a line a request
        self.proc = subprocess.Popen([sys.executable, "-c", self.SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = ""
        while not line.startswith("endpoint "):  # moto prints a line of its own first
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                raise RuntimeError(f"the moto S3 server did not start: {self.log.read()[-2000:]}")
        self.endpoint = f"http://{line.split()[1]}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret-0xKDC"}
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **creds).create_bucket(Bucket=bucket)
        self.bucket = bucket
        self.options = {"key": creds["aws_access_key_id"], "secret": creds["aws_secret_access_key"],
                        "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests(self) -> int:
        """Requests served so far (lines of its log)."""
        self.log.flush()
        self.log.seek(0)
        return sum(1 for line in self.log if '" ' in line and "HTTP/1.1" in line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def upload(s3: MotoS3, data_dir: Path, caches: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The tars and the caches (without their TPP packs, which the reader does not read) copied to the bucket,
    each cache's manifest pointed at the bucket's tars. Returns the S3 URL of each cache and of each tar."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options)
    tar_urls = {}
    for p in sorted(data_dir.glob("*.tar")):
        fs.put_file(str(p), f"{s3.bucket}/data/{p.name}")
        tar_urls[str(p)] = f"s3://{s3.bucket}/data/{p.name}"
    out = {}
    for key, url in caches.items():
        root = Path(url)
        dest = f"{s3.bucket}/caches/{root.name}"
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not rel.startswith("tpp/"):
                fs.put_file(str(p), f"{dest}/{rel}")
        out[key] = f"s3://{dest}"
        m = CacheStore(url, read_only=True).read_manifest()
        CacheStore(out[key], s3.options).write_manifest(relocated(m, tar_urls))
    return out, tar_urls


def target_bytes(ds: CacheDataset) -> tuple[float, float]:
    """Per sample, bytes of ``ds``'s target arrays as stored (compressed, from the manifest) and as decoded
    rows (their dtype and shape)."""
    m = ds.m
    stored = sum(m.stats.bytes_per_view.get(c.target, 0.0) for c in m.codecs()
                 if any(n in ds.targets for n in c.names))
    raw = sum(int(np.prod(m.arrays[n].shape[2:])) * np.dtype(m.arrays[n].dtype).itemsize for n in ds.targets)
    return stored, float(raw)


def reader(caches: dict[str, dict[str, str]], s3_options: dict | None, rounds: int, epochs: int, slice_epochs: int,
           batch_size: int, workers: int, seed: int = 0, server_cpu: Callable[[], float] = lambda: 0.0) -> dict:
    """The reader configurations (:data:`READER` × local/S3) in ``rounds`` interleaved rounds: samples/s
    after each DataLoader's first batch (see :func:`read`), paired by round; ``server_cpu()`` the S3 server's CPU
    seconds so far (what it costs this machine to serve)."""
    datasets: dict[str, CacheDataset] = {}
    for src in caches:
        opts = s3_options if src == "s3" else None
        for name, (key, logits, taps) in READER.items():
            datasets[f"{src}/{name}"] = CacheDataset(
                caches[src][key], storage_options=opts, input_storage_options=opts, size=SIZE, mean=MEAN,
                std=STD, logits=logits, taps=taps, threads=1, shuffle_buffer=256)
    names = list(datasets)
    for name in names:  # warm-up: imports in the workers, page cache, S3 connections
        read(datasets[name], 1, batch_size=batch_size, workers=workers)
    cpu0 = {k: 0.0 for k in names}  # the S3 server's CPU seconds while each configuration read
    samples = {k: [] for k in names}
    seconds = {k: [] for k in names}
    first = {k: [] for k in names}
    cpu_n = {k: [] for k in names}
    cpu_s = {k: [] for k in names}
    for r, order in enumerate(round_orders(names, rounds, seed)):
        for k in names:
            for acc in (samples, seconds, cpu_n, cpu_s):
                acc[k].append(0)
        for name, e in interleave(order, epochs, slice_epochs):
            c = server_cpu()
            got = read(datasets[name], e, batch_size=batch_size, workers=workers)
            cpu0[name] += server_cpu() - c
            samples[name][-1] += got["n_steady"]
            seconds[name][-1] += got["s_steady"]
            cpu_n[name][-1] += got["n_cpu"]
            cpu_s[name][-1] += got["s_cpu"]
            first[name].append(got["first_s"])
        print(f"reader round {r + 1}/{rounds}: " + ", ".join(f"{k} {samples[k][-1] / seconds[k][-1]:.1f}"
                                                             for k in names), flush=True)
    rate = {k: [n / s for n, s in zip(samples[k], seconds[k], strict=True)] for k in names}
    per_cpu_s = {k: [n / s for n, s in zip(cpu_n[k], cpu_s[k], strict=True)] for k in names}  # samples per CPU s
    rows, ratios, cpu_ratios = [], {}, {}
    for src in caches:
        base = rate[f"{src}/images_only"]
        ratios[src] = {name: ratio_summary(rate[f"{src}/{name}"], base) for name in READER if name != "images_only"}
        cpu_ratios[src] = {name: ratio_summary(per_cpu_s[f"{src}/{name}"], per_cpu_s[f"{src}/images_only"])
                           for name in READER if name != "images_only"}
        for name in READER:
            k = f"{src}/{name}"
            stored, raw = target_bytes(datasets[k])
            sp = spread(rate[k])
            rows.append({"source": src, "targets": name, "samples_per_s": sp, "stored_bytes_per_sample": stored,
                         "decoded_bytes_per_sample": raw, "cache_mb_per_s_stored": sp["median"] * stored / 1e6,
                         "cache_mb_per_s_decoded": sp["median"] * raw / 1e6,
                         "first_batch_s": quantile(first[k], 0.5),
                         "worker_cpu_ms_per_sample": spread([1e3 / x for x in per_cpu_s[k]]),
                         "cpu_vs_images_only": None if name == "images_only" else cpu_ratios[src][name],
                         "server_cpu_ms_per_sample": 1e3 * cpu0[k] / sum(samples[k]) if src == "s3" else None,
                         "decode_ms_per_sample": decode_ms(datasets[k], batch_size) if src == "local" else None,
                         "breakdown_ms_per_sample": breakdown_ms(datasets[k], batch_size) if src == "local" else None,
                         "vs_images_only": None if name == "images_only" else ratios[src][name]})
    return {"rounds": rounds, "epochs": epochs, "slice_epochs": slice_epochs, "batch_size": batch_size,
            "workers": workers, "samples_per_epoch": datasets[names[0]].num_samples(workers), "rows": rows,
            "ratios": ratios, "cpu_ratios": cpu_ratios}


# --- the report -------------------------------------------------------------------------------------


def headline(data_path: dict | None, jobs: dict | None, read: dict | None, nbytes: dict | None) -> dict:
    """The ``scale`` key of ``bench/results.json``: the figures the issue names (medians), their spreads and the
    goals' verdicts beside them. A part that did not run gives ``None`` / empty figures."""
    jobs = jobs or {}
    ratios = (read or {}).get("ratios", {})
    local, s3 = ratios.get("local", {}), ratios.get("s3", {})
    cpu = (read or {}).get("cpu_ratios", {})
    res = {
        "data_path_views_per_core_s": {k: v["median"] for k, v in data_path["views_per_core_s"].items()}
        if data_path else None,
        "cores_per_gpu": data_path["cores_per_gpu"]["decode_once"] if data_path else None,
        "job_vs_forward": {m: j["job_vs_forward"]["median"] for m, j in jobs.items()},
        "job_end_to_end_vs_forward": {m: j["job_end_to_end_vs_forward"]["median"] for m, j in jobs.items()},
        "reader_vs_images_only": {k: v["median"] for k, v in local.items()},
        "reader_vs_images_only_s3": {k: v["median"] for k, v in s3.items()},
        # samples per worker CPU-second, vs images only: the reader's cost, which the machine's load hardly moves
        "reader_cpu_vs_images_only": {k: v["median"] for k, v in cpu.get("local", {}).items()},
        "reader_cpu_vs_images_only_s3": {k: v["median"] for k, v in cpu.get("s3", {}).items()},
        "bytes_per_view": nbytes["per_view"] if nbytes else {},
        "tpp_pack_bytes": nbytes["tpp_pack_bytes"] if nbytes else {},
    }
    res["spreads"] = {
        "data_path_views_per_core_s": data_path["views_per_core_s"] if data_path else None,
        "cores_per_gpu_decode_per_view": data_path["cores_per_gpu"]["decode_per_view"] if data_path else None,
        "job_vs_forward": {m: j["job_vs_forward"] for m, j in jobs.items()},
        "job_end_to_end_vs_forward": {m: j["job_end_to_end_vs_forward"] for m, j in jobs.items()},
        "reader_vs_images_only": local, "reader_vs_images_only_s3": s3,
        "reader_cpu_vs_images_only": cpu.get("local", {}), "reader_cpu_vs_images_only_s3": cpu.get("s3", {}),
    }
    verdicts = [judge(f"job_vs_forward[{m}]", jobs[m]["job_vs_forward"], target,
                      f"caching job in steady state ≥ {target} × the teacher's forward alone, {m} @ 224 px")
                for m, target in GOALS["job_vs_forward"] if m in jobs]
    for src, rs in ratios.items():
        key = "reader_vs_images_only" + ("_s3" if src == "s3" else "")
        verdicts += [judge(f"{key}[{name}]", rs[name], target,
                           f"student reader with {name} ≥ {target} × images only ({src})")
                     for name, target in GOALS["reader"]]
    res["verdicts"] = verdicts
    return res


def markdown(res: dict) -> str:
    """The "Real scale" section of ``bench/results.md`` (the parts that ran)."""
    h, d = res["scale"], res
    lines = [MD_BEGIN, f"## Real scale (issue 15) on {d['machine']}", "",
             f"`python -m bench --scale` (parts: {', '.join(d['parts'])}), {d['finished']}, {d['minutes']:.1f} min"
             + (f" (parts measured at: {', '.join(f'{k} {v}' for k, v in d['parts_finished'].items())})"
                if len(set(d.get("parts_finished", {}).values())) > 1 else "") + "; "
             f"load average before/after {d['load'][0]:.1f}/{d['load'][1]:.1f}"
             f"{' (a loaded machine: other work ran beside it)' if d['loaded'] else ''}. Synthetic ImageNet-shaped "
             f"JPEGs ({d['data']['jpeg_kb_mean']:.0f} KB mean), random-init teachers, 224 px. Medians; spreads are "
             "min–max over rounds, a ratio's interval is `bench.common.median_interval`'s (min–max of the per-round "
             "ratios for up to 7 rounds; fewer than 5 rounds cannot decide a goal).", ""]
    if d["data_path"]:
        dp = d["data_path"]
        lines += ["### Data path per core (item 2) and cores per GPU", "",
                  f"`bench.decode_once` ({dp['images']} images × {dp['views']} views, {dp['rounds']} rounds, one "
                  "thread): host-side views/s per core, and the cores that feed each teacher at its published rate.",
                  "", markdown_table(_data_path_rows(dp), DATA_PATH_COLUMNS), ""]
    if d["caching"]:
        lines += ["### Caching job vs teacher forward alone (item 3)", "",
                  f"{d['data']['images']} images in tars of {d['data']['per_tar']}, one view, the first tar the "
                  "actor's warm-up; steady state = views/s inside the other units; end to end = all views over the "
                  "job's whole time; fixed = the job's time outside units. The actor's CPUs and the forward's "
                  f"threads: {', '.join(sorted({str(j.get('threads', '?')) for j in d['caching'].values()}))} "
                  f"(`--job-threads`) of {os.cpu_count()} cores.", "",
                  markdown_table([_job_row(j) for j in d["caching"].values()], JOB_COLUMNS), ""]
    if d["reader"]:
        rd = d["reader"]
        lines += ["### Student reader at real size (item 4)", "",
                  f"Caches of {d['data']['reader_images']} images in tars of {d['data']['reader_per_tar']}; "
                  f"{rd['workers']} DataLoader workers, batch {rd['batch_size']}, {rd['samples_per_epoch']} samples "
                  f"an epoch; {rd['rounds']} rounds × {rd['epochs']} epochs per configuration in slices of "
                  f"{rd['slice_epochs']} (a DataLoader each). Samples/s after each DataLoader's first batch (the "
                  "steady state an ImageNet epoch is made of; the first batch's wait is its own column; worker CPU "
                  "is the workers' own CPU time per sample in that steady state, which other work on the machine "
                  "hardly moves), up to the "
                  "batches the loader hands out, each copied out of the worker's reused shared-memory slot "
                  "(`student.ring`) as the loader copies it to the training device; decoding the targets to fp32 "
                  "is the device's work in the step (its cost on this CPU in the last column). The targets' CPU "
                  "cost on top of the images, measured apart in one process: reading a tar's rows (Zarr: read, "
                  "zstd, checksums, copies) and handing a batch over (stack into a reused slot, copy out), beside "
                  "the DataLoader's usual way (stack into a fresh shared segment, whose pages the kernel allocates "
                  "and zeroes on first touch). The caches' rows come from a synthetic forward "
                  "with the real teachers' shapes and per-channel statistics (`bench.scale.synthetic_forward`); "
                  "the S3 server (moto) runs on this machine's cores too.", "",
                  markdown_table([_reader_row(r) for r in rd["rows"]], READER_COLUMNS), ""]
    if h["bytes_per_view"]:
        lines += ["### Bytes per view at real shapes", "",
                  markdown_table([{"target": k, "bytes_per_view": v} for k, v in h["bytes_per_view"].items()] +
                                 [{"target": f"TPP pack (once per cache) {k}", "bytes_per_view": v}
                                  for k, v in h["tpp_pack_bytes"].items()], ["target", "bytes_per_view"]), ""]
    lines += ["### Ratios and goals", "", markdown_table(ratio_rows(*_flat(h)), RATIO_COLUMNS), "",
              *[f"- {line}" for line in verdict_lines(h["verdicts"])], MD_END]
    return "\n".join(lines) + "\n"


DATA_PATH_COLUMNS = ["data path", "views/s per core", *[f"cores/GPU {t}" for t in decode_once.TEACHERS]]


def _data_path_rows(dp: dict) -> list[dict]:
    return [{"data path": k, "views/s per core": with_spread(v["median"], v["min"], v["max"]),
             **{f"cores/GPU {t}": n for t, n in dp["cores_per_gpu"][k].items()}}
            for k, v in dp["views_per_core_s"].items()]


JOB_COLUMNS = ["teacher", "views (steady/all)", "rounds", "forward alone views/s", "job steady views/s",
               "job end-to-end views/s", "steady / forward", "end-to-end / forward", "job fixed s"]
READER_COLUMNS = ["source", "targets", "samples/s", "vs images only", "worker CPU ms/sample",
                  "samples per CPU s vs images only", "target KB/sample (stored)",
                  "cache MB/s (stored)", "cache MB/s (decoded)", "first batch s", "S3 server CPU ms/sample",
                  "read rows ms/sample", "hand-over (ring) ms/sample", "hand-over (fresh shared memory) ms/sample",
                  "fp32 decode on CPU ms/sample"]


def _job_row(j: dict) -> dict:
    v = j["views_per_s"]
    return {"teacher": j["teacher"], "views (steady/all)": f"{j['views_steady']}/{j['views_total']}",
            "rounds": j["rounds"],
            "forward alone views/s": with_spread(v["forward"]["median"], v["forward"]["min"], v["forward"]["max"]),
            "job steady views/s": with_spread(v["steady"]["median"], v["steady"]["min"], v["steady"]["max"]),
            "job end-to-end views/s": with_spread(v["end_to_end"]["median"], v["end_to_end"]["min"],
                                                  v["end_to_end"]["max"]),
            "steady / forward": with_spread(j["job_vs_forward"]["median"], *j["job_vs_forward"]["interval"]),
            "end-to-end / forward": with_spread(j["job_end_to_end_vs_forward"]["median"],
                                                *j["job_end_to_end_vs_forward"]["interval"]),
            "job fixed s": j["job_fixed_seconds"]}


def _reader_row(r: dict) -> dict:
    sp, vs, cm, cv = r["samples_per_s"], r["vs_images_only"], r["worker_cpu_ms_per_sample"], r["cpu_vs_images_only"]
    return {"source": r["source"], "targets": r["targets"],
            "samples/s": with_spread(sp["median"], sp["min"], sp["max"]),
            "vs images only": with_spread(vs["median"], *vs["interval"]) if vs else "1",
            "worker CPU ms/sample": with_spread(cm["median"], cm["min"], cm["max"]),
            "samples per CPU s vs images only": with_spread(cv["median"], *cv["interval"]) if cv else "1",
            "target KB/sample (stored)": r["stored_bytes_per_sample"] / 1e3,
            "cache MB/s (stored)": r["cache_mb_per_s_stored"], "cache MB/s (decoded)": r["cache_mb_per_s_decoded"],
            "first batch s": r["first_batch_s"], "S3 server CPU ms/sample": r["server_cpu_ms_per_sample"],
            "fp32 decode on CPU ms/sample": r["decode_ms_per_sample"],
            "read rows ms/sample": (r["breakdown_ms_per_sample"] or {}).get("read_rows"),
            "hand-over (ring) ms/sample": (r["breakdown_ms_per_sample"] or {}).get("hand_over"),
            "hand-over (fresh shared memory) ms/sample": (r["breakdown_ms_per_sample"] or {}).get("fresh_shared_memory")}


def _flat(h: dict) -> tuple[dict, dict, list]:
    ratios, spreads = {}, {}
    for key in ("job_vs_forward", "job_end_to_end_vs_forward", "reader_vs_images_only", "reader_vs_images_only_s3",
                "reader_cpu_vs_images_only", "reader_cpu_vs_images_only_s3"):
        for sub, v in h.get(key, {}).items():
            ratios[f"{key}[{sub}]"] = v
            spreads[f"{key}[{sub}]"] = h["spreads"][key][sub]
    return ratios, spreads, h["verdicts"]


def with_section(md: str, section: str) -> str:
    """``md`` with its scale section (between :data:`MD_BEGIN` and :data:`MD_END`) replaced by ``section``, or
    ``section`` appended when it has none."""
    return common_with_section(md, section, MD_BEGIN, MD_END)


def write_report(res: dict, out: Path = OUT) -> None:
    """``bench/scale.json``, the ``scale`` key of ``bench/results.json`` (its other keys kept) and the scale
    section of ``bench/results.md``."""
    (out / "scale.json").write_text(json.dumps(res, indent=1))
    update_report(["scale"], res["scale"], markdown(res), MD_BEGIN, MD_END, out)


PARTS = ("data_path", "caching", "reader")


def run(a: argparse.Namespace, workdir: Path) -> dict:
    """The parts ``a.parts`` with their data and caches under ``workdir``; a part left out is empty in the result
    (``None``, or no rows). The reader's caches are reused when ``workdir`` already holds them complete."""
    from pipeline.synthetic import write_synthetic

    t_start, load0 = time.time(), os.getloadavg()
    threads = torch.get_num_threads()
    data_path = jobs = rd = nbytes = None
    if "data_path" in a.parts:  # decode_once's own measurement, on one thread (restored after)
        data_path = decode_once.main(["--images", str(a.data_path_images), "--views", "4",
                                      "--rounds", str(a.data_path_rounds)])
        torch.set_num_threads(threads)
    data = write_synthetic(str(workdir / "data"), classes=1000, images=a.images, per_tar=a.per_tar, seed=0)
    if "caching" in a.parts:
        if len(expand_urls(data["train"])) < WARM_TARS + 1:
            raise SystemExit(f"--images {a.images} --per-tar {a.per_tar}: need at least {WARM_TARS + 1} tars")
        # Ray starts its workers at nice 15; the forward alone runs here at nice 0 (see bench.cache_throughput)
        os.environ.setdefault("RAY_worker_niceness", "0")
        init_ray(None)
        torch.set_num_threads(a.job_threads)  # the actor's CPUs and the forward's threads (scale_config)
        try:
            jobs = {m: caching(m, data, workdir, a.rounds, a.batch_size, a.per_tar) for m in TEACHERS}
        finally:
            import ray

            torch.set_num_threads(threads)
            ray.shutdown()  # its idle workers would share the CPU with what follows
        nbytes = bytes_table({m: j["cache"] for m, j in jobs.items()})  # the real teachers' outputs
    reader_data = None
    if "reader" in a.parts:
        reader_data, caches = reader_caches(workdir, a.reader_per_tar, a.reader_tars, a.batch_size)
        s3 = MotoS3() if not a.no_s3 else None
        try:
            srcs = {"local": caches}
            if s3 is not None:
                srcs["s3"] = upload(s3, workdir / "reader-data", caches)[0]
            rd = reader(srcs, s3.options if s3 else None, a.reader_rounds, a.reader_epochs, a.reader_slice,
                        a.reader_batch, a.workers, server_cpu=s3.cpu_seconds if s3 else lambda: 0.0)
            if s3 is not None:
                rd["s3_requests"] = s3.requests()
        finally:
            if s3 is not None:
                s3.close()
    load1 = os.getloadavg()
    res = {"machine": decode_once.cpu_name() + f" ({os.cpu_count()} cores)",
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "minutes": (time.time() - t_start) / 60,
           "load": [load0[0], load1[0]], "loaded": max(load0[0], load1[0]) > 1.5, "parts": list(a.parts),
           "data": {"images": a.images, "per_tar": a.per_tar, "jpeg_kb_mean": data["bytes"]["train"] / a.images / 1e3,
                    "reader_images": reader_data["counts"]["train"] if reader_data else None,
                    "reader_per_tar": a.reader_per_tar},
           "data_path": data_path, "caching": jobs, "reader": rd, "bytes": nbytes}
    res["scale"] = headline(data_path, jobs, rd, nbytes)
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=18, help="synthetic images (default 18)")
    p.add_argument("--per-tar", type=int, default=6, help="images per tar (default 6; the first tar warms the actor)")
    p.add_argument("--batch-size", type=int, default=6, help="the job's (and the forward's) batch size")
    p.add_argument("--rounds", type=int, default=5, help="rounds of forward / job / forward per teacher (default 5)")
    p.add_argument("--job-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="the caching job's actor CPUs and the forward's threads, both sides alike (default: the "
                        "cores but one, which Ray's own processes need beside the actor — raylet, GCS, the Ray Data "
                        "executor in the driver, its stats actors; with every core the forward shares them and the job "
                        "falls behind: Swin-L 0.78 of the forward with 2 threads on 2 cores, 1.0 with 1, 2026-12-01)")
    p.add_argument("--reader-per-tar", type=int, default=32, help="images per tar of the reader's caches (default 32)")
    p.add_argument("--reader-tars", type=int, default=6,
                   help="tars of the reader's caches (default 6: 3 an epoch for each of 2 workers)")
    p.add_argument("--data-path-images", type=int, default=32, help="bench.decode_once --images (default 32)")
    p.add_argument("--data-path-rounds", type=int, default=5, help="bench.decode_once --rounds (default 5)")
    p.add_argument("--reader-rounds", type=int, default=5, help="interleaved reader rounds (default 5)")
    p.add_argument("--reader-epochs", type=int, default=3, help="epochs per configuration per round (default 3)")
    p.add_argument("--reader-slice", type=int, default=3,
                   help="epochs per turn (one DataLoader) (default 3: a worker reads 9 tars, of which the steady state "
                        "after its first batch holds most with their target rows; with 1 epoch of 3 tars the first "
                        "tar's rows and part of the second's were read before it, which undercounted the rows' cost: "
                        "ViTKD fp16 0.82 of images only with 1 epoch, 0.71 with 3, same code, 2026-12-01)")
    p.add_argument("--reader-batch", type=int, default=16, help="reader batch size (default 16)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--no-s3", action="store_true", help="local disk only")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="the parts to run (default all; the report of a partial run has only theirs)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep data and the reader's caches here, and reuse them next time (default: a temporary "
                        "folder, removed after)")
    return p


PART_KEYS = {"data_path": ("data_path",), "caching": ("caching", "bytes"), "reader": ("reader",)}


def merged(res: dict, last: dict | None) -> dict:
    """``res`` of a run of some parts, completed with the other parts' results of the last run ``last`` (each
    part's ``finished`` time kept in ``parts_finished``), its ``scale`` figures recomputed."""
    if last is None:
        return res
    out = dict(res)
    out["parts_finished"] = {p: res["finished"] for p in res["parts"]}
    for part in PARTS:
        if part in res["parts"] or part not in last.get("parts", []):
            continue
        for key in PART_KEYS[part]:
            out[key] = last.get(key)
        if part == "reader":
            out["data"] = {**out["data"], "reader_images": last["data"].get("reader_images"),
                           "reader_per_tar": last["data"].get("reader_per_tar")}
        out["parts_finished"][part] = last.get("parts_finished", {}).get(part, last["finished"])
    out["parts"] = [p for p in PARTS if p in out["parts_finished"]]
    out["scale"] = headline(out["data_path"], out["caching"], out["reader"], out["bytes"])
    return out


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    last = OUT / "scale.json"
    if set(a.parts) != set(PARTS) and not last.exists():  # checked first: nothing is measured in vain
        raise SystemExit(f"--parts {' '.join(a.parts)} reruns those parts and keeps the others from {last}, which "
                         "is not here (bench/*.json are not in git): run `python -m bench --scale` whole first; "
                         "a report of some parts alone would drop the others from bench/results.md")
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
        res = run(a, a.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="kdcache-scale-") as tmp:
            res = run(a, Path(tmp))
    if set(a.parts) != set(PARTS):  # a partial rerun (refused above without a last run): the others as last measured
        res = merged(res, json.loads(last.read_text()))
    write_report(res)
    print("\n" + markdown(res))
    print(f"written {OUT / 'scale.json'}, the key 'scale' of {OUT / 'results.json'} and {OUT / 'results.md'}")
    return res


if __name__ == "__main__":
    main()
