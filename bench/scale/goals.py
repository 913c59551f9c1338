"""The reader's goals (c) and (d) alone, in more rounds than the whole report can afford.

    python -m bench --scale --workdir DIR                 # first: the report, which makes the reader's caches
    python -m bench.scale.goals --workdir DIR --rounds 16 # then: images alone, (c) and (d) from local disk
    python -m bench.scale.goals --workdir DIR --rounds 16 --s3

On this machine one round of the report's 12 reader configurations takes ~2.5 minutes, so its 8 rounds leave a
ratio's interval wide enough that (c) and (d) stay undecided at medians of 0.91–0.95. This runs only the three
configurations the goals compare — images alone, Swin-L's final tap (c), ViT-L's three taps (d) — from the
report's caches in the same way (:func:`bench.scale.reader.read` with the report's default workers and batch, ``--epochs`` epochs in
one DataLoader a configuration and round, rounds in seeded orders, :func:`bench.common.round_orders`) and judges
each goal with the report's own rule (:func:`bench.common.judge`). Beside each verdict, the most the goal's ratio
can be on this machine (:mod:`bench.scale.ceiling`): the CPU a sample costs with images alone in these rounds (the
workers', the main process's and, from S3, the server's; median of the rounds) against the least the goal's target
rows add to it. Prints the rounds, the verdicts and the ceilings and writes ``bench/scale_goals_local.json``
(``_s3`` with ``--s3``); leaves ``bench/results.md`` alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from ..common import OUT, judge, quantile, ratio_summary, round_orders, verdict_lines
from . import ceiling as ceil
from . import parser as report_parser
from .caches import reader_caches
from .reader import MotoS3, dataset, read, target_bytes, upload
from .spec import GOALS

NAMES = ["images_only", *(name for name, _ in GOALS["reader"])]


def goals(rates: dict[str, list[float]], src: str) -> list[dict]:
    """Each reader goal judged on per-round samples/s ``rates`` (``name: [rate a round]``) against images alone."""
    return [judge(f"reader_vs_images_only[{name}]", ratio_summary(rates[name], rates["images_only"]), target,
                  f"student reader with {name} ≥ {target} × images only ({src})") for name, target in GOALS["reader"]]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.scale.goals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True,
                   help="the workdir of `python -m bench --scale --workdir DIR` (its reader caches are reused; made "
                        "there first if missing)")
    p.add_argument("--rounds", type=int, default=16, help="rounds (default 16)")
    d = report_parser().parse_args([])  # the report's reader settings: its caches, batch, workers and epochs
    p.add_argument("--epochs", type=int, default=d.reader_epochs,
                   help=f"epochs a configuration reads each round (default {d.reader_epochs}, as the report)")
    p.add_argument("--s3", action="store_true", help="read from a moto S3 server on 127.0.0.1 instead of local disk")
    p.add_argument("--seed", type=int, default=24, help="seed of the rounds' orders")
    a = p.parse_args(argv)
    t0 = time.time()
    _, caches = reader_caches(a.workdir.resolve(), d.reader_per_tar, d.reader_tars, d.reader_batch)
    s3 = MotoS3() if a.s3 else None
    try:
        if s3 is not None:
            caches = upload(s3, a.workdir.resolve() / "reader-data", caches)[0]
        ds = {name: dataset(caches, name, s3.options if s3 is not None else None) for name in NAMES}
        for name in NAMES:  # warm-up
            read(ds[name], 1, batch_size=d.reader_batch, workers=d.workers)
        rates: dict[str, list[float]] = {name: [] for name in NAMES}
        images_ms: list[float] = []  # CPU ms a sample with images alone, each round: workers, main, S3 server
        for r, order in enumerate(round_orders(NAMES, a.rounds, a.seed)):
            for name in order:
                served = s3.cpu_seconds() if s3 is not None else 0.0
                got = read(ds[name], a.epochs, batch_size=d.reader_batch, workers=d.workers)
                rates[name].append(got["n_steady"] / got["s_steady"])
                if name == "images_only":
                    server = (s3.cpu_seconds() - served) / got["n"] if s3 is not None else 0.0
                    images_ms.append(1e3 * (got["s_cpu"] / got["n_cpu"] + got["s_main"] / got["n_main"] + server))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in NAMES), flush=True)
    finally:
        if s3 is not None:
            s3.close()
    src = "s3" if a.s3 else "local"
    verdicts = goals(rates, src)
    ns_per_byte = ceil.passes()
    ceilings = ceil.ceilings(quantile(images_ms, 0.5), {name: target_bytes(ds[name]) for name in NAMES[1:]},
                           ns_per_byte, src)
    print("\n".join(verdict_lines(verdicts)))
    print("\n".join(f"ceiling on this machine for {name}: {c['ceiling']:.3f} (images alone {c['images_cpu_ms']:.2f} "
                    f"ms of CPU a sample, its rows at least {c['least_extra_ms']:.3f} more)"
                    for name, c in ceilings.items()))
    out = {"machine": platform.processor() or platform.machine(), "finished": time.strftime("%Y-%m-%d %H:%M UTC",
           time.gmtime()), "minutes": (time.time() - t0) / 60, "source": src, "rounds": a.rounds,
           "epochs": a.epochs, "samples_per_s": rates, "goals": verdicts, "images_cpu_ms": images_ms,
           "passes_ns_per_byte": ns_per_byte, "ceilings": ceilings}
    path = OUT / f"scale_goals_{src}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
