"""Student training speed and peak memory: no KD vs cached KD vs online KD (teacher in the loop).

Same student, same cache, same batches; each configuration runs in its own process so its
peak memory (CUDA: ``max_memory_allocated``; CPU: its own peak RSS) is its own.
Steps/s is measured after a warm-up. Ratios: cached KD / no KD (target ≥ 0.95: reading the
cache must cost next to nothing) and the speed-up of cached over online KD, for vanilla KD and
for ScaleKD (whose projectors and frozen tail cost the same cached or online). The online
speed-up grows with the teacher's cost; the demo's teacher is a tiny ViT, about as cheap as the
student, so on the digits it is a lower bound of what a Swin-L or EVA teacher gives.

    python -m bench.student_speed --workdir kdcache-demo --steps 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

from .common import device_name, markdown_table, write_results

CONFIGS = {  # label: (methods, online teacher)
    "no KD (ce)": ("ce", False),
    "cached KD (ce+kd)": ("ce+kd", False),
    "online KD (ce+kd)": ("ce+kd", True),
    "cached ScaleKD (ce+kd+scalekd)": ("ce+kd+scalekd", False),
    "online ScaleKD (ce+kd+scalekd)": ("ce+kd+scalekd", True),
}


def _measure(workdir: str, methods: str, online: bool, steps: int, warmup: int, q) -> None:
    from student.config import TrainConfig
    from student.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "cache": {"url": f"{workdir}/cache.zarr"},
        "student": {"model": "resnet18", "model_kwargs": {"num_classes": 10}, "input_size": 32,
                    "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": methods, "data": {"batch_size": 64},
        "online_teacher": {"checkpoint": f"{workdir}/teacher.safetensors"} if online else None,
        "optim": {"epochs": 100}, "output": f"{workdir}/runs/speed-{methods}-{online}",
    })
    t = Trainer(cfg, progress=False)

    def batches():  # epochs back to back: the digits have 23 batches per epoch
        for epoch in range(cfg.optim.epochs):
            t.dataset.set_epoch(epoch)
            yield from t.dataset.loader(64, device=t.device)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    it = batches()
    for _ in range(warmup):
        t.train_step(next(it))
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step(next(it))
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if t.device.type == "cuda" else _peak_rss()
    q.put({"steps_per_s": steps / dt, "peak_memory_bytes": peak})


def _peak_rss() -> int:
    """This process's own peak RSS in bytes.

    ``ru_maxrss`` survives ``execve``, so a child spawned by a big parent (``python -m bench``
    after the caching benchmark) would report the parent's peak; Linux's ``VmHWM`` belongs to
    the process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def run(workdir: Path, steps: int, warmup: int) -> dict:
    ctx = mp.get_context("spawn")
    rows = []
    for label, (methods, online) in CONFIGS.items():
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(str(workdir), methods, online, steps, warmup, q))
        p.start()
        r = q.get()
        p.join()
        rows.append({"config": label, **r, "peak_memory_mb": r["peak_memory_bytes"] / 2**20})
    by = {r["config"]: r for r in rows}

    def ratio(a: str, b: str, key: str = "steps_per_s") -> float:
        return by[a][key] / by[b][key]

    return {"device": device_name(), "student": "resnet18 @ 32px, batch 64", "teacher": "the demo's ViT 4×96 @ 32px",
            "steps": steps, "rows": rows,
            "ratios": {"cached_kd_vs_no_kd_steps": ratio("cached KD (ce+kd)", "no KD (ce)"),
                       "cached_kd_vs_online_kd_time": ratio("cached KD (ce+kd)", "online KD (ce+kd)"),
                       "cached_kd_vs_no_kd_peak_memory": ratio("cached KD (ce+kd)", "no KD (ce)", "peak_memory_bytes"),
                       "online_kd_vs_no_kd_peak_memory": ratio("online KD (ce+kd)", "no KD (ce)", "peak_memory_bytes"),
                       "cached_scalekd_vs_online_scalekd_time": ratio("cached ScaleKD (ce+kd+scalekd)",
                                                                      "online ScaleKD (ce+kd+scalekd)")}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    if not (a.workdir / "teacher.json").exists() or not (a.workdir / "cache.zarr" / "manifest.json").exists():
        from jobs.demo import run_demo

        run_demo(str(a.workdir), students=False)  # data, teacher and the demo cache
    res = run(a.workdir.resolve(), a.steps, a.warmup)
    print(f"student speed on {res['device']} ({res['student']})")
    print(markdown_table(res["rows"], ["config", "steps_per_s", "peak_memory_mb"]))
    print(res["ratios"])
    print(f"written {write_results('student_speed', res)}")
    return res


if __name__ == "__main__":
    main()
