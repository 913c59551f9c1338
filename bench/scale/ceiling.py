"""How high a reader goal's ratio can go on this machine: the passes over a sample's target rows that the reader
cannot avoid, measured here, against what a sample costs with images alone.

A reader whose DataLoader workers and main process keep every core busy (2 workers and the main process on this
machine's 2 cores) is CPU-bound: it reads cores ÷ (CPU seconds a sample) samples a second, so targets that add
``extra`` ms of CPU to the ``a`` ms a sample costs with images alone read at most ``a / (a + extra)`` of images
alone's rate (:func:`ceiling`). The reader's design fixes the least ``extra`` can be, per byte of a sample's rows
(:func:`least_ms`):

* from local disk: the rows read once from the page cache into the sample's buffer (``readinto``, the kernel's
  copy) and checksummed (crc32c, which Zarr stores with every chunk); then stacked into the worker's ring slot and
  copied out of it by the main process (:mod:`student.ring`): a copy each. With a shuffle buffer a sample's batch is
  not known when its rows are read, so they cannot land in the slot; and the copy out is the one to the training
  device on a GPU node.
* from S3: the same with the read a socket's receive (``recv_into``) instead, plus what the server spends sending
  the bytes, for the S3 server of this benchmark shares the reader's cores (real S3 would not). The least any server
  could spend is measured: ``os.sendfile`` from the page cache over loopback TCP, no copy in user space (moto reads
  the range and writes it through werkzeug).

Each pass is timed alone on one core (:func:`passes`, CPU time of the thread doing it, median of rounds); HTTP,
Zarr's index, the shuffle buffer and Python's bookkeeping are left out, and in the reader two cores stream memory at
once, so each pass costs at least as much there: the ceiling is above what any implementation of this design
reaches here. Used by :mod:`bench.scale.goals` and the report's reader (:func:`bench.scale.reader.reader`).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import google_crc32c
import numpy as np

from pipeline.raw_shards import PIECE

PASSES = ("read_crc", "copy", "recv_crc", "sendfile")  # each in CPU ns a byte


def passes(nbytes: int = 32 << 20, rounds: int = 5) -> dict[str, float]:
    """CPU nanoseconds a byte of each pass (:data:`PASSES`) over ``nbytes`` (larger than the CPU's caches, as a
    64-row block of a tap is), the median of ``rounds``: a page-cached file read into a reused buffer
    :data:`~pipeline.raw_shards.PIECE` bytes at a time, each piece checksummed as it lands (as
    :meth:`pipeline.raw_shards.RawShard.rows_into` reads); a copy between two reused buffers; the same bytes sent
    over loopback TCP with ``os.sendfile`` (the sender's CPU) and received with ``recv_into`` a piece at a time,
    each checksummed (the receiver's). Each received block's crc32c is checked against the file's, so a transfer
    that moved nothing cannot pass for a fast one."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    want = google_crc32c.value(data)
    buf, dst = np.empty(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    times: dict[str, list[float]] = {k: [] for k in PASSES}
    with tempfile.TemporaryDirectory(prefix="kdcache-ceiling-") as tmp:
        path = os.path.join(tmp, "block.bin")
        data.tofile(path)
        del data
        with open(path, "rb", buffering=0) as f:
            _read_crc(f, buf)  # into the page cache, and the buffers' pages touched
            np.copyto(dst, buf)
            for _ in range(rounds):
                times["read_crc"].append(_cpu(lambda: _check(_read_crc(f, buf), want, "read")))
                times["copy"].append(_cpu(lambda: np.copyto(dst, buf)))
                sent, got = _loopback(f, buf, want)
                times["sendfile"].append(sent)
                times["recv_crc"].append(got)
    return {k: 1e9 * statistics.median(v) / nbytes for k, v in times.items()}


def least_ms(stored_bytes: float, row_bytes: float, ns_per_byte: dict[str, float], source: str) -> float:
    """The least CPU ms a sample's target rows add to the reader from ``source`` (``"local"`` or ``"s3"``), from
    :func:`passes`' per-byte costs: its ``stored_bytes`` read, its ``row_bytes`` (as decoded) copied twice (see the
    module docstring; a compressed array's decompression is left out)."""
    if source not in ("local", "s3"):
        raise ValueError(f"source {source!r}: 'local' or 's3'")
    read = ns_per_byte["read_crc"] if source == "local" else ns_per_byte["recv_crc"] + ns_per_byte["sendfile"]
    return (stored_bytes * read + row_bytes * 2 * ns_per_byte["copy"]) / 1e6


def ceiling(images_ms: float, extra_ms: float) -> float:
    """The most a CPU-bound reader's samples/s with targets can be of its rate with images alone, when a sample
    costs ``images_ms`` of CPU with images alone and the targets add at least ``extra_ms``."""
    return images_ms / (images_ms + extra_ms)


def ceilings(images_ms: float, rows: dict[str, tuple[float, float]], ns_per_byte: dict[str, float], source: str
             ) -> dict:
    """For each reader configuration (``name: (stored, decoded) bytes of its target rows a sample``), its
    :func:`ceiling` from ``source`` when a sample costs ``images_ms`` of CPU with images alone, with what went into
    it."""
    out = {}
    for name, (stored, decoded) in rows.items():
        extra = least_ms(stored, decoded, ns_per_byte, source)
        out[name] = {"images_cpu_ms": images_ms, "stored_bytes": stored, "row_bytes": decoded,
                     "least_extra_ms": extra, "ceiling": ceiling(images_ms, extra)}
    return out


def _cpu(fn: Callable[[], object]) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def _check(crc: int, want: int, what: str) -> None:
    if crc != want:
        raise RuntimeError(f"ceiling: the {what} block's crc32c {crc:#x} is not the file's {want:#x}")


def _read_crc(f, buf: np.ndarray) -> int:
    f.seek(0)
    return _land(f.readinto, buf, "the block file")


def _land(read_into: Callable[[memoryview], int], buf: np.ndarray, what: str) -> int:
    """``buf`` filled by ``read_into`` (a file's ``readinto``, a socket's ``recv_into``) a
    :data:`~pipeline.raw_shards.PIECE` at a time, each piece checksummed as it lands; returns the crc32c."""
    view, crc, got = memoryview(buf), 0, 0
    while got < len(buf):
        k = read_into(view[got:got + PIECE])
        if not k:
            raise RuntimeError(f"ceiling: {what} ended early")
        crc = google_crc32c.extend(crc, buf[got:got + k])
        got += k
    return crc


def _loopback(f, buf: np.ndarray, want: int) -> tuple[float, float]:
    """The file's bytes sent over a loopback TCP connection by ``os.sendfile`` on a thread and received here:
    (sender's CPU seconds, receiver's CPU seconds, each its own thread's)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sent: list[float] = []

        def send() -> None:
            conn, _ = server.accept()
            with conn:
                t, at = time.thread_time(), 0
                while at < len(buf):
                    at += os.sendfile(conn.fileno(), f.fileno(), at, len(buf) - at)
                sent.append(time.thread_time() - t)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        with socket.create_connection(server.getsockname(), timeout=60) as conn:
            t = time.thread_time()
            crc = _land(conn.recv_into, buf, "the loopback connection")
            received = time.thread_time() - t
        sender.join(timeout=60)
    if not sent:
        raise RuntimeError("ceiling: the loopback sender did not finish")
    _check(crc, want, "received")
    return sent[0], received
