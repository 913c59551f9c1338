"""One writer per cache: a live lease refuses a second job by name; a dead job's lease is taken over
only with --resume; the heartbeat keeps a long job's lease alive; a finished or failed job frees it.

The lease's own tests run on a fake clock (``pipeline.lease``'s ``_now``, ``_sleep`` and ``_wait``):
time moves only when a test says, so expiry after a 30 s ttl takes no real 30 s."""

import json
import threading
import time

import pytest

from pipeline import lease as lease_mod
from pipeline.job import run_cache_job
from pipeline.lease import CacheLeasedError, Lease
from pipeline.store import CacheStore
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from tests.conftest import cache_config

TTL = 30.0


class FakeClock:
    """The lease's time: ``now`` reads it, the settle ``sleep`` advances it, and a heartbeat thread's
    ``wait`` returns once the test has advanced it far enough (or the lease is released)."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.t = start
        self.cond = threading.Condition()
        self.parked = 0  # heartbeat threads inside wait()
        self.closed = False

    def now(self) -> float:
        with self.cond:
            return self.t

    def advance(self, seconds: float) -> None:
        with self.cond:
            self.t += seconds
            self.cond.notify_all()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        with self.cond:
            end = self.t + seconds
            self.parked += 1
            try:
                while self.t < end and not stop.is_set() and not self.closed:
                    self.cond.wait(0.005)  # real time only to notice ``stop``, which does not notify us
            finally:
                self.parked -= 1
        return stop.is_set() or self.closed


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(lease_mod, "_now", c.now)
    monkeypatch.setattr(lease_mod, "_sleep", c.advance)
    monkeypatch.setattr(lease_mod, "_wait", c.wait)
    yield c
    c.closed = True  # a heartbeat thread left behind by a failed test ends instead of waiting forever


def heartbeat(store: CacheStore) -> float | None:
    cur = Lease(store).read()
    return cur and cur["heartbeat_unix"]


def advance_one_beat(clock: FakeClock, store: CacheStore) -> float:
    """Advance by the heartbeat interval (ttl / 3); return once the thread has renewed the lease at the
    new time and is waiting again (a bounded real-time poll: the thread runs in milliseconds)."""
    clock.advance(TTL / 3)
    want, deadline = clock.now(), time.monotonic() + 10
    while not (heartbeat(store) == want and clock.parked == 1):
        assert time.monotonic() < deadline, f"no heartbeat at t={want} (lease says {heartbeat(store)})"
        time.sleep(0.001)
    return want


def test_live_lease_refuses_a_second_writer_and_names_the_holder(tmp_path, clock):
    store = CacheStore(str(tmp_path / "c.zarr"))
    with Lease(store, ttl_s=TTL) as first:
        held = json.loads((tmp_path / "c.zarr" / layout.LEASE).read_text())
        assert held["job_id"] == first.holder["job_id"] and held["pid"] == first.holder["pid"]
        for resume in (False, True):  # a live lease is never taken over, --resume or not
            with pytest.raises(CacheLeasedError, match=rf"being written by job {held['job_id']} on .* since"):
                Lease(store, ttl_s=TTL, resume=resume).acquire()
    assert not (tmp_path / "c.zarr" / layout.LEASE).exists()  # released on exit


def test_heartbeat_keeps_a_long_job_live(tmp_path, clock):
    store = CacheStore(str(tmp_path / "c.zarr"))
    with Lease(store, ttl_s=TTL, settle_s=0.5):
        started = heartbeat(store)
        beats = [advance_one_beat(clock, store) for _ in range(7)]  # over two ttls: renewed every ttl / 3
        assert beats == pytest.approx([started + 0.5 + k * TTL / 3 for k in range(1, 8)])
        with pytest.raises(CacheLeasedError, match=r"being written by .* last heartbeat 0 s ago"):
            Lease(store, ttl_s=TTL, resume=True).acquire()


def test_an_expired_lease_needs_resume_to_be_taken_over(tmp_path, clock):
    store = CacheStore(str(tmp_path / "c.zarr"))
    dead = Lease(store, ttl_s=TTL, settle_s=0)
    dead.acquire()
    dead._stop.set()  # the job "dies": no more heartbeats, the lease stays behind
    dead._thread.join()
    clock.advance(TTL - 1)
    with pytest.raises(CacheLeasedError, match=r"being written by .* expires 1 s from now; then rerun"):
        Lease(store, ttl_s=TTL, resume=True).acquire()  # not expired yet: still live
    clock.advance(2)
    with pytest.raises(CacheLeasedError, match=r"abandoned lease .*no heartbeat for 31 s.*--resume"):
        Lease(store, ttl_s=TTL).acquire()
    taker = Lease(store, ttl_s=TTL, resume=True)
    taker.acquire()
    assert json.loads(store.read_bytes(layout.LEASE))["job_id"] == taker.holder["job_id"]
    advance_one_beat(clock, store)  # the new holder's heartbeat runs
    dead.release()  # the old holder coming back never removes the new holder's lease
    assert json.loads(store.read_bytes(layout.LEASE))["job_id"] == taker.holder["job_id"]
    taker.release()
    assert not (tmp_path / "c.zarr" / layout.LEASE).exists()


def test_a_job_that_loses_the_race_while_settling_backs_off(tmp_path, clock, monkeypatch):
    store = CacheStore(str(tmp_path / "c.zarr"))
    rival = Lease(store, ttl_s=TTL)

    def settle(seconds):  # another job writes its lease during our settle wait: the later writer wins
        clock.advance(seconds)
        rival._write()

    monkeypatch.setattr(lease_mod, "_sleep", settle)
    me = Lease(store, ttl_s=TTL)
    with pytest.raises(CacheLeasedError, match=f"took the lease at the same moment .{rival.holder['job_id']}"):
        me.acquire()
    assert me._thread is None  # no heartbeat: it never held the lease
    assert json.loads(store.read_bytes(layout.LEASE))["job_id"] == rival.holder["job_id"]


def test_job_refused_while_another_holds_the_cache_and_frees_it_when_done(digits, tiny_teacher, ray_local, tmp_path):
    out = tmp_path / "c.zarr"
    cfg = CacheConfig.model_validate(cache_config(digits, tiny_teacher, str(out), input__urls=digits["train"]
                                                  .replace("{000000..000003}", "000000")))
    other = Lease(CacheStore(str(out)), ttl_s=30, settle_s=0)
    other.acquire()
    with pytest.raises(CacheLeasedError, match="being written by"):
        run_cache_job(cfg, progress=False, log=lambda s: None)
    assert not (out / "manifest.json").exists()  # refused before writing anything
    other.release()
    m = run_cache_job(cfg, progress=False, log=lambda s: None)
    assert m.status == "complete" and not (out / layout.LEASE).exists()
    # a job that fails after taking the lease (its teacher checkpoint is missing) frees it too
    bad = CacheConfig.model_validate(cache_config(digits, tiny_teacher, str(tmp_path / "bad.zarr"),
                                                  teacher__checkpoint=str(tmp_path / "missing.safetensors")))
    with pytest.raises(Exception, match="missing.safetensors"):
        run_cache_job(bad, progress=False, log=lambda s: None)
    assert (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad.zarr" / layout.LEASE).exists()
