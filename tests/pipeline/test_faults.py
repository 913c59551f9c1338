"""Object-store faults between kdcache and S3 (issue 16): a seeded proxy in front of moto answers some requests
with 503 Slow Down, resets some connections, and loses some responses after the request reached the store. The
caching job must end byte-identical to a fault-free run, and a reader must lose no sample.

The proxy is written here (a plain ``http.server`` forwarding to moto) because no library injects faults into
S3's HTTP exchange at this level; it only listens on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest

from pipeline.store import CacheStore
from storage_schemas.errors import CacheError

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
          b"<Message>The bucket is over its quota.</Message></Error>")


class FaultProxy:
    """Forwards HTTP/1.1 to ``upstream``; each request independently (seeded) gets a fault with probability
    ``rate``: ``503`` (S3's Slow Down), ``reset`` (connection closed before the request is forwarded) or
    ``lost`` (forwarded and carried out, then the connection closed without the response)."""

    def __init__(self, upstream: str, *, seed: int, rate: float) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rng, self.rate, self.lock = random.Random(seed), rate, threading.Lock()
        self.faults: Counter = Counter()
        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.enabled = True
        self.refuse_writes_after: int | None = None  # a bucket over its quota: writes refused after this many
        self.writes = 0

    def draw(self, method: str) -> str | None:
        with self.lock:
            self.requests += 1
            if method in ("PUT", "POST"):
                self.writes += 1
                if self.refuse_writes_after is not None and self.writes > self.refuse_writes_after:
                    return "denied"
            if not self.enabled or self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(["503", "reset", "lost"])
            self.faults[fault] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _proxy(self) -> None:
                body = self._body()
                fault = proxy.draw(self.command)
                if fault == "reset":
                    return self._drop()
                if fault in ("503", "denied"):
                    status, text = (503, SLOW_DOWN) if fault == "503" else (403, DENIED)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "lost":  # the store did it; the client never hears
                    return self._drop()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_s3(moto_s3):
    proxy = FaultProxy(moto_s3["endpoint"], seed=16, rate=0.08)
    opts = {**moto_s3["storage_options"],
            "client_kwargs": {**moto_s3["storage_options"]["client_kwargs"], "endpoint_url": proxy.endpoint}}
    yield proxy, opts
    proxy.close()


def _objects(store: CacheStore) -> dict[str, bytes]:
    return {rel: store.read_bytes(rel) for rel in store.objects()}


def test_the_job_survives_object_store_faults_byte_for_byte(small_cache, moto_s3, faulty_s3, monkeypatch):
    """The caching job (in process: the store code is the Ray job's) writes ``small_cache``'s config to S3 through
    503s, resets and lost responses and ends with the same objects as the fault-free local build; a student's
    epoch read through the faults (the tap's shards by ``pipeline.s3_ranges``' GETs, the rest by obstore) loses
    no sample."""
    from pipeline.job import build_cache_in_process
    from pipeline.s3_ranges import RangeReader
    from student.data import CacheDataset

    ranged = []
    real_open = RangeReader.open
    monkeypatch.setattr(RangeReader, "open", lambda *a, **k: ranged.append(a[1]) or real_open(*a, **k))

    proxy, opts = faulty_s3
    url = f"s3://{moto_s3['bucket']}/faults/cache.zarr"
    cfg = small_cache["cfg"].model_copy(deep=True)
    cfg.output.url, cfg.output.storage_options = url, opts
    built = build_cache_in_process(cfg, log=lambda s: None)
    print(f"{proxy.requests} requests through the proxy, faults injected: {dict(proxy.faults)}")
    assert sum(proxy.faults.values()) >= 10 and set(proxy.faults) == {"503", "reset", "lost"}, proxy.faults
    clean = CacheStore(str(small_cache["path"]), read_only=True)
    faulty = CacheStore(url, opts, read_only=True)
    a, b = _objects(clean), _objects(faulty)
    assert a.keys() == b.keys()
    volatile = {"manifest.json", "manifest.json.sha256", "checksums.json"}  # URLs, timestamps, per-unit seconds
    assert [k for k in a if k not in volatile and not k.startswith("units/") and a[k] != b[k]] == []
    assert built.identity == small_cache["manifest"].identity and built.status == "complete"
    m = faulty.read_manifest()
    # a student's epoch through the faults: every sample, with the rows the fault-free cache holds
    t = m.teacher
    before = sum(proxy.faults.values())
    ds = CacheDataset(url, storage_options=opts, size=t.input_size, mean=t.mean, std=t.std, taps=["final"])
    ds.set_epoch(0)
    seen = {(s.tar, s.position, s.view): s for s in ds}
    assert len(seen) == m.dataset.num_samples == small_cache["digits"]["counts"]["train"]
    ref = {(shard, v): clean.read_unit(small_cache["manifest"], shard, v)
           for shard in range(len(m.dataset.shards)) for v in range(m.num_views)}
    for (tar, pos, view), s in seen.items():
        np.testing.assert_array_equal(s.rows["feat_final"], ref[tar, view]["feat_final"][pos])
    assert sum(proxy.faults.values()) > before  # the reads met faults too
    assert ranged  # the tap's rows came by the ranged GETs


def test_a_bucket_that_refuses_writes_stops_the_job_clearly(small_cache, moto_s3, faulty_s3):
    """The bucket starts refusing writes (403, as over a quota) mid-job: the job stops with an error the CLI
    shows as one line naming the cache and the unit, and no unit is recorded that is not whole."""
    from jobs.failures import user_error
    from pipeline.job import build_cache_in_process

    proxy, opts = faulty_s3
    proxy.enabled = False  # only the refusal here
    url = f"s3://{moto_s3['bucket']}/refused/cache.zarr"
    cfg = small_cache["cfg"].model_copy(deep=True)
    cfg.output.url, cfg.output.storage_options = url, opts
    proxy.refuse_writes_after = 100  # a build writes ~155 objects: the start and some units get through
    with pytest.raises(CacheError) as e:
        build_cache_in_process(cfg, log=lambda s: None)
    line = user_error(e.value)
    assert line is not None and "refused/cache.zarr" in line and "over its quota" in line, line
    store = CacheStore(url, opts, read_only=True)
    m = store.read_manifest(allow_partial=True)
    assert m.status == "building" and len(store.completed_units()) < m.units_total
    # every unit recorded as complete is whole: its rows are the fault-free build's (the rerun that finishes
    # is test_bad_input_job.py::test_a_full_disk_is_one_line_and_the_rerun_finishes, through the Ray job)
    proxy.refuse_writes_after = None
    clean = CacheStore(str(small_cache["path"]), read_only=True)
    done = store.completed_units()
    assert done, "the refusal came before any unit completed: raise refuse_writes_after"
    for tar, view in sorted(done):
        got, want = store.read_unit(m, tar, view), clean.read_unit(small_cache["manifest"], tar, view)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"unit {tar}/{view} {k}")
