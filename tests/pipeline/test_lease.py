"""One writer per cache: a live lease refuses a second job by name; a dead job's lease is taken over
only with --resume; the heartbeat keeps a long job's lease alive; a finished or failed job frees it."""

import json
import time

import pytest

from pipeline.job import run_cache_job
from pipeline.lease import CacheLeasedError, Lease
from pipeline.store import CacheStore
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from tests.conftest import cache_config


def test_live_lease_refuses_a_second_writer_and_names_the_holder(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"))
    with Lease(store, ttl_s=30, settle_s=0) as first:
        held = json.loads((tmp_path / "c.zarr" / layout.LEASE).read_text())
        assert held["job_id"] == first.holder["job_id"] and held["pid"] == first.holder["pid"]
        for resume in (False, True):  # a live lease is never taken over, --resume or not
            with pytest.raises(CacheLeasedError, match=rf"being written by job {held['job_id']} on .* since"):
                Lease(store, ttl_s=30, resume=resume, settle_s=0).acquire()
    assert not (tmp_path / "c.zarr" / layout.LEASE).exists()  # released on exit


def test_heartbeat_renews_and_an_expired_lease_needs_resume(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"))
    dead = Lease(store, ttl_s=0.6, settle_s=0)
    dead.acquire()
    t0 = json.loads(store.read_bytes(layout.LEASE))["heartbeat_unix"]
    time.sleep(0.5)
    assert json.loads(store.read_bytes(layout.LEASE))["heartbeat_unix"] > t0  # renewed every ttl / 3
    dead._stop.set()  # the job "dies": no more heartbeats, the lease stays behind
    dead._thread.join()
    time.sleep(0.7)
    with pytest.raises(CacheLeasedError, match="abandoned lease .* --resume"):
        Lease(store, ttl_s=0.6, settle_s=0).acquire()
    taker = Lease(store, ttl_s=30, resume=True, settle_s=0)
    taker.acquire()
    assert json.loads(store.read_bytes(layout.LEASE))["job_id"] == taker.holder["job_id"]
    dead.release()  # the old holder coming back never removes the new holder's lease
    assert json.loads(store.read_bytes(layout.LEASE))["job_id"] == taker.holder["job_id"]
    taker.release()


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
