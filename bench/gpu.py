"""``python -m bench.gpu``: issue 15 item 5 on a CUDA device, in one run of about 8 minutes.

Four parts (``--parts``), each written to ``bench/gpu.json`` and printed as a table:

1. ``forward``: each teacher's forward as the caching job runs it (:class:`pipeline.teacher.Teacher`: the taps
   and the TPP tail's input it is cached for, top-k logits on top) at a real batch size on random inputs, in
   fp32, bf16 autocast, and bf16 with ``channels_last`` (it applies to the convolutions: the patch embedding of
   these transformers, so expect little). Images/s over ``--iters`` batches after a warm-up, synchronised.
2. ``job``: the device's utilisation by the caching job: Swin-L (KD + ScaleKD targets) over ``--images``
   ImageNet-shaped synthetic images (:mod:`pipeline.synthetic`) through the Ray job (one actor on the GPU, the
   node's cores but two for its views; ``--job-runner in-process``: the same unit runner without Ray), steady-state views/s inside units (the first tar, the actor's warm-up,
   left out) ÷ the forward alone over the same replayed batches in this process (before and after the job, as
   :mod:`bench.scale.caching` pairs them), ``--rounds`` rounds.
3. ``student``: a real-size student (ResNet-50 at 224, bf16 autocast) trained from that cache with cached KD
   (``ce+kd``, top-10 logits) vs without KD (``ce``): step time of each in interleaved slices of ``--slice``
   steps, DataLoader workers reading the cache as a run does; the ratio no-KD ÷ cached-KD steps/s.
4. ``tests``: ``pytest -m gpu`` (the tests that need a CUDA device), its summary line.

On a machine without CUDA it refuses to run unless ``--allow-cpu`` (with ``--tiny``, small models and sizes: the
code path the tests run on the CPU). Nothing here is tuned to a device; figures go to the README by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from . import common
from .scale.spec import MEAN, STD, SWIN, TEACHERS, VIT

EVA = "eva02_large_patch14_448"
# teacher: (methods cached for, input size, batch size)
FORWARD = {SWIN: (TEACHERS[SWIN], 224, 256), VIT: (TEACHERS[VIT], 224, 256), EVA: (("kd",), 448, 64)}
TINY = {"vit_tiny_patch16_224": (("kd", "vitkd"), 224, 4)}
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}
PARTS = ("forward", "job", "student", "tests")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_config(model: str, methods, size: int, shards: str, out: str, *, batch: int, chunk_rows: int,
                   precision: str = "auto", cpus: int | None = None):
    """:func:`bench.scale.caching.scale_config` at ``size`` px with ``precision``, ``cpus`` for the actor."""
    from .scale.caching import scale_config

    cfg = scale_config(model, methods, shards, out, batch_size=batch, chunk_rows=chunk_rows)
    cfg.teacher = cfg.teacher.model_copy(update={"input_size": size, "precision": precision})
    if cpus is not None:
        cfg.job = cfg.job.model_copy(update={"cpus_per_actor": cpus})
    return cfg


def forward_rates(models: dict, device: torch.device, iters: int, warmup: int = 2) -> list[dict]:
    from .scale.caching import job_teacher

    rows = []
    for model, (methods, size, batch) in models.items():
        for variant, (precision, channels_last) in VARIANTS.items():
            cfg = teacher_config(model, methods, size, "unused-{0..0}.tar", "unused.zarr", batch=batch,
                                 chunk_rows=batch, precision=precision)
            t = job_teacher(cfg, device=device)
            x = torch.randn(batch, 3, size, size, device=device)
            if channels_last:
                t.model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(warmup):
                t(x)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                t(x)
            sync(device)
            rate = batch * iters / (time.perf_counter() - t0)
            rows.append({"teacher": model, "variant": variant, "batch": batch, "size": size, "images_per_s": rate})
            print(f"forward {model} {variant} batch {batch}: {rate:.1f} img/s", flush=True)
            del t, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def job_seconds(cfg, num_tars: int, runner: str) -> dict:
    """One caching job into ``cfg.output.url`` through Ray (:func:`bench.cache_throughput.job_seconds`) or in
    this process (:func:`pipeline.job.build_cache_in_process`: the same unit runner, steps and bytes, without Ray,
    whose wheel is over what travels to the lent GPU machine): seconds end to end and inside the units after the
    warm-up tar (their completion records)."""
    from pipeline.job import build_cache_in_process
    from pipeline.store import CacheStore

    from .cache_throughput import job_seconds as ray_job_seconds
    from .scale.spec import WARM_TARS

    if runner == "ray":
        return ray_job_seconds(cfg, num_tars, unit_runner=False, warm_tars=WARM_TARS)
    t0 = time.perf_counter()
    build_cache_in_process(cfg, log=lambda s: None)
    job = time.perf_counter() - t0
    return {"job": job, "in_units": sum(r.seconds for r in CacheStore(cfg.output.url).read_unit_records()
                                        if r.tar >= WARM_TARS)}


def job_vs_forward(model: str, methods, size: int, workdir: Path, device: torch.device, a) -> dict:
    """The caching job's steady state ÷ the forward alone on the same batches (``--rounds`` rounds)."""
    from pipeline.synthetic import write_synthetic
    from pipeline.tars import expand_urls

    from .cache_throughput import forward_seconds, replay
    from .common import ratio_summary, spread
    from .scale.caching import job_teacher
    from .scale.spec import WARM_TARS

    data_dir = workdir / f"data-{a.images}x{a.per_tar}"
    data = write_synthetic(str(data_dir), classes=1000, images=a.images, per_tar=a.per_tar, seed=1,
                           workers=max(1, (os.cpu_count() or 2) - 1))
    cpus = max(1, (os.cpu_count() or 2) - 2)  # Ray's own processes and the driver need the rest
    make = lambda out: teacher_config(model, methods, size, data["train"], out, batch=a.job_batch,  # noqa: E731
                                      chunk_rows=a.per_tar, cpus=cpus)
    cfg = make(str(workdir / "job.zarr"))
    urls = expand_urls(cfg.input.urls)
    teacher = job_teacher(cfg, device=device)
    batches = replay(cfg, urls, teacher, tars=range(WARM_TARS, len(urls)))
    n = sum(len(b) for b in batches)
    del teacher
    forward, steady = [], []
    if a.job_runner == "ray":
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        for r in range(a.rounds):
            teacher = job_teacher(cfg, device=device)
            forward_seconds(teacher, batches[:1])  # warm-up (kernels, allocator)
            sync(device)
            fwd = forward_seconds(teacher, batches)
            sync(device)
            del teacher
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the job's actor is another process on the same device
            out = workdir / f"job-round{r}.zarr"
            js = job_seconds(make(str(out)), len(urls), a.job_runner)
            forward.append(n / fwd)
            steady.append(n / js["in_units"])
            print(f"job round {r + 1}/{a.rounds}: forward {forward[-1]:.1f}, job steady state {steady[-1]:.1f} "
                  f"views/s (job {js['job']:.0f} s)", flush=True)
    finally:
        if a.job_runner == "ray":
            ray.shutdown()
    return {"teacher": model, "runner": a.job_runner, "views_steady": n, "images": a.images, "per_tar": a.per_tar, "batch": a.job_batch,
            "cpus_per_actor": cpus, "forward_views_per_s": spread(forward), "job_views_per_s": spread(steady),
            "job_vs_forward": ratio_summary(steady, forward), "cache": str(workdir / f"job-round{a.rounds - 1}.zarr")}


