"""Part 3 of :mod:`bench.scale` (issue 15 item 4): the student's reader over caches at real target sizes, from
local disk and from S3 (a moto server on this machine), in interleaved rounds."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.store import CacheStore
from storage_schemas.manifest import Manifest
from student.batch import collate_rows, received, stack
from student.data import CacheDataset
from student.plan import Task
from student.ring import BatchRing, packed_bytes
from student.stream import load_rows

from ..common import interleave, quantile, ratio_summary, round_orders, spread
from .ceiling import ceilings, passes
from .spec import MEAN, READER, SIZE, STD


class Epochs(IterableDataset):
    """``epochs`` consecutive epochs of ``ds`` in one iteration (one DataLoader start for all of them), as the
    trainer's loop reads them one after another."""

    def __init__(self, ds: CacheDataset, epochs: int, first: int = 0) -> None:
        self.ds, self.epochs, self.first = ds, epochs, first

    def __iter__(self) -> Iterator:
        for e in range(self.first, self.first + self.epochs):
            self.ds.set_epoch(e)
            yield from iter(self.ds)


def timed_collate(samples: list, names: Sequence[str], ring: BatchRing | None = None) -> dict:
    """:func:`student.batch.collate_rows` (through ``ring`` as the trainer's loader does), stamped with when the
    worker finished the batch (``perf_counter``: the system-wide monotonic clock on Linux, the same in every
    process), which worker, and the CPU seconds that worker process had used by then (``process_time``: all its
    threads)."""
    info = get_worker_info()
    return {**collate_rows(samples, names, ring=ring), "produced": time.perf_counter(),
            "worker": info.id if info else -1, "cpu": time.process_time()}


def steady_cpu(stamps: list[tuple[int, float, int]]) -> tuple[int, float]:
    """Samples and CPU seconds of the workers in their steady state, from ``(worker, cpu seconds, batch size)`` of
    each batch: each worker's batches after its first, and the CPU it used from its first batch to its last. CPU
    time, unlike a rate, hardly moves with what else runs on the machine: the reader's cost per sample."""
    by_worker: dict[int, list[tuple[float, int]]] = {}
    for w, cpu, n in stamps:
        by_worker.setdefault(w, []).append((cpu, n))
    n_total, cpu_total = 0, 0.0
    for got in by_worker.values():
        got.sort()
        n_total += sum(n for _, n in got[1:])
        cpu_total += got[-1][0] - got[0][0]
    return n_total, cpu_total


def steady_rate(produced: list[tuple[float, int]], workers: int) -> tuple[int, float]:
    """Samples and seconds of the steady state of one DataLoader from its batches' ``(production time, size)``:
    the batches made after the first ``max(workers, 1)`` (by then every worker has started: its start, opening the
    cache and its first tar lie before) over the time from the last of those to the last batch. Production times,
    not arrival times: batches a worker made while the main process still waited for another worker's first batch
    count at the time they were made."""
    times = sorted(produced)
    k = min(max(workers, 1), len(times) - 1)
    if k < 1:
        return 0, 0.0
    return sum(n for _, n in times[k:]), times[-1][0] - times[k - 1][0]


def read(ds: CacheDataset, epochs: int, *, batch_size: int, workers: int) -> dict:
    """``epochs`` epochs of ``ds`` through a DataLoader of ``workers`` workers, as the trainer's loader runs it, up
    to the batches it hands out (``collate_rows`` in the workers; decoding the targets to fp32 is the training
    device's work, in the step: :func:`decode_ms`). Returns samples and seconds in all (``n``, ``s``), the seconds
    to the first batch (``first_s``: the workers' start, opening the cache and the first tar), the steady
    state's samples and seconds (``n_steady``, ``s_steady``: :func:`steady_rate`), which an epoch of ImageNet's
    size is all but made of, and the CPU seconds of the workers (``n_cpu``, ``s_cpu``: :func:`steady_cpu`) and of
    this process (``n_main``, ``s_main``: taking each batch out of its slot, the loader's own work) in it."""
    with ds.batch_ring(batch_size, workers) if workers else contextlib.nullcontext() as ring:
        dl = DataLoader(Epochs(ds, epochs), batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(timed_collate, names=ds.targets, ring=ring), persistent_workers=False)
        produced: list[tuple[float, int]] = []
        cpu: list[tuple[int, float, int]] = []
        main: list[tuple[float, int]] = []  # this process's CPU seconds when each batch was out of its slot
        t0 = time.perf_counter()
        t_first = None
        for raw in dl:
            raw = received(raw, ring)  # out of its slot, as the loader copies it to the training device
            produced.append((raw["produced"], len(raw["label"])))
            cpu.append((raw["worker"], raw["cpu"], len(raw["label"])))
            main.append((time.process_time(), len(raw["label"])))
            t_first = t_first or time.perf_counter()
    t1 = time.perf_counter()
    n_steady, s_steady = steady_rate(produced, workers)
    n_cpu, s_cpu = steady_cpu(cpu)
    n_main, s_main = steady_rate(main, workers)  # the same steady state, on this process's CPU clock
    return {"n": sum(n for _, n in produced), "s": t1 - t0, "first_s": (t_first or t1) - t0, "n_steady": n_steady,
            "s_steady": s_steady, "n_cpu": n_cpu, "s_cpu": s_cpu, "n_main": n_main, "s_main": s_main}


