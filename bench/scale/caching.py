"""Part 2 of :mod:`bench.scale` (issue 15 item 3): the caching job of a real-size teacher vs its forward alone."""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from jobs.cache_for import resolve_targets_for
from pipeline import tpp as tpp_mod
from pipeline.store import CacheStore
from pipeline.tars import expand_urls
from pipeline.teacher import Teacher
from storage_schemas.config import CacheConfig

from ..cache_throughput import forward_seconds, job_seconds, replay
from ..common import quantile, ratio_summary, spread
from .spec import SETTLE_S, SIZE, TEACHERS, WARM_TARS


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


def job_teacher(cfg: CacheConfig, device: str | torch.device = "cpu") -> Teacher:
    """The teacher as the job's actor runs it (:meth:`pipeline.teacher.Teacher.from_manifest`): its taps and,
    with a TPP pack, the tail's input among the intermediates."""
    t = Teacher(cfg.teacher, cfg.targets.features, keep_prefix_tokens=cfg.targets.keep_prefix_tokens, device=device)
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
