"""pipeline.s3_ranges: ranged GETs of raw shards read from the socket into the caller's buffers. Checked against
AWS's published SigV4 example, against s3fs's reads of the same ranges from moto, and against a scripted server
for what S3 does when it fails (5xx, a body cut short, a refusal, a missing object)."""

from __future__ import annotations

import datetime
import http.server
import multiprocessing as mp
import threading
import uuid

import numpy as np
import pytest

from pipeline import s3_ranges
from pipeline.raw_shards import PIECE
from pipeline.s3_ranges import RangeReader
from pipeline.store import CacheStore
from storage_schemas.errors import CacheError
from tests.pipeline.test_raw_shards import S, make_array, manifest

pytestmark = pytest.mark.s3


def read(reader: RangeReader, key: str, start: int, end: int | None, piece: int = PIECE) -> bytes:
    """What a raw shard's read does with ``open``: the bytes land ``piece`` at a time in one buffer."""
    with reader.open(key, start, end, name=key) as (n, fill):
        out = bytearray(n)
        view, at = memoryview(out), 0
        while at < n:
            at += fill(view[at:at + piece], at)
    return bytes(out)


def test_the_signature_is_aws_published_example(monkeypatch):
    """AWS's SigV4 example "GET Object" (the S3 API reference, "Signature Calculations for the Authorization
    Header: Transferring Payload in a Single Chunk"): bytes 0-9 of examplebucket's test.txt on 2013-05-24."""
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC))
    reader = RangeReader("examplebucket", "", {"region": "us-east-1", "access_key_id": "AKIAIOSFODNN7EXAMPLE",
                                               "secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    headers = reader._signed("https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"})
    assert headers["Authorization"].replace(", ", ",") == (  # botocore writes a space after each comma
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    assert headers["X-Amz-Date"] == "20130524T000000Z"


def test_ranges_read_what_s3fs_reads(moto_s3):
    """Every kind of range a raw shard reads (a part, an open end, the last bytes, all of it), in pieces of
    1 byte, 7 bytes and 256 KiB, from two threads at once (a connection each): s3fs's bytes of the same range."""
    opts = moto_s3["storage_options"]
    prefix = f"rng-{uuid.uuid4().hex[:8]}.zarr"
    data = np.random.default_rng(0).integers(0, 256, 3 * PIECE + 11, np.uint8).tobytes()
    store = CacheStore(f"s3://{moto_s3['bucket']}/{prefix}", opts)
    store.fs.pipe_file(store.path("a/c/0 1"), data)  # a space: the key is quoted in the URL
    reader = RangeReader(moto_s3["bucket"], prefix, {
        "region": "us-east-1", "endpoint": moto_s3["endpoint"], "access_key_id": opts["key"],
        "secret_access_key": opts["secret"]})
    cases = [(0, 10), (5, PIECE + 3), (PIECE, None), (-20, None), (-(len(data) + 5), None), (0, None),
             (len(data) - 1, len(data))]
    errors: list[BaseException] = []

    def check(piece: int) -> None:
        try:
            for start, end in cases:
                got = read(reader, "a/c/0 1", start, end, piece)
                want = store.fs.cat_file(store.path("a/c/0 1"), start=start, end=end)
                assert got == want, (start, end, piece, len(got), len(want))
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=check, args=(p,)) for p in (1, 7)]
    for t in threads:
        t.start()
    check(PIECE)
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with pytest.raises(FileNotFoundError):
        read(reader, "a/c/missing", 0, 10)
    assert read(reader, "a/c/0 1", 0, 4) == data[:4]  # the connection still good after a 404


def test_a_read_only_s3_cache_reads_its_raw_shards_through_range_gets(moto_s3, no_aws_env):
    """A cache's raw shards go through RangeReader (rows the same as Zarr over s3fs); with a proxy in the
    environment (obstore follows it, RangeReader would not) or KDCACHE_S3_READS=obstore, through obstore."""
    opts = moto_s3["storage_options"]
    url = f"s3://{moto_s3['bucket']}/rr-{uuid.uuid4().hex[:8]}.zarr"
    arr = make_array(url, "float16", opts)
    for env, ranges in [({}, True), ({"HTTPS_PROXY": "http://proxy.invalid:3128"}, False),
                        ({"KDCACHE_S3_READS": "obstore"}, False)]:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            store = CacheStore(url, opts, read_only=True)
            assert store._obstore() is not None and (store._ranges is not None) == ranges, env
            if ranges:  # the rows come through the RangeReader, not obstore
                mp.setattr("pipeline.s3_reads.get", lambda *a, **k: pytest.fail("read through obstore"))
            np.testing.assert_array_equal(store.read_unit(manifest(S), 1, 0, ["a"], 3, S - 2)["a"],
                                          arr[S + 3:2 * S - 2, 0])


class Scripted(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint for one object whose answers follow ``script`` (one entry per request, then ``ok``):
    ``ok``, ``503``, ``cut`` (the headers promise the range, half the body comes and the connection closes),
    ``403``, ``404``. Records each request's Range header."""

    protocol_version = "HTTP/1.1"
    data = bytes(range(256)) * 4096  # 1 MiB
    script: list[str] = []
    ranges: list[str] = []
    ports: list[int] = []  # each request's client port: which connection it came on
    paths: list[str] = []

    def do_GET(self):
        rng = self.headers.get("Range", "")
        type(self).ranges.append(rng)
        type(self).paths.append(self.path)
        type(self).ports.append(self.client_address[1])
        what = type(self).script.pop(0) if type(self).script else "ok"
        if what in ("503", "403", "404"):
            code = {"503": b"SlowDown", "403": b"AccessDenied", "404": b"NoSuchKey"}[what]
            body = b"<?xml version='1.0'?><Error><Code>" + code + b"</Code></Error>"
            self.send_response(int(what))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        body = self.data[first:last + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.data)}")
        self.end_headers()
        if what == "cut":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(s3_ranges, "BACKOFF_S", 0.001)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.ranges, Scripted.ports, Scripted.paths = [], [], []
    reader = RangeReader("kdcache", "c.zarr", {"region": "us-east-1", "access_key_id": "k", "secret_access_key": "s",
                                                "endpoint": f"http://127.0.0.1:{server.server_address[1]}/s3/"})
    yield reader
    server.shutdown()
    server.server_close()


def test_5xx_and_a_body_cut_short_are_retried_from_where_it_stopped(scripted):
    """503 twice, then a body cut at its half: the bytes arrive whole, and the last request asks only for the
    half that had not landed."""
    Scripted.script = ["503", "503", "cut"]
    got = read(scripted, "a/c/0", 1000, 1000 + 300_000)
    assert got == Scripted.data[1000:301_000]
    assert Scripted.ranges[:3] == ["bytes=1000-300999"] * 3
    assert Scripted.ranges[3] == f"bytes={1000 + 150_000}-300999"
    assert set(Scripted.paths) == {"/s3/kdcache/c.zarr/a/c/0"}  # path-style, under the endpoint's own path


def _read_in_child(reader: RangeReader, q) -> None:
    q.put(read(reader, "a/c/0", 10, 5000))


def test_a_forked_process_opens_its_own_connection(scripted):
    """A reader used before a fork (a DataLoader's workers forked from a process that read): the child's GET goes
    on a connection of its own, the parent's kept-alive one goes on serving the parent."""
    assert read(scripted, "a/c/0", 0, 1000) == Scripted.data[:1000]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(scripted, q))
    child.start()
    got = q.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == Scripted.data[10:5000]
    assert read(scripted, "a/c/0", 7, 70) == Scripted.data[7:70]
    parent, forked, again = Scripted.ports
    assert forked != parent and again == parent


