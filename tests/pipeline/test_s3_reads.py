"""pipeline.s3_reads: a read-only S3 cache's arrays come through obstore, row for row what Zarr over s3fs reads
(and without s3fs's reads); s3fs options translate only where obstore would send the same request; a process
forked after obstore ran reads through s3fs instead of hanging; a refused read is one clear error."""

from __future__ import annotations

import http.server
import multiprocessing as mp
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline import s3_reads
from pipeline.store import CacheStore
from storage_schemas.errors import CacheError
from tests.pipeline.test_raw_shards import RANGES, TARS, VIEWS, S, make_array, manifest

pytestmark = pytest.mark.s3

MOTO = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:5000", "region_name": "eu-west-1"}}


@pytest.mark.parametrize("opts, env, want", [
    (MOTO, {}, {"region": "eu-west-1", "endpoint": "http://127.0.0.1:5000", "access_key_id": "k",
                "secret_access_key": "s"}),
    ({"key": "k", "secret": "s", "token": "t", "endpoint_url": "https://minio:9000", "use_listings_cache": False},
     {}, {"region": "us-east-1", "endpoint": "https://minio:9000", "access_key_id": "k", "secret_access_key": "s",
          "session_token": "t"}),
    ({"anon": True}, {"AWS_REGION": "us-west-2"}, {"region": "us-west-2", "skip_signature": True}),
    ({}, {"AWS_ACCESS_KEY_ID": "ek", "AWS_SECRET_ACCESS_KEY": "es", "AWS_DEFAULT_REGION": "ap-south-1"},
     {"region": "ap-south-1", "access_key_id": "ek", "secret_access_key": "es"}),
    # where botocore's answer is not obstore's: left to s3fs
    ({}, {"AWS_ACCESS_KEY_ID": "ek", "AWS_SECRET_ACCESS_KEY": "es", "AWS_PROFILE": "team"}, None),
    ({}, {"AWS_REGION": "us-west-2"}, None),  # credentials from files or instance metadata
    ({"key": "k", "secret": "s"}, {}, None),  # no region, no endpoint: the bucket's region is s3fs's to find
    ({**MOTO, "profile": "team"}, {}, None),
    ({**MOTO, "config_kwargs": {"s3": {"addressing_style": "virtual"}}}, {}, None),
    ({**MOTO, "requester_pays": True}, {}, None),
    ({"key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1", "verify": False}}, {}, None),
])
def test_s3fs_options_translate_only_where_the_request_is_the_same(no_aws_env, opts, env, want):
    for k, v in env.items():
        no_aws_env.setenv(k, v)
    assert s3_reads._config(dict(opts)) == want
    got = s3_reads.s3_config("s3://bkt/team/c.zarr", opts)
    assert (got is None) == (want is None)
    if got is not None:
        store = s3_reads.store_for(*got)
        assert store.prefix == "team/c.zarr" and store.config["bucket"] == "bkt"
    no_aws_env.setenv(s3_reads.ENV, "fsspec")
    assert s3_reads.s3_config("s3://bkt/c.zarr", opts) is None
    assert s3_reads.s3_config("/local/c.zarr", opts) is None


def _no_s3fs_reads(store: CacheStore, monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("an array was read through s3fs")
    for name in ("cat_file", "_cat_file", "cat", "_cat", "open", "_open"):
        monkeypatch.setattr(store.fs, name, refuse)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
def test_a_read_only_s3_cache_reads_through_obstore_as_zarr_over_s3fs_reads_it(moto_s3, no_aws_env, compress):
    """Raw shards (pipeline.raw_shards' path) and zstd ones (Zarr's ObjectStore), every row range, a unit whose
    shard was never stored and one with an inner chunk all fill: the same rows as Zarr reading through s3fs."""
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/obs-{uuid.uuid4().hex[:8]}.zarr"
    arr = make_array(url, "float16", opts, compress=compress)  # written and read back through s3fs
    store = CacheStore(url, opts, read_only=True)
    assert store._obstore() is not None
    _no_s3fs_reads(store, no_aws_env)
    for t in range(TARS):
        for v in range(VIEWS):
            for lo, hi in RANGES:
                got = store.read_unit(manifest(S), t, v, ["a"], lo, hi)["a"]
                want = arr[t * S + lo:t * S + hi, v]
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want, err_msg=f"unit {t},{v} rows {lo}..{hi}")
                assert got.flags.writeable
                if not compress:  # straight into each sample's buffer (student.stream.BlockRows): the same rows
                    dests = [np.full(want[0].nbytes, 0xAB, np.uint8) for _ in range(lo, hi)]
                    store.raw_shard(t, v, "a").rows_into(lo, hi, dests)
                    for p, d in enumerate(dests):
                        np.testing.assert_array_equal(d.view(want.dtype).reshape(want.shape[1:]), want[p],
                                                      err_msg=f"unit {t},{v} row {lo + p}, into a buffer")


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
def test_a_damaged_shard_on_s3_is_one_error_naming_it(moto_s3, no_aws_env, compress):
    """One byte flipped in a stored shard: read through obstore (raw GETs or Zarr's ObjectStore), the crc32c
    check fails as one CacheError naming the shard's URL and ``kdcache verify``."""
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/dmg-{uuid.uuid4().hex[:8]}.zarr"
    make_array(url, "float16", opts, compress=compress)
    store = CacheStore(url, opts, read_only=True)
    key = store.path("a/c/0/0/0/0")
    data = bytearray(store.fs.cat_file(key))
    data[10] ^= 0xFF
    store.fs.pipe_file(key, bytes(data))
    with pytest.raises(CacheError) as e:
        store.read_unit(manifest(S), 0, 0, ["a"])
    assert store._obstore() is not None
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}: ") and "kdcache verify" in msg, msg