def student_ratio(cache: str, student: str, size: int, workdir: Path, device: torch.device, a) -> dict:
    """no-KD ÷ cached-KD steps/s of ``student`` at ``size`` px, paired by round."""
    import itertools

    from pipeline.store import CacheStore
    from student.config import TrainConfig
    from student.trainer import Trainer

    from .common import ratio_summary, spread

    classes = CacheStore(cache, read_only=True).read_manifest().teacher.num_classes
    trainers, its = {}, {}
    for name, methods in (("no_kd", "ce"), ("cached_kd", "ce+kd")):
        cfg = TrainConfig.model_validate({
            "cache": {"url": cache},
            "student": {"model": student, "model_kwargs": {"num_classes": classes}, "input_size": size,
                        "mean": list(MEAN), "std": list(STD)},
            "methods": methods, "data": {"batch_size": a.student_batch, "num_workers": a.workers},
            "optim": {"epochs": 1000}, "output": str(workdir / f"runs/{name}"),
        })
        t = Trainer(cfg, progress=False, device=device)

        def batches(t=t):
            for epoch in itertools.count():
                t.dataset.set_epoch(epoch)
                yield from t.dataset.loader(a.student_batch, num_workers=a.workers, device=t.device)

        trainers[name], its[name] = t, batches()
        for _ in range(a.warmup):
            t.train_step(next(its[name]))
    secs = {k: [] for k in trainers}
    for r, order in enumerate(common.round_orders(list(trainers), a.rounds, 0)):
        for k in trainers:
            secs[k].append(0.0)
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.slice):
                trainers[name].train_step(next(its[name]))
            sync(device)
            secs[name][-1] += time.perf_counter() - t0
        print(f"student round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {a.slice / secs[k][-1]:.2f} steps/s"
                                                              for k in trainers), flush=True)
    for it in its.values():
        it.close()  # the loaders' workers
    rate = {k: [a.slice / s for s in v] for k, v in secs.items()}
    return {"student": student, "size": size, "batch": a.student_batch, "workers": a.workers,
            "steps_per_s": {k: spread(v) for k, v in rate.items()},
            "cached_kd_vs_no_kd": ratio_summary(rate["cached_kd"], rate["no_kd"])}


