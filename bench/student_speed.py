"""Student training speed and peak memory: no KD vs cached KD vs online KD (teacher in the loop).

Same student, same cache, same batches; each configuration runs in its own process so its
peak memory (CUDA: ``max_memory_allocated``; CPU: the process's max RSS) is its own.
Steps/s is measured after a warm-up. Ratios: cached KD / no KD (target ≥ 0.95) and the
speed-up of cached over online KD.

    python -m bench.student_speed --workdir kdcache-demo --steps 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from .common import device_name, markdown_table, write_results

CONFIGS = {
    "no KD (ce)": {"methods": "ce", "online": False},
    "cached KD (ce+kd+scalekd)": {"methods": "ce+kd+scalekd", "online": False},
    "online KD (ce+kd+scalekd)": {"methods": "ce+kd+scalekd", "online": True},
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
    t.dataset.set_epoch(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    it = iter(t.dataset.loader(64, device=t.device))
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
    peak = (torch.cuda.max_memory_allocated() if t.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    q.put({"steps_per_s": steps / dt, "peak_memory_bytes": peak})


def run(workdir: Path, steps: int, warmup: int) -> dict:
    ctx = mp.get_context("spawn")
    rows = []
    for label, c in CONFIGS.items():
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(str(workdir), c["methods"], c["online"], steps, warmup, q))
        p.start()
        r = q.get()
        p.join()
        rows.append({"config": label, **r, "peak_memory_mb": r["peak_memory_bytes"] / 2**20})
    base, cached, online = (r["steps_per_s"] for r in rows)
    mem = [r["peak_memory_bytes"] for r in rows]
    return {"device": device_name(), "student": "resnet18 @ 32px, batch 64", "steps": steps, "rows": rows,
            "ratios": {"cached_kd_vs_no_kd_steps": cached / base, "cached_kd_vs_online_kd_time": cached / online,
                       "cached_kd_vs_no_kd_peak_memory": mem[1] / mem[0],
                       "online_kd_vs_no_kd_peak_memory": mem[2] / mem[0]}}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    res = run(a.workdir.resolve(), a.steps, a.warmup)
    print(f"student speed on {res['device']} ({res['student']})")
    print(markdown_table(res["rows"], ["config", "steps_per_s", "peak_memory_mb"]))
    print(res["ratios"])
    print(f"written {write_results('student_speed', res)}")
    return res


if __name__ == "__main__":
    main()
