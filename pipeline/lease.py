"""One writer per cache: a lease object in the store, kept alive by a heartbeat.

A caching job takes ``lease.json`` before it writes anything and renews it every
``ttl / 3`` seconds from a daemon thread; it removes the lease when it finishes (or fails
cleanly). A second job on the same URL finds a live lease and is refused, naming the holder
(host, pid, job id) and since when. A lease whose heartbeat is older than its ttl belongs
to a job that died without cleaning up (``kill -9``, lost node): ``--resume`` takes it over
and finishes the cache.

Object stores have no portable compare-and-swap through fsspec, so taking the lease is
write-then-read-back: after writing, the job waits a moment and reads the lease again; if
another job's id is there, the later writer won and this one backs off. Two jobs started
within that window on the same URL can still both proceed; the Zarr rule that one unit is
written whole by one writer, and identical bytes for a recomputed unit, keep even that
case from corrupting data (the units are deterministic).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid

from storage_schemas import layout
from storage_schemas.errors import CacheError

from .store import CacheStore


class CacheLeasedError(CacheError):
    """Another job holds the cache's lease."""


def _now() -> float:
    return time.time()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _wait(stop: threading.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set (then True). Like ``_now`` and ``_sleep``, a seam for
    tests that drive the lease on a fake clock."""
    return stop.wait(seconds)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


class Lease:
    """``with Lease(store, ttl_s, resume=…):`` holds the cache for the duration of a job."""

    def __init__(self, store: CacheStore, ttl_s: float = 120.0, *, resume: bool = False, settle_s: float = 0.2):
        self.store, self.ttl_s, self.resume, self.settle_s = store, float(ttl_s), resume, settle_s
        self.holder = {"job_id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = _now()

    def read(self) -> dict | None:
        if not self.store.exists(layout.LEASE):
            return None
        try:
            return json.loads(self.store.read_bytes(layout.LEASE))
        except (ValueError, OSError):
            return None  # torn or unreadable lease: treated as absent (it can only come from a dead writer)

    def _write(self) -> None:
        now = _now()
        self.store.write_bytes(layout.LEASE, json.dumps({
            **self.holder, "started": _iso(self.started), "heartbeat": _iso(now), "heartbeat_unix": now,
            "ttl_s": self.ttl_s}).encode())

    def acquire(self) -> None:
        cur = self.read()
        if cur is not None and cur.get("job_id") != self.holder["job_id"]:
            age = _now() - float(cur.get("heartbeat_unix", 0))
            who = f"job {cur.get('job_id')} on {cur.get('host')} (pid {cur.get('pid')}), since {cur.get('started')}"
            if age < float(cur.get("ttl_s", self.ttl_s)):
                raise CacheLeasedError(
                    f"{self.store.url} is being written by {who}; last heartbeat {age:.0f} s ago. Wait for that job "
                    "to finish (its cache will then be complete), or stop it first. If it is dead, its lease "
                    f"expires {max(0.0, float(cur.get('ttl_s', self.ttl_s)) - age):.0f} s from now; then rerun "
                    "with --resume.")
            if not self.resume:
                raise CacheLeasedError(
                    f"{self.store.url} holds an abandoned lease of {who} (no heartbeat for {age:.0f} s): that job "
                    "died while writing. Rerun with --resume to take it over and finish the cache.")
        self._write()
        _sleep(self.settle_s)
        back = self.read()
        if back is None or back.get("job_id") != self.holder["job_id"]:
            raise CacheLeasedError(f"{self.store.url}: another job took the lease at the same moment "
                                   f"({back and back.get('job_id')}); let it run, then rerun this one")
        self._thread = threading.Thread(target=self._beat, name="kdcache-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not _wait(self._stop, self.ttl_s / 3):
            cur = self.read()
            if cur is not None and cur.get("job_id") != self.holder["job_id"]:
                return  # taken over (we were presumed dead): never overwrite the new holder
            self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = self.read()
        if cur is not None and cur.get("job_id") == self.holder["job_id"]:
            self.store.fs.rm(self.store.path(layout.LEASE))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