def test_what_is_not_retried_or_fails_every_try_is_one_line_naming_the_object(scripted):
    Scripted.script = ["403"]
    with pytest.raises(CacheError) as e:
        read(scripted, "a/c/0", 0, 10)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("a/c/0: S3 refused the read (HTTP 403: AccessDenied)"), msg
    assert len(Scripted.ranges) == 1

    Scripted.script = ["404"]
    with pytest.raises(FileNotFoundError):
        read(scripted, "a/c/0", 0, 10)

    Scripted.ranges = []
    Scripted.script = ["503"] * s3_ranges.ATTEMPTS
    with pytest.raises(CacheError) as e:
        read(scripted, "a/c/0", 0, 10)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"a/c/0: the S3 read failed after {s3_ranges.ATTEMPTS} tries"), msg
    assert len(Scripted.ranges) == s3_ranges.ATTEMPTS
    assert read(scripted, "a/c/0", 0, 10) == Scripted.data[:10]  # and the next read goes on


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 signed by itself, and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_https_is_verified_against_aws_ca_bundle(tmp_path, monkeypatch):
    """Over TLS: with the server's CA in AWS_CA_BUNDLE the bytes arrive; without it, one line saying to set it
    (not retried)."""
    import ssl

    cert, key = _self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.script, Scripted.ranges = [], []
    try:
        reader = RangeReader("kdcache", "c.zarr", {"region": "us-east-1", "access_key_id": "k", "secret_access_key": "s",
                                                    "endpoint": f"https://127.0.0.1:{server.server_address[1]}"})
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        assert read(reader, "a/c/0", 100, 200_000) == Scripted.data[100:200_000]
        monkeypatch.delenv("AWS_CA_BUNDLE")
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        reader._drop()  # a new connection, verified without the bundle
        Scripted.ranges = []
        with pytest.raises(CacheError) as e:
            read(reader, "a/c/0", 0, 10)
    finally:
        server.shutdown()
        server.server_close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("a/c/0: the S3 endpoint's certificate did not verify") \
        and msg.endswith("point AWS_CA_BUNDLE at the CA bundle that signs it"), msg
    assert Scripted.ranges == []  # refused at the handshake, once