def gpu_tests() -> dict:
    """``pytest -m gpu`` over the test files that hold ``gpu`` tests only: collecting the whole suite imports Ray,
    moto and the rest, which a GPU machine set up for this benchmark may not have."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", *files, "-p", "no:cacheprovider"],
                         capture_output=True, text=True, cwd=root)
    lines = out.stdout.strip().splitlines()
    return {"files": files, "returncode": out.returncode,
            "summary": lines[-1] if lines else out.stderr.strip()[-300:]}


def run(a, workdir: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = TINY if a.tiny else FORWARD
    job_model = next(iter(TINY)) if a.tiny else SWIN
    res = {"device": common.device_name(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "parts": list(a.parts), "tiny": a.tiny}
    t0 = time.time()
    if "forward" in a.parts:
        res["forward"] = forward_rates(models, device, a.iters)
    if "job" in a.parts:
        methods, size, _ = models[job_model]
        res["job"] = job_vs_forward(job_model, methods, size, workdir, device, a)
    if "student" in a.parts:
        cache = a.cache or (res.get("job") or {}).get("cache")
        if cache is None:
            raise SystemExit("--parts student needs a cache: run the job part too, or give --cache URL")
        res["student"] = student_ratio(cache, "resnet18" if a.tiny else "resnet50", 224, workdir, device, a)
    if "tests" in a.parts:
        res["tests"] = gpu_tests()
    res["minutes"] = (time.time() - t0) / 60
    return res


def markdown(res: dict) -> str:
    lines = [f"`python -m bench.gpu` on {res['device']}, {res['started']}, {res['minutes']:.1f} min"]
    if "forward" in res:
        lines += ["", common.markdown_table(
            [{"teacher": r["teacher"], "variant": r["variant"], "batch": r["batch"], "px": r["size"],
              "img/s": f"{r['images_per_s']:,.0f}"} for r in res["forward"]],
            ["teacher", "variant", "batch", "px", "img/s"])]
    if "job" in res:
        j = res["job"]
        s = j["job_vs_forward"]
        lines += ["", f"caching job ({j['teacher']}, {j['images']} images): steady state "
                      f"{j['job_views_per_s']['median']:.1f} views/s ÷ forward alone "
                      f"{j['forward_views_per_s']['median']:.1f} = {common.with_spread(s['median'], *s['interval'])}"]
    if "student" in res:
        st = res["student"]
        s = st["cached_kd_vs_no_kd"]
        lines += ["", f"student {st['student']} @ {st['size']} px, batch {st['batch']}: cached KD ÷ no KD steps/s "
                      f"{common.with_spread(s['median'], *s['interval'])}"]
    if "tests" in res:
        lines += ["", f"pytest -m gpu: {res['tests']['summary']} (exit {res['tests']['returncode']})"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="default: all")
    p.add_argument("--iters", type=int, default=10, help="timed batches per teacher and variant (default 10)")
    p.add_argument("--images", type=int, default=4096, help="synthetic images for the job (default 4,096)")
    p.add_argument("--per-tar", type=int, default=512, help="images per tar (default 512; the first tar warms up)")
    p.add_argument("--job-batch", type=int, default=256, help="the job's batch size (default 256)")
    p.add_argument("--job-runner", choices=("ray", "in-process"), default=None,
                   help="the caching job through Ray, or its unit runner in this process (default: ray where it is "
                        "installed; its wheel is too large to carry to the lent GPU machine)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the job and of the student (default 2)")
    p.add_argument("--student-batch", type=int, default=128, help="the student's batch size (default 128)")
    p.add_argument("--workers", type=int, default=6, help="the student's DataLoader workers (default 6)")
    p.add_argument("--warmup", type=int, default=3, help="student steps before the rounds (default 3)")
    p.add_argument("--slice", type=int, default=10, help="student steps a turn (default 10)")
    p.add_argument("--cache", default=None, help="the student part's cache (default: the job part's)")
    p.add_argument("--tiny", action="store_true", help="small models and sizes (with --allow-cpu: the tests' run)")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (figures mean nothing)")
    p.add_argument("--workdir", type=Path, default=None, help="data and caches (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    if a.job_runner is None:
        import importlib.util

        a.job_runner = "ray" if importlib.util.find_spec("ray") else "in-process"
    if not torch.cuda.is_available() and not a.allow_cpu:
        raise SystemExit("python -m bench.gpu: no CUDA device here (torch.cuda.is_available() is False); this "
                         "benchmark is item 5 of issue 15, for a GPU node (--allow-cpu --tiny runs its code on the CPU)")
    res = common.in_workdir(a.workdir, "kdcache-gpu-", partial(run, a))
    path = common.write_results("gpu", res)
    print("\n" + markdown(res))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main()
