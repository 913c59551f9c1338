"""``python -m bench.s3_reads``: the student's reader from S3 with a cache's arrays read through obstore (the
default since 2026-12-01, :mod:`pipeline.s3_reads`) against s3fs (``KDCACHE_S3_READS=fsspec``, the reads before).

The reader of :mod:`bench.scale` part 3 (:func:`bench.scale.reader.read`: :class:`~student.data.CacheDataset`,
224 px view replay, DataLoader workers, the loader's shared-memory hand-over) over its caches
(:func:`bench.scale.caches.reader_caches`, reused from ``--workdir``) uploaded to a moto S3 server in its own
process on 127.0.0.1, for (a) images only and (d) ViT-L's three ViTKD taps, each with either client; the four
configurations take turns in ``--rounds`` interleaved rounds (:func:`bench.common.round_orders`). Reported per
configuration: samples/s in the steady state, the workers' CPU ms a sample (steadier than a rate on a shared
machine), the S3 server's CPU ms a sample (what serving costs this machine: moto shares the 2 cores); and, paired
by round, obstore ÷ s3fs samples/s for each target set and (d) ÷ (a) under each client. The tars are read
through fsspec either way (only the cache's arrays move to obstore). Writes ``bench/s3_reads.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from functools import partial
from pathlib import Path

from . import common
from .scale.caches import reader_caches
from .scale.reader import MotoS3, read, upload
from .scale.spec import MEAN, READER, SIZE, STD

CLIENTS = ("obstore", "s3fs")
TARGETS = ("images_only", "vitkd_3taps")
ENV = "KDCACHE_S3_READS"


@contextlib.contextmanager
def client(name: str):
    """The S3 client a DataLoader's workers read the cache's arrays with: they are forked inside this block and
    choose it from the environment (:func:`pipeline.s3_reads.s3_config`)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "fsspec" if name == "s3fs" else "auto"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def run(a: argparse.Namespace, workdir: Path) -> dict:
    from student.data import CacheDataset

    _, caches = reader_caches(workdir, a.per_tar, a.tars, 6)
    s3 = MotoS3()
    try:
        urls = upload(s3, workdir / "reader-data", caches)[0]
        datasets = {}
        for target in TARGETS:
            key, logits, taps = READER[target]
            datasets[target] = CacheDataset(urls[key], storage_options=s3.options, input_storage_options=s3.options,
                                            size=SIZE, mean=MEAN, std=STD, logits=logits, taps=taps, threads=1,
                                            shuffle_buffer=256)
        names = [f"{c}/{t}" for c in CLIENTS for t in TARGETS]
        kw = {"batch_size": a.batch, "workers": a.workers}
        for name in names:  # warm-up: imports in the workers, S3 connections, the server's first requests
            c, t = name.split("/")
            with client(c):
                read(datasets[t], 1, **kw)
        acc = {k: {"n": [], "s": [], "cpu_n": [], "cpu_s": [], "server_s": []} for k in names}
        for r, order in enumerate(common.round_orders(names, a.rounds, a.seed)):
            for name in order:
                c, t = name.split("/")
                server0 = s3.cpu_seconds()
                with client(c):
                    got = read(datasets[t], a.epochs, **kw)
                for k, v in (("n", got["n_steady"]), ("s", got["s_steady"]), ("cpu_n", got["n_cpu"]),
                             ("cpu_s", got["s_cpu"]), ("server_s", s3.cpu_seconds() - server0)):
                    acc[name][k].append(v)
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {acc[k]['n'][-1] / acc[k]['s'][-1]:.1f}"
                                                          for k in names), flush=True)
        requests = s3.requests()
    finally:
        s3.close()
    rate = {k: [n / s for n, s in zip(v["n"], v["s"], strict=True)] for k, v in acc.items()}
    rows = [{"client": k.split("/")[0], "targets": k.split("/")[1], "samples_per_s": common.spread(rate[k]),
             "worker_cpu_ms_per_sample": common.spread([1e3 * s / n for n, s in zip(v["cpu_n"], v["cpu_s"],
                                                                                     strict=True)]),
             "server_cpu_ms_per_sample": common.spread([1e3 * s / n for n, s in zip(v["n"], v["server_s"],
                                                                                     strict=True)])}
            for k, v in acc.items()]
    return {"machine": common.device_name(), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rounds": a.rounds, "epochs": a.epochs, "workers": a.workers, "batch": a.batch,
            "samples_per_epoch": datasets[TARGETS[0]].num_samples(a.workers), "s3_requests": requests, "rows": rows,
            "obstore_vs_s3fs": {t: common.ratio_summary(rate[f"obstore/{t}"], rate[f"s3fs/{t}"]) for t in TARGETS},
            "vitkd_vs_images_only": {c: common.ratio_summary(rate[f"{c}/vitkd_3taps"], rate[f"{c}/images_only"])
                                     for c in CLIENTS},
            "load": os.getloadavg()[0]}


def markdown(res: dict) -> str:
    table = common.markdown_table(
        [{"client": r["client"], "targets": r["targets"],
          "samples/s": common.with_spread(r["samples_per_s"]["median"], r["samples_per_s"]["min"],
                                           r["samples_per_s"]["max"]),
          "worker CPU ms/sample": f"{r['worker_cpu_ms_per_sample']['median']:.1f}",
          "server CPU ms/sample": f"{r['server_cpu_ms_per_sample']['median']:.1f}"} for r in res["rows"]],
        ["client", "targets", "samples/s", "worker CPU ms/sample", "server CPU ms/sample"])
    lines = [table, ""]
    for t, s in res["obstore_vs_s3fs"].items():
        lines.append(f"- obstore ÷ s3fs, {t}: {common.with_spread(s['median'], *s['interval'])}")
    for c, s in res["vitkd_vs_images_only"].items():
        lines.append(f"- ViTKD taps ÷ images only through {c}: {common.with_spread(s['median'], *s['interval'])}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.s3_reads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per configuration per round, one DataLoader "
                                                         "(default 3, as bench.scale's --reader-slice)")
    p.add_argument("--per-tar", type=int, default=32, help="images per tar (default 32, as bench.scale's)")
    p.add_argument("--tars", type=int, default=6, help="tars (default 6, as bench.scale's)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the rounds' order")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the reader's data and caches are kept and reused (bench.scale's --workdir works: "
                        "the same caches); default a temporary folder")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    res = common.in_workdir(a.workdir, "kdcache-s3-reads-", partial(run, a))
    path = common.write_results("s3_reads", res)
    print("\n" + markdown(res))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main()