def _read_in_child(url: str, opts: dict, q) -> None:
    store = CacheStore(url, opts, read_only=True)  # as a DataLoader worker opens its own (CacheDataset.store)
    q.put((store._obstore() is not None, store.read_unit(manifest(S), 0, 0, ["a"])["a"]))


def test_a_process_forked_after_obstore_ran_reads_through_s3fs(moto_s3, no_aws_env):
    """obstore's runtime does not survive a fork (a child's first request would hang): after obstore ran in
    the parent, a forked child's store reads through s3fs, the same rows, in bounded time."""
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/fork-{uuid.uuid4().hex[:8]}.zarr"
    arr = make_array(url, "float16", opts)
    store = CacheStore(url, opts, read_only=True)
    want = store.read_unit(manifest(S), 0, 0, ["a"])["a"]  # obstore runs in this process now
    assert store._obstore() is not None and s3_reads._runtime_pid is not None
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(url, opts, q))
    p.start()
    try:
        used_obstore, got = q.get(timeout=60)
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    assert not used_obstore
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, arr[0:S, 0])


CHILD = """
import multiprocessing as mp, os, sys, numpy as np
from pipeline.store import CacheStore
from tests.pipeline.test_raw_shards import S, manifest
def read(url, opts, q):
    store = CacheStore(url, opts, read_only=True)
    rows = store.read_unit(manifest(S), 0, 0, ['a'])['a'].tolist()
    q.put((store._obstore() is not None and os.environ.get('TOKIO_WORKER_THREADS') == '2', rows))
if __name__ == '__main__':
    url, opts = sys.argv[1], {'key': sys.argv[2], 'secret': sys.argv[3],
                              'client_kwargs': {'endpoint_url': sys.argv[4], 'region_name': 'us-east-1'}}
    assert CacheStore(url, opts, read_only=True).exists('a/zarr.json')  # the parent reads no array
    ctx = mp.get_context('fork')
    q = ctx.Queue()
    ps = [ctx.Process(target=read, args=(url, opts, q)) for _ in range(2)]
    [p.start() for p in ps]
    got = [q.get(timeout=60) for _ in ps]
    [p.join() for p in ps]
    print(all(u for u, _ in got), np.array_equal(got[0][1], got[1][1]), np.asarray(got[0][1]).sum())
"""


def test_forked_workers_of_a_parent_that_never_read_use_obstore(moto_s3, no_aws_env):
    """As a DataLoader's workers are forked from a training process that has not read arrays itself: each
    worker reads through obstore (its runtime on 2 threads, not one per core), the rows Zarr over s3fs reads."""
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/workers-{uuid.uuid4().hex[:8]}.zarr"
    arr = make_array(url, "float16", opts)
    out = subprocess.run([sys.executable, "-c", CHILD, url, opts["key"], opts["secret"], moto_s3["endpoint"]],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    used, same, total = out.stdout.split()
    assert used == "True" and same == "True"
    assert float(total) == pytest.approx(float(arr[0:S, 0].astype(np.float64).sum()))


class Refusing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request as S3 does a wrong key (moto accepts any key)."""

    def do_GET(self):
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_refused_read_is_one_line_naming_the_object(no_aws_env):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        opts = {"key": "k", "secret": "wrong", "client_kwargs": {
            "endpoint_url": f"http://127.0.0.1:{server.server_address[1]}", "region_name": "us-east-1"}}
        url = "s3://kdcache/refused.zarr"
        with pytest.raises(CacheError) as e:
            s3_reads.get(s3_reads.store_for(*s3_reads.s3_config(url, opts)), "a/c/0/0/0/0", 0, None, name=f"{url}/a/c/0/0/0/0")
    finally:
        server.shutdown()
        server.server_close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{url}/a/c/0/0/0/0: S3 refused the read ("), msg
