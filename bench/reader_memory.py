"""``python -m bench.reader_memory``: what a student's data stream holds in memory at ImageNet's tar size.

A :class:`~student.data.CacheDataset` streams one tar after another through a shuffle buffer. Until
2026-12-01 it read each tar's target rows whole: for three ViT-L ViTKD taps (3 × 196 × 1024 fp16, 1.2 MB a
sample) an ImageNet tar of 1,250 samples is 1.5 GB, and a stream holds the tar it reads, the one read ahead
and the ones the shuffle buffer still points into. Since then a target array whose unit is larger than
:data:`student.stream.WHOLE_UNIT_BYTES` is read a Zarr chunk of rows at a time
(:class:`student.stream.BlockRows`). Both ways are the same code with one knob (the threshold: infinite =
whole units), measured here on one cache of ImageNet-shaped synthetic tars (``kdcache data synthetic``) with the
three taps of ``vit_large_patch16_224`` (built under :func:`bench.scale.caches.synthetic_forward`: real shapes,
about the real compressibility, no 2-CPU forward of ViT-L over thousands of images).

Each configuration runs one epoch in a fresh process, as one DataLoader worker does (views replayed at
224 px, the consumer dropping each sample), interleaved over rounds; reported: the process's peak resident
memory above what it held before the first sample (``held_mb``), that peak in all, samples/s and the largest
number of rows a single read asked for. Writes ``bench/reader_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import common

MODEL = "vit_large_patch16_224"
ROOT = Path(__file__).resolve().parents[1]  # the children run ``-m bench.reader_memory`` from here
WAYS = ("whole_units", "blocks")
COLUMNS = ["reading", "held MB", "vs whole units", "peak RSS MB", "samples/s", "largest read (rows)"]


def build(workdir: Path, *, model: str, tars: int, per_tar: int, chunk_rows: int) -> str:
    """The cache this benchmark reads (reused from an earlier run in ``workdir`` with the same config)."""
    from pipeline.job import build_cache_in_process
    from pipeline.store import CacheStore
    from pipeline.synthetic import write_synthetic

    from .scale.caches import synthetic_forward
    from .scale.caching import scale_config

    data_dir = workdir / f"data-{tars}x{per_tar}"
    if not data_dir.exists():
        t0 = time.perf_counter()
        write_synthetic(str(data_dir), classes=1000, images=tars * per_tar, per_tar=per_tar, seed=1)
        print(f"{tars} synthetic tars of {per_tar} images in {time.perf_counter() - t0:.0f} s", flush=True)
    shards = f"{data_dir}/train-{{{0:06d}..{tars - 1:06d}}}.tar"
    cfg = scale_config(model, ("vitkd",), shards, str(workdir / f"vitkd-{tars}x{per_tar}-c{chunk_rows}.zarr"),
                       batch_size=32, chunk_rows=chunk_rows)
    store = CacheStore(cfg.output.url)
    if (store.has_manifest() and (m := store.read_manifest(allow_partial=True)).status == "complete"
            and m.config.public_dict() == cfg.public_dict()):
        return cfg.output.url
    if Path(cfg.output.url).exists():
        shutil.rmtree(cfg.output.url)
    t0 = time.perf_counter()
    with synthetic_forward():
        build_cache_in_process(cfg, log=lambda s: None)
    print(f"cache {cfg.output.url}: {tars * per_tar} views in {time.perf_counter() - t0:.0f} s", flush=True)
    return cfg.output.url


def _status_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``: its peak), in MB.
    Not ``getrusage``'s ``ru_maxrss``, which Linux carries across ``exec`` from the parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(url: str, way: str, shuffle_buffer: int, whole_unit_mb: float | None = None) -> dict:
    """One epoch of ``url``'s ViTKD taps read ``way``, in this (fresh) process (``whole_unit_mb``: the blocks'
    threshold, for small test caches)."""
    import torch

    from pipeline.raw_shards import RawShard
    from pipeline.store import CacheStore
    from student import stream
    from student.data import CacheDataset

    torch.set_num_threads(1)  # as in a DataLoader worker
    if way == "whole_units":
        stream.WHOLE_UNIT_BYTES = float("inf")
    elif whole_unit_mb is not None:
        stream.WHOLE_UNIT_BYTES = whole_unit_mb * 2**20
    largest = 0
    read_unit = CacheStore.read_unit

    def counted(self, m, tar, view, names=None, lo=0, hi=None, **kw):
        nonlocal largest
        rows = read_unit(self, m, tar, view, names, lo, hi, **kw)
        largest = max(largest, *(len(a) for n, a in rows.items() if n.startswith("feat_")), 0)
        return rows

    rows_into = RawShard.rows_into

    def counted_into(self, lo, hi, dests):  # a block of an uncompressed tap, read straight into samples' buffers
        nonlocal largest
        if "/feat_" in self.path:
            largest = max(largest, hi - lo)
        return rows_into(self, lo, hi, dests)

    CacheStore.read_unit = counted
    RawShard.rows_into = counted_into
    ds = CacheDataset(url, size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), logits=False,
                      taps=("block0", "block1", "final"), shuffle_buffer=shuffle_buffer, threads=1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    n = sum(1 for _ in ds)
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    return {"way": way, "samples": n, "seconds": seconds, "base_rss_mb": base, "peak_rss_mb": peak,
            "held_mb": peak - base, "largest_read_rows": largest}


def run(url: str, *, rounds: int, shuffle_buffer: int, whole_unit_mb: float | None = None, seed: int = 0) -> dict:
    got: dict[str, list[dict]] = {w: [] for w in WAYS}
    for order in common.round_orders(WAYS, rounds, seed):
        for way in order:
            out = subprocess.run([sys.executable, "-m", "bench.reader_memory", "--child", url, "--way", way,
                                  "--shuffle-buffer", str(shuffle_buffer),
                                  *(["--whole-unit-mb", str(whole_unit_mb)] if whole_unit_mb is not None else [])],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(f"the {way} reader failed:\n{out.stderr[-3000:]}")
            got[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = got[way][-1]
            print(f"{way}: held {r['held_mb']:.0f} MB, {r['samples'] / r['seconds']:.0f} samples/s", flush=True)
    held = {w: [r["held_mb"] for r in got[w]] for w in WAYS}
    rate = {w: [r["samples"] / r["seconds"] for r in got[w]] for w in WAYS}
    held_ratio = common.ratio_summary(held["blocks"], held["whole_units"])
    rate_ratio = common.ratio_summary(rate["blocks"], rate["whole_units"])
    rows = []
    for w in WAYS:
        h, p, s = common.spread(held[w]), common.spread([r["peak_rss_mb"] for r in got[w]]), common.spread(rate[w])
        rows.append({"reading": w, "held MB": common.with_spread(h["median"], h["min"], h["max"]),
                     "vs whole units": common.with_spread(held_ratio["median"], *held_ratio["interval"])
                     if w == "blocks" else "1",
                     "peak RSS MB": common.with_spread(p["median"], p["min"], p["max"]),
                     "samples/s": common.with_spread(s["median"], s["min"], s["max"]),
                     "largest read (rows)": max(r["largest_read_rows"] for r in got[w])})
    return {"device": common.device_name(), "url": url, "rounds": rounds, "shuffle_buffer": shuffle_buffer,
            "runs": got, "held_mb": {w: common.spread(v) for w, v in held.items()},
            "samples_per_s": {w: common.spread(v) for w, v in rate.items()},
            "held_blocks_vs_whole": held_ratio, "rate_blocks_vs_whole": rate_ratio, "rows": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.reader_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("kdcache-bench-memory"),
                   help="where the synthetic tars and the cache go (reused when the config matches)")
    p.add_argument("--tars", type=int, default=3, help="synthetic tars (default 3)")
    p.add_argument("--per-tar", type=int, default=1250, help="images a tar (default 1250: ImageNet's)")
    p.add_argument("--chunk-rows", type=int, default=64, help="the cache's job.chunk_rows (default 64, kdcache's)")
    p.add_argument("--shuffle-buffer", type=int, default=1024, help="the reader's buffer (default 1024, kdcache's)")
    p.add_argument("--model", default=MODEL, help=f"the teacher whose taps are cached (default {MODEL})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--whole-unit-mb", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    if a.child:
        res = child(a.child, a.way, a.shuffle_buffer, a.whole_unit_mb)
        print(json.dumps(res))
        return res
    a.workdir.mkdir(parents=True, exist_ok=True)
    url = build(a.workdir, model=a.model, tars=a.tars, per_tar=a.per_tar, chunk_rows=a.chunk_rows)
    res = run(url, rounds=a.rounds, shuffle_buffer=a.shuffle_buffer, whole_unit_mb=a.whole_unit_mb)
    res |= {"model": a.model, "tars": a.tars, "per_tar": a.per_tar, "chunk_rows": a.chunk_rows}
    print(common.markdown_table(res["rows"], COLUMNS))
    print(f"written to {common.write_results('reader_memory', res)}")
    return res


if __name__ == "__main__":
    main()