def breakdown_ms(ds: CacheDataset, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """CPU milliseconds per sample, in this process, of what a worker does for ``ds``'s targets on top of the
    images: reading every tar's target rows as a worker does (:func:`student.stream.load_rows`: a unit at a time,
    or for a unit over ``WHOLE_UNIT_BYTES`` a block at a time into each sample's buffer,
    :class:`student.stream.BlockRows`; read, checksums, and for arrays with zstd Zarr's decompression and
    copies; uncompressed ones by :mod:`pipeline.raw_shards`) and handing them over in batches as the loader does
    (:meth:`student.ring.BatchRing.put`, the worker's stack into a reused shared-memory slot, and
    :meth:`~student.ring.BatchRing.take`, the main process's copy out of it; ``fresh_shared_memory``:
    :func:`student.batch.stack` into a new shared segment, the DataLoader's usual way, for comparison)."""
    if not ds.targets:
        return {"read_rows": 0.0, "hand_over": 0.0, "fresh_shared_memory": 0.0}
    store, m = ds.store(), ds.m

    def tar_rows(t: int) -> Iterator[dict[str, np.ndarray]]:  # each position's rows of ds.targets, in tar order
        count = m.dataset.shards[t].count
        loaded = load_rows(store, m, Task(tar=t, n=count, views=(0,)), ds.targets, random_policy=False, seed=0,
                           epoch=0)
        for p in range(count):
            yield {name: a[p] for name, a in loaded.rows.items()} | (loaded.blocks.at(p) if loaded.blocks else {})
        if loaded.blocks:
            loaded.blocks.close()

    first = list(tar_rows(0))  # warm-up (metadata); rows of one tar kept for the collation
    one = {name: np.stack([r[name] for r in first]) for name in ds.targets}
    n = 0
    t0 = time.process_time()
    for _ in range(repeats):
        for t in range(len(m.dataset.shards)):  # each sample's rows dropped before the next, as the stream goes
            n += sum(1 for _ in tar_rows(t))
    read = time.process_time() - t0
    out = {"read_rows": 1e3 * read / n}
    ring = BatchRing(1, 1, packed_bytes({k: ((batch_size, *v.shape[1:]), v.dtype) for k, v in one.items()}))
    ways = {"hand_over": lambda rows: ring.take(ring.put(rows, worker=0)),
            "fresh_shared_memory": lambda rows: {k: stack(v, shared=True) for k, v in rows.items()}}
    for way, hand_over in ways.items():
        hand_over({k: list(v[:batch_size]) for k, v in one.items()})  # warm-up: the slot's pages
        t0 = time.process_time()
        done = 0
        for _ in range(repeats):
            for lo in range(0, len(one[ds.targets[0]]), batch_size):
                done += len(hand_over({k: list(v[lo:lo + batch_size]) for k, v in one.items()})[ds.targets[0]])
        out[way] = 1e3 * (time.process_time() - t0) / done
    return out


def decode_ms(ds: CacheDataset, batch_size: int, batches: int = 2, repeats: int = 3) -> float:
    """Milliseconds per sample of decoding a batch's targets to fp32 on this CPU (:meth:`CacheDataset.collate`),
    what the training step does on its device."""
    it = iter(DataLoader(Epochs(ds, 1), batch_size=batch_size, num_workers=0,
                         collate_fn=partial(collate_rows, names=ds.targets)))
    raws = [next(it) for _ in range(batches)]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for raw in raws:
            ds.collate(raw)
    return 1e3 * (time.perf_counter() - t0) / (repeats * sum(len(r["label"]) for r in raws))


def relocated(m: Manifest, urls: dict[str, str]) -> Manifest:
    """``m`` with its tars' URLs replaced by ``urls[old]`` (a cache and its tars copied elsewhere together);
    the dataset fingerprint recomputed as the job computes it, over (url, size, count)."""
    import hashlib

    shards = [s.model_copy(update={"url": urls[s.url]}) for s in m.dataset.shards]
    rows = [[s.url, s.size, s.count] for s in shards]
    fp = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return m.model_copy(update={"dataset": m.dataset.model_copy(update={"shards": shards, "fingerprint": fp})})


class MotoS3:
    """A moto S3 server in its own process on 127.0.0.1 (so that serving does not hold this process's GIL), one
    bucket, and the s3fs options to reach it (as ``tests/conftest.py``'s ``moto_s3``). The server reads a ranged
    GET's range alone (:mod:`bench.scale.moto_server`), where moto as it is reads the whole object for each."""

    def __init__(self, bucket: str = "kdcache") -> None:
        import boto3

        self.log = tempfile.TemporaryFile("w+")  # its request log: a line a request
        server = Path(__file__).with_name("moto_server.py")  # a script: the bench package would import torch there
        self.proc = subprocess.Popen([sys.executable, str(server)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = ""
        while not line.startswith("endpoint "):  # moto prints a line of its own first
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                raise RuntimeError(f"the moto S3 server did not start: {self.log.read()[-2000:]}")
        self.endpoint = f"http://{line.split()[1]}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret-0xKDC"}
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **creds).create_bucket(Bucket=bucket)
        self.bucket = bucket
        self.options = {"key": creds["aws_access_key_id"], "secret": creds["aws_secret_access_key"],
                        "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests(self) -> int:
        """Requests served so far (lines of its log)."""
        self.log.flush()
        self.log.seek(0)
        return sum(1 for line in self.log if '" ' in line and "HTTP/1.1" in line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def upload(s3: MotoS3, data_dir: Path, caches: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The tars and the caches (without their TPP packs, which the reader does not read) copied to the bucket,
    each cache's manifest pointed at the bucket's tars. Returns the S3 URL of each cache and of each tar."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options)
    tar_urls = {}
    for p in sorted(data_dir.glob("*.tar")):
        fs.put_file(str(p), f"{s3.bucket}/data/{p.name}")
        tar_urls[str(p)] = f"s3://{s3.bucket}/data/{p.name}"
    out = {}
    for key, url in caches.items():
        root = Path(url)
        dest = f"{s3.bucket}/caches/{root.name}"
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not rel.startswith("tpp/"):
                fs.put_file(str(p), f"{dest}/{rel}")
        out[key] = f"s3://{dest}"
        m = CacheStore(url, read_only=True).read_manifest()
        CacheStore(out[key], s3.options).write_manifest(relocated(m, tar_urls))
    return out, tar_urls


def target_bytes(ds: CacheDataset) -> tuple[float, float]:
    """Per sample, bytes of ``ds``'s target arrays as stored (compressed, from the manifest) and as decoded
    rows (their dtype and shape)."""
    m = ds.m
    stored = sum(m.stats.bytes_per_view.get(c.target, 0.0) for c in m.codecs()
                 if any(n in ds.targets for n in c.names))
    raw = sum(int(np.prod(m.arrays[n].shape[2:])) * np.dtype(m.arrays[n].dtype).itemsize for n in ds.targets)
    return stored, float(raw)


def dataset(caches: dict[str, str], name: str, storage_options: dict | None = None) -> CacheDataset:
    """Reader configuration ``name`` (:data:`~bench.scale.spec.READER`) over ``caches`` (``key: URL`` of the reader's
    caches), the tars and the cache read with ``storage_options``, as the trainer's loader would open it."""
    key, logits, taps = READER[name]
    return CacheDataset(caches[key], storage_options=storage_options, input_storage_options=storage_options,
                        size=SIZE, mean=MEAN, std=STD, logits=logits, taps=taps, threads=1, shuffle_buffer=256)


def reader(caches: dict[str, dict[str, str]], s3_options: dict | None, rounds: int, epochs: int, slice_epochs: int,
           batch_size: int, workers: int, seed: int = 0, server_cpu: Callable[[], float] = lambda: 0.0) -> dict:
    """The reader configurations (:data:`READER` × local/S3) in ``rounds`` interleaved rounds: samples/s
    after each DataLoader's first batch (see :func:`read`), paired by round; ``server_cpu()`` the S3 server's CPU
    seconds so far (what it costs this machine to serve). Each configuration with targets also gets its ``ceiling``
    on this machine (:mod:`bench.scale.ceiling`): the most its ratio to images alone can be, from images alone's CPU
    a sample (workers, main process and S3 server; medians of the rounds) and the least its rows add."""
    datasets = {f"{src}/{name}": dataset(caches[src], name, s3_options if src == "s3" else None)
                for src in caches for name in READER}
    names = list(datasets)
    for name in names:  # warm-up: imports in the workers, page cache, S3 connections
        read(datasets[name], 1, batch_size=batch_size, workers=workers)
    cpu0 = {k: 0.0 for k in names}  # the S3 server's CPU seconds while each configuration read
    samples = {k: [] for k in names}
    seconds = {k: [] for k in names}
    first = {k: [] for k in names}
    cpu_n = {k: [] for k in names}
    cpu_s = {k: [] for k in names}
    main_n = {k: [] for k in names}
    main_s = {k: [] for k in names}
    for r, order in enumerate(round_orders(names, rounds, seed)):
        for k in names:
            for acc in (samples, seconds, cpu_n, cpu_s, main_n, main_s):
                acc[k].append(0)
        for name, e in interleave(order, epochs, slice_epochs):
            c = server_cpu()
            got = read(datasets[name], e, batch_size=batch_size, workers=workers)
            cpu0[name] += server_cpu() - c
            samples[name][-1] += got["n_steady"]
            seconds[name][-1] += got["s_steady"]
            cpu_n[name][-1] += got["n_cpu"]
            cpu_s[name][-1] += got["s_cpu"]
            main_n[name][-1] += got["n_main"]
            main_s[name][-1] += got["s_main"]
            first[name].append(got["first_s"])
        print(f"reader round {r + 1}/{rounds}: " + ", ".join(f"{k} {samples[k][-1] / seconds[k][-1]:.1f}"
                                                             for k in names), flush=True)
    rate = {k: [n / s for n, s in zip(samples[k], seconds[k], strict=True)] for k in names}
    per_cpu_s = {k: [n / s for n, s in zip(cpu_n[k], cpu_s[k], strict=True)] for k in names}  # samples per CPU s
    rows, ratios, cpu_ratios = [], {}, {}
    for src in caches:
        base = rate[f"{src}/images_only"]
        ratios[src] = {name: ratio_summary(rate[f"{src}/{name}"], base) for name in READER if name != "images_only"}
        cpu_ratios[src] = {name: ratio_summary(per_cpu_s[f"{src}/{name}"], per_cpu_s[f"{src}/images_only"])
                           for name in READER if name != "images_only"}
        for name in READER:
            k = f"{src}/{name}"
            stored, raw = target_bytes(datasets[k])
            sp = spread(rate[k])
            rows.append({"source": src, "targets": name, "samples_per_s": sp, "stored_bytes_per_sample": stored,
                         "decoded_bytes_per_sample": raw, "cache_mb_per_s_stored": sp["median"] * stored / 1e6,
                         "cache_mb_per_s_decoded": sp["median"] * raw / 1e6,
                         "first_batch_s": quantile(first[k], 0.5),
                         "worker_cpu_ms_per_sample": spread([1e3 / x for x in per_cpu_s[k]]),
                         "main_cpu_ms_per_sample": spread([1e3 * s / n for n, s in zip(main_n[k], main_s[k], strict=True)]),
                         "cpu_vs_images_only": None if name == "images_only" else cpu_ratios[src][name],
                         "server_cpu_ms_per_sample": 1e3 * cpu0[k] / sum(samples[k]) if src == "s3" else None,
                         "decode_ms_per_sample": decode_ms(datasets[k], batch_size) if src == "local" else None,
                         "breakdown_ms_per_sample": breakdown_ms(datasets[k], batch_size) if src == "local" else None,
                         "vs_images_only": None if name == "images_only" else ratios[src][name]})
    ns_per_byte = passes()
    for src in caches:  # the most each ratio can be here (bench.scale.ceiling), from images alone's CPU a sample
        mine = {r["targets"]: r for r in rows if r["source"] == src}
        base = mine.pop("images_only")
        images_ms = (base["worker_cpu_ms_per_sample"]["median"] + base["main_cpu_ms_per_sample"]["median"]
                     + (base["server_cpu_ms_per_sample"] or 0.0))
        rows_bytes = {name: (r["stored_bytes_per_sample"], r["decoded_bytes_per_sample"]) for name, r in mine.items()}
        got = ceilings(images_ms, rows_bytes, ns_per_byte, src)
        for name, r in mine.items():
            r["ceiling"] = got[name]
    return {"rounds": rounds, "epochs": epochs, "slice_epochs": slice_epochs, "batch_size": batch_size,
            "workers": workers, "samples_per_epoch": datasets[names[0]].num_samples(workers), "rows": rows,
            "ratios": ratios, "cpu_ratios": cpu_ratios, "passes_ns_per_byte": ns_per_byte}
