"""Student training speed and peak memory: no KD vs cached KD vs online KD (teacher in the loop).

Same student, same cache, same batches. Each configuration lives in its own process, started
and warmed up once (``--warmup`` steps), so its peak memory (CUDA: ``max_memory_allocated``;
CPU: its own peak RSS, over its whole life) is its own. The configurations are then measured
interleaved, one process at a time while the others wait idle: in each of ``--rounds`` rounds
every one runs ``--steps`` train steps, taking turns every ``--slice`` steps in an order shuffled
per round (seeded) and reversed every other turn (A B C … C B A …; ``bench.common.interleave``).
A configuration's time in a round is thus spread over the whole round, and a load that comes
and goes on a shared machine falls on all of them alike. Per configuration the table gives the
median steps/s over the rounds, min–max and IQR. Each speed ratio is computed within each round
(paired, so the machine's drift between rounds cancels) and reported as the median over rounds
and an interval for it (``bench.common.median_interval``: min–max of the per-round ratios for
5–7 rounds; at 5 it holds the true median with 94 % probability if rounds are independent,
whatever the shape of the noise).
Peak-memory ratios are one value each: the peak is deterministic up to the allocator.

Ratios: cached KD / no KD (goal ≥ 0.95: reading the cache must cost next to nothing; the verdict
is met, not met, or undecided when the interval straddles 0.95) and the speed-up of cached over
online KD, for vanilla KD and for ScaleKD (whose projectors and frozen tail cost the same cached
or online). The online speed-up grows with the teacher's cost; the demo's teacher is a tiny ViT,
about as cheap as the student, so on the digits it is a lower bound of what a Swin-L or EVA
teacher gives.

    python -m bench.student_speed --workdir kdcache-demo            # 5 rounds × 20 steps, ~5 min on 2 cores
    python -m bench.student_speed --rounds 9 --steps 30             # tighter interval
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

from .common import (
    RATIO_COLUMNS,
    device_name,
    interleave,
    judge,
    markdown_table,
    ratio_rows,
    ratio_summary,
    round_orders,
    spread,
    verdict_lines,
    with_spread,
    write_results,
)

CONFIGS = {  # label: (methods, online teacher)
    "no KD (ce)": ("ce", False),
    "cached KD (ce+kd)": ("ce+kd", False),
    "online KD (ce+kd)": ("ce+kd", True),
    "cached ScaleKD (ce+kd+scalekd)": ("ce+kd+scalekd", False),
    "online ScaleKD (ce+kd+scalekd)": ("ce+kd+scalekd", True),
}


def _worker(workdir: str, methods: str, online: bool, warmup: int, conn) -> None:
    """One configuration's process: build the trainer, warm up, then run one round of ``steps``
    train steps per request and answer its seconds; ``None`` ends it with the peak memory."""
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
    cuda = t.device.type == "cuda"

    def batches():  # epochs back to back, as many as the rounds take: the digits have 23 batches per epoch
        for epoch in itertools.count():
            t.dataset.set_epoch(epoch)
            yield from t.dataset.loader(64, device=t.device)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    it = batches()
    for _ in range(warmup):
        t.train_step(next(it))
    if cuda:
        torch.cuda.synchronize()
    conn.send("ready")
    while (steps := conn.recv()) is not None:
        t0 = time.perf_counter()
        for _ in range(steps):
            t.train_step(next(it))
        if cuda:
            torch.cuda.synchronize()
        conn.send(time.perf_counter() - t0)
    conn.send(torch.cuda.max_memory_allocated() if cuda else _peak_rss())
    conn.close()


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


SPEED_RATIOS = {  # name: (numerator, denominator), both in steps/s, paired by round
    "cached_kd_vs_no_kd_steps": ("cached KD (ce+kd)", "no KD (ce)"),
    "cached_kd_vs_online_kd_time": ("cached KD (ce+kd)", "online KD (ce+kd)"),
    "cached_scalekd_vs_online_scalekd_time": ("cached ScaleKD (ce+kd+scalekd)", "online ScaleKD (ce+kd+scalekd)"),
}
MEMORY_RATIOS = {
    "cached_kd_vs_no_kd_peak_memory": ("cached KD (ce+kd)", "no KD (ce)"),
    "online_kd_vs_no_kd_peak_memory": ("online KD (ce+kd)", "no KD (ce)"),
}
GOALS = [("cached_kd_vs_no_kd_steps", 0.95, "cached KD steps/s ≥ 0.95 × no KD")]


def run(workdir: Path, steps: int, warmup: int, rounds: int = 5, seed: int = 0, slice_steps: int = 2) -> dict:
    """All configurations, each in its own long-lived process, for ``rounds`` rounds of ``steps``
    train steps each, taking turns every ``slice_steps`` steps in an order shuffled per round
    (seeded); see the module docstring."""
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    try:
        for label, (methods, online) in CONFIGS.items():  # start-up and warm-up of all at once, unmeasured
            conns[label], child = ctx.Pipe()
            procs[label] = ctx.Process(target=_worker, args=(str(workdir), methods, online, warmup, child),
                                       daemon=True)
            procs[label].start()
            child.close()  # so that a worker that dies is an EOFError here, not a hang
        for label in CONFIGS:
            _recv(conns[label], label)
        orders = round_orders(list(CONFIGS), rounds, seed)
        seconds = {label: [] for label in CONFIGS}
        for r, order in enumerate(orders):
            for label in CONFIGS:
                seconds[label].append(0.0)
            for label, n in interleave(order, steps, slice_steps):  # one at a time: the others wait idle in recv()
                conns[label].send(n)
                seconds[label][-1] += _recv(conns[label], label)
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{lb} {steps / seconds[lb][-1]:.2f}" for lb in order),
                  flush=True)
        peaks = {}
        for label in CONFIGS:
            conns[label].send(None)
            peaks[label] = _recv(conns[label], label)
            procs[label].join()
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join()
    speed = {label: [steps / s for s in secs] for label, secs in seconds.items()}
    rows = []
    for label in CONFIGS:
        sp = spread(speed[label])
        rows.append({"config": label, "steps_per_s": sp["median"], "steps_per_s_spread": sp,
                     "steps_per_s_per_round": speed[label], "peak_memory_bytes": peaks[label],
                     "peak_memory_mb": peaks[label] / 2**20})
    spreads = {name: ratio_summary(speed[a], speed[b]) for name, (a, b) in SPEED_RATIOS.items()}
    ratios = {name: v["median"] for name, v in spreads.items()}
    ratios.update({name: peaks[a] / peaks[b] for name, (a, b) in MEMORY_RATIOS.items()})
    return {"device": device_name(), "student": "resnet18 @ 32px, batch 64", "teacher": "the demo's ViT 4×96 @ 32px",
            "steps": steps, "slice": slice_steps, "warmup": warmup, "rounds": rounds, "seed": seed, "orders": orders,
            "rows": rows,
            "ratios": ratios, "ratios_spread": spreads,
            "verdicts": [judge(name, spreads[name], target, goal) for name, target, goal in GOALS]}


def _recv(conn, label: str):
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"the {label!r} worker ended before answering (its traceback is above)") from None


def table_rows(res: dict) -> list[dict]:
    """The rows of the steps/s table: median (min–max), IQR and peak memory per configuration."""
    return [{"config": r["config"],
             "steps/s median (min–max)": with_spread(r["steps_per_s"], r["steps_per_s_spread"]["min"],
                                                     r["steps_per_s_spread"]["max"]),
             "IQR": "–".join(f"{q:.3g}" for q in r["steps_per_s_spread"]["iqr"]),
             "peak_memory_mb": r["peak_memory_mb"]} for r in res["rows"]]


TABLE_COLUMNS = ["config", "steps/s median (min–max)", "IQR", "peak_memory_mb"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path,
                   help="the demo's workdir with its teacher and cache (made by the demo if missing)")
    p.add_argument("--steps", type=int, default=20,
                   help="train steps per configuration per round (20: 5–15 s on 2 CPU cores)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured train steps per configuration before round 1")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds; in each, every configuration runs --steps steps, taking turns in a shuffled order "
                        "(5: a ratio's interval holds its median with probability 0.94)")
    p.add_argument("--slice", type=int, default=2, dest="slice_steps", metavar="N",
                   help="configurations take turns every this many steps within a round (2: 10 turns a round at "
                        "--steps 20; --slice = --steps: each runs its round's steps at once; on a GPU, where a "
                        "step takes milliseconds, raise --steps and --slice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the configurations in each round")
    a = p.parse_args(argv)
    if min(a.rounds, a.steps, a.slice_steps) < 1:
        p.error("--rounds, --steps and --slice must be at least 1")
    if not (a.workdir / "teacher.json").exists() or not (a.workdir / "cache.zarr" / "manifest.json").exists():
        from jobs.demo import run_demo

        run_demo(str(a.workdir), students=False)  # data, teacher and the demo cache
    res = run(a.workdir.resolve(), a.steps, a.warmup, a.rounds, a.seed, a.slice_steps)
    print(f"\nstudent speed on {res['device']} ({res['student']}; {a.rounds} rounds × {a.steps} steps in slices "
          f"of {a.slice_steps}, after {a.warmup} warm-up steps)")
    print(markdown_table(table_rows(res), TABLE_COLUMNS))
    print(markdown_table(ratio_rows(res["ratios"], res["ratios_spread"], res["verdicts"]), RATIO_COLUMNS))
    print("\n".join(verdict_lines(res["verdicts"])))
    print(f"written {write_results('student_speed', res)}")
    return res


if __name__ == "__main__":
    main()
