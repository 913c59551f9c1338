"""``python -m bench.collate``: what a DataLoader worker's collation costs at real sizes, three ways.

A worker hands its batch to the main process through shared memory. ``private+share`` is how the student's
collate worked until 2026-11-30 (and how ``torch.stack`` behaves outside ``default_collate``): stack into private
memory, then the DataLoader copies the batch into a fresh shared segment. ``shared`` is
:func:`student.batch.stack` in a worker: allocate the shared segment first and let NumPy stack into it. Measured
for a batch of ViTKD tap rows at real size (3 taps × 196 tokens × 1024 channels, fp16, 1.2 MB a sample) and one
of 224-px images (fp32), in CPU milliseconds of this process per batch (``process_time``: every thread, which the
machine's other work hardly moves), configurations taking turns in interleaved rounds; ratio = shared ÷
private+share per round. ``ring`` is how the student's loader hands a batch over since 2026-12-01
(:mod:`student.ring`): the worker stacks it into a reused shared-memory slot and the main process copies it out
(to its device; here a CPU tensor), both sides counted. Writes ``bench/collate.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from student.batch import stack
from student.ring import BatchRing, packed_bytes

from .common import (
    device_name,
    markdown_table,
    ratio_summary,
    round_orders,
    spread,
    with_spread,
    write_results,
)

SHAPES = {"vitkd_3taps_rows": ((3, 196, 1024), np.float16), "images_224": ((3, 224, 224), np.float32)}


def private_then_shared(items: list) -> torch.Tensor:
    """The old way: a stack in private memory, then the DataLoader's move of it into shared memory."""
    out = torch.stack(items) if isinstance(items[0], torch.Tensor) else torch.from_numpy(np.stack(items))
    return out.share_memory_()


def cpu_ms(fn: Callable[[list], torch.Tensor], items: list, repeats: int) -> float:
    t0 = time.process_time()
    for _ in range(repeats):
        fn(items)
    return 1e3 * (time.process_time() - t0) / repeats


def run(batch_size: int, rounds: int, repeats: int, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    data = {}
    for name, (shape, dtype) in SHAPES.items():
        arrays = [g.standard_normal(shape).astype(dtype) for _ in range(batch_size)]
        data[name] = arrays if name.endswith("rows") else [torch.from_numpy(a) for a in arrays]
    ring = BatchRing(1, 1, max(packed_bytes({"a": ((batch_size, *shape), dt)}) for shape, dt in SHAPES.values()))
    ways = {"private+share": private_then_shared, "shared": lambda items: stack(items, shared=True),
            "ring": lambda items: ring.take(ring.put({"a": items}, worker=0))["a"]}
    configs = [f"{n}/{w}" for n in SHAPES for w in ways]
    ms: dict[str, list[float]] = {c: [] for c in configs}
    for c in configs:  # warm-up: allocator, page cache of the shared-memory folder
        n, w = c.split("/")
        cpu_ms(ways[w], data[n], 2)
    for order in round_orders(configs, rounds, seed):
        for c in order:
            n, w = c.split("/")
            ms[c].append(cpu_ms(ways[w], data[n], repeats))
    ratios = {n: ratio_summary(ms[f"{n}/shared"], ms[f"{n}/private+share"]) for n in SHAPES}
    ring_ratios = {n: ratio_summary(ms[f"{n}/ring"], ms[f"{n}/private+share"]) for n in SHAPES}
    vs_private = {"shared": ratios, "ring": ring_ratios}
    rows = []
    for n in SHAPES:
        for w in ways:
            s = spread(ms[f"{n}/{w}"])
            q = vs_private[w][n] if w in vs_private else None
            rows.append({"batch": n, "collation": w, "cpu_ms_per_batch": with_spread(s["median"], s["min"], s["max"]),
                         "vs private+share": with_spread(q["median"], *q["interval"]) if q else "1"})
    return {"device": device_name(), "batch_size": batch_size, "rounds": rounds, "repeats": repeats,
            "cpu_ms_per_batch": {c: spread(v) for c, v in ms.items()}, "cpu_ms_per_round": ms,
            "shared_vs_private": ratios, "ring_vs_private": ring_ratios,
            "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="samples a batch (default 16, bench.scale's reader)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--repeats", type=int, default=10, help="batches per configuration per round (default 10)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    res = run(a.batch_size, a.rounds, a.repeats)
    print(markdown_table(res["rows"], ["batch", "collation", "cpu_ms_per_batch", "vs private+share"]))
    print(f"written to {write_results('collate', res)}")
    return res


if __name__ == "__main__":
    main()
