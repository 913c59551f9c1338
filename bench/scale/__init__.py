"""Real scale on a small machine (issue 15): real-size teachers through the caching job, the student's reader at
real target sizes, and one report of items 1–4 (``python -m bench --scale``).

    python -m bench.scale                                   # the report (≤ 25 min on 2 idle cores)
    python -m bench.scale --images 16 --rounds 1 --reader-rounds 1 --data-path-images 8   # a quick look

Four parts, on ImageNet-shaped synthetic JPEGs (:mod:`pipeline.synthetic`, 1,000 classes, ~110 KB, ~500×375):

1. **Data path per core, cores per GPU** (item 2): :func:`bench.decode_once.main`, called as it is (its views/s
   per core with and without decode-once, and from them the cores needed per GPU by each teacher at its published
   rate).
2. **Caching job vs the teacher's forward alone** (item 3; :mod:`bench.scale.caching`):
   swin_large_patch4_window7_224 (cached for KD + ScaleKD: top-10 logits, the final tap 49×1536, the TPP tail)
   and vit_large_patch16_224 (KD + ViTKD + ScaleKD: top-10 logits, blocks 0 and 1 and the final tap,
   3×196×1024, the TPP tail), random init (timm builds them without weights; the job seeds a teacher that has
   none), 224 px, fp16 taps. In each of ``--rounds`` rounds: the teacher's forward alone over the first half of
   the job's own batches (replayed as the job replays them; run in a Ray worker with the actor's threads and
   teacher, :class:`~bench.scale.caching.ForwardActor`), the full Ray job into a fresh cache, the other half of
   the forward (:mod:`bench.cache_throughput`'s functions). The data are ``--images`` images in tars of
   ``--per-tar``; the first tar is the actor's warm-up (its first forward calls) and is left out of the steady
   state, which is views/s inside the other units (their completion records); end to end is every view over the
   job's whole time (index pass, teacher probe, TPP pack, actor start, manifest: fixed costs that a job of
   1,024 tars amortises). Ray workers run at nice 0, as this process does.
3. **Student reader** (item 4; :mod:`bench.scale.reader`): samples/s of :class:`student.data.CacheDataset`
   (tars + cache rows + view replay at 224 px, ``--workers`` DataLoader workers handing batches over through the
   loader's reused shared-memory slots, :mod:`student.ring`, each batch copied out in the main process as the
   trainer's loader copies it to its device) over caches of synthetic-forward rows
   (:func:`bench.scale.caches.reader_caches`), with targets (a) none, (b) top-10 logits, (c) Swin-L's final
   tap, (d) ViT-L's three ViTKD taps (also with zstd and as int8); from local disk and from S3 (a moto server in
   its own process on 127.0.0.1 that reads a ranged GET's range alone, :mod:`bench.scale.moto_server`; tars and
   cache uploaded, the manifest's tar URLs pointed at the bucket). The
   configurations take turns in ``--reader-rounds`` rounds (:func:`bench.common.round_orders`,
   :func:`bench.common.interleave`: each reads ``--reader-epochs`` epochs of its cache a round, in slices of
   ``--reader-slice`` epochs, one DataLoader per slice); ratios (b), (c), (d) to (a) are paired by round.
4. **Bytes per view** at real shapes (:mod:`bench.scale.nbytes`): as stored by the job (fp16), and the same
   tokens through the int8 codec and the cache's Zarr codec chain (same chunks and shards, in memory); the fp16
   figure recomputed that way too, as a check of the method. The TPP pack's size per cache.

The settings they share (teachers, reader configurations, goals) are in :mod:`bench.scale.spec`. Writes
``bench/scale.json``, the key ``scale`` of ``bench/results.json`` and a "Real scale" section of
``bench/results.md`` (:mod:`bench.scale.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch

from pipeline.job import init_ray
from pipeline.tars import expand_urls

from .. import decode_once
from ..common import OUT, in_workdir
from . import caching, reader
from .caches import reader_caches
from .nbytes import bytes_table
from .reader import MotoS3, upload
from .report import headline, markdown, write_report
from .spec import TEACHERS, WARM_TARS

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
            jobs = {m: caching.caching(m, data, workdir, a.rounds, a.batch_size, a.per_tar) for m in TEACHERS}
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
            rd = reader.reader(srcs, s3.options if s3 else None, a.reader_rounds, a.reader_epochs, a.reader_slice,
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
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=18, help="synthetic images (default 18)")
    p.add_argument("--per-tar", type=int, default=6, help="images per tar (default 6; the first tar warms the actor)")
    p.add_argument("--batch-size", type=int, default=6, help="the job's (and the forward's) batch size")
    p.add_argument("--rounds", type=int, default=5, help="rounds of forward / job / forward per teacher (default 5)")
    p.add_argument("--job-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="the caching job's actor CPUs and the forward's threads, both sides alike (default: the "
                        "cores but one, which Ray's own processes need beside the actor — raylet, GCS, the Ray Data "
                        "executor in the driver, its stats actors; with every core the forward shares them and the job "
                        "falls behind: Swin-L 0.78 of the forward with 2 threads on 2 cores, 1.0 with 1, 2026-12-01)")
    p.add_argument("--reader-per-tar", type=int, default=128,
                   help="images per tar of the reader's caches (default 128, in Zarr chunks of 64: a unit of ViT-L's "
                        "taps or Swin-L's final tap is then over student.stream.WHOLE_UNIT_BYTES, so the reader reads "
                        "them a 64-row block at a time and copies each sample's rows out, as it reads ImageNet's "
                        "1,250-sample tars; with 32, the default before 2026-12-02, it read every unit whole)")
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
    per_worker = a.reader_tars // max(a.workers, 1) * a.reader_per_tar  # a worker's samples an epoch (whole tars)
    if "reader" in a.parts and per_worker < 2 * a.reader_batch:
        raise SystemExit(f"--reader-tars {a.reader_tars} of --reader-per-tar {a.reader_per_tar} give each of the "
                         f"{a.workers} workers {per_worker} samples an epoch, under two batches of {a.reader_batch}: "
                         "the reader's steady state (a worker's batches after its first) would be empty; raise "
                         "--reader-tars or --reader-per-tar")
    last = OUT / "scale.json"
    if set(a.parts) != set(PARTS) and not last.exists():  # checked first: nothing is measured in vain
        raise SystemExit(f"--parts {' '.join(a.parts)} reruns those parts and keeps the others from {last}, which "
                         "is not here (bench/*.json are not in git): run `python -m bench --scale` whole first; "
                         "a report of some parts alone would drop the others from bench/results.md")
    res = in_workdir(a.workdir, "kdcache-scale-", partial(run, a))
    if set(a.parts) != set(PARTS):  # a partial rerun (refused above without a last run): the others as last measured
        res = merged(res, json.loads(last.read_text()))
    write_report(res)
    print("\n" + markdown(res))
    print(f"written {OUT / 'scale.json'}, the key 'scale' of {OUT / 'results.json'} and {OUT / 'results.md'}")
    return res

