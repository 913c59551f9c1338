"""Ranged GETs of a cache's raw shards from S3, read from the socket straight into the reader's own buffers.

Why not obstore here too (:mod:`.s3_reads` keeps it for everything Zarr reads): obstore answers a ranged GET with
one buffer of the whole range that Python then copies where the rows belong, and its client spends most of its
CPU on the way: one 25 MB GET (a 64-row block of one of ViT-L's ViTKD taps, what :class:`student.stream.BlockRows`
reads) from moto on 127.0.0.1 cost 19–23 ms of client CPU through ``obstore.get_range`` (15–25 through its
stream at any chunk size), 10.5 through botocore's client, and 6.7–7.5 through a plain ``http.client``
connection reading with ``readinto`` into the destination: as much as ``readinto`` of the same bytes from a local
file (5.8–7.2 ms). Scratch /tmp/s24/s3stream.py, 2026-12-02, 5 interleaved rounds of 6 GETs each. In
:class:`student.stream.BlockRows` over the ``bench.scale`` reader's ViT-L cache on moto, the client's CPU a ViTKD
sample went 1.30 → 0.60 ms (medians of 8 interleaved epochs each way; per-round ratio 0.47, quartiles 0.45–0.59;
scratch /tmp/s24/s3_blocks_ab.py). No library
offers a GET that lands in memory the caller owns (obstore, s3fs, botocore and urllib3 all return new bytes), so
this module is that GET and nothing more: SigV4-signed by botocore's own signer (``S3SigV4Auth``), one
keep-alive ``http.client`` connection per process and thread, retried like obstore retries.

Used for exactly the requests obstore would make (:func:`.s3_reads.s3_config`: the same bucket, prefix, endpoint,
region and credentials, path-style addressing as obstore's default), unless a proxy is set in the environment
(``HTTP(S)_PROXY``, ``ALL_PROXY``: those reads stay on obstore, whose client follows them) or
``KDCACHE_S3_READS=obstore``. HTTPS is verified against ``AWS_CA_BUNDLE`` when set (botocore's rule), else
OpenSSL's default certificates (``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set).

Failures: a connection refused, reset or timed out, and a 5xx answer (S3's 500/503 "slow down"), are retried
up to :data:`ATTEMPTS` times in all with a growing pause, a body cut short too — from the byte it stopped at, so
nothing landed is read twice; a missing object raises ``FileNotFoundError`` (as s3fs and obstore do); 401/403, a
certificate that does not verify and anything else a one-line :class:`~storage_schemas.errors.CacheError` naming
the object.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator

from storage_schemas.errors import CacheError

from .raw_shards import Fill
from .s3_reads import ENV

ATTEMPTS = 4  # tries of one request in all (obstore: 1 + 3 retries by default)
BACKOFF_S = 0.1  # pause before the first retry, ×4 each next (0.1, 0.4, 1.6 s)
TIMEOUT_S = 30.0  # connect, and each read from the socket
RETRY_STATUS = {500, 502, 503, 504}
# proxies: obstore's (reqwest's) client goes through them, this one would not, so such reads stay on obstore
ENV_NOT_FOLLOWED = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class Retry(Exception):
    """A failure worth another try (connection, 5xx, a body cut short)."""


class RangeReader:
    """Ranged GETs of objects under ``s3://bucket/prefix`` with ``config`` (obstore's ``S3Config`` keys that
    :func:`.s3_reads.s3_config` produces: ``region``, ``endpoint``, ``access_key_id``, ``secret_access_key``,
    ``session_token``, ``skip_signature``). One per cache store; its connections are per process and thread."""

    def __init__(self, bucket: str, prefix: str, config: dict) -> None:
        self.bucket, self.prefix, self.config = bucket, prefix.strip("/"), dict(config)
        self.region = config.get("region", "us-east-1")
        endpoint = config.get("endpoint") or f"https://s3.{self.region}.amazonaws.com"
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.base = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
        self._local = threading.local()  # .conn, .pid: this thread's connection, and the process that opened it

    @classmethod
    def usable(cls) -> bool:
        """Whether this process's environment lets these GETs go where obstore's would (no proxy set)."""
        return os.environ.get(ENV, "").lower() != "obstore" and not any(
            os.environ.get(k) for k in ENV_NOT_FOLLOWED)

    def url(self, key: str) -> str:
        path = f"{self.prefix}/{key}" if self.prefix else key
        return f"{self.base}/{self.bucket}/{urllib.parse.quote(path, safe='/~')}"

    @contextlib.contextmanager
    def open(self, key: str, start: int, end: int | None, *, name: str) -> Iterator[tuple[int, Fill]]:
        """``(n, fill)`` for bytes ``start..end`` of object ``key`` (``start`` < 0: the last ``-start``; ``end``
        None: to its end), as :meth:`pipeline.raw_shards.RawShard._source` yields them: their number, and
        ``fill(view, at)``, which reads the next bytes from the socket into ``view`` (``at``: how many were read
        before, from where a retry resumes) and returns how many. ``name`` is the object's URL for errors."""
        resp, first = self._get(key, start, end, name)
        n = int(resp.getheader("content-length", "0")) if resp.status != 416 else 0
        state = {"resp": resp, "first": first}

        def fill(view: memoryview, at: int) -> int:
            for attempt in range(ATTEMPTS):
                try:
                    got = state["resp"].readinto(view)
                    if got:
                        return got
                    raise Retry(f"the body ended after {at} of {n} bytes")
                except (OSError, http.client.HTTPException, Retry) as e:
                    self._failed(e, attempt, name)
                    rest = state["first"] + at
                    state["resp"], _ = self._get(key, rest, rest + n - at, name)
            raise AssertionError("unreachable")

        try:
            yield n, fill
        finally:
            if not state["resp"].isclosed():  # the caller stopped early (an error): the connection is mid-body
                self._drop()

    def _get(self, key: str, start: int, end: int | None, name: str) -> tuple[http.client.HTTPResponse, int]:
        """The response to a GET of the range, its status checked, and the object offset its body starts at (for
        a suffix range, from ``Content-Range``)."""
        headers = {}
        if start < 0:
            headers["Range"] = f"bytes={start}"
        elif end is None and start > 0:
            headers["Range"] = f"bytes={start}-"
        elif end is not None:
            if end <= start:
                raise ValueError(f"{name}: empty range {start}..{end}")
            headers["Range"] = f"bytes={start}-{end - 1}"
        url = self.url(key)
        for attempt in range(ATTEMPTS):
            try:
                resp = self._request(url, headers)
                if resp.status in RETRY_STATUS:
                    resp.read()
                    raise Retry(f"HTTP {resp.status} {resp.reason}")
            except ssl.SSLCertVerificationError as e:  # no retry makes a certificate valid
                self._drop()
                raise CacheError(f"{name}: the S3 endpoint's certificate did not verify ({_one_line(e)}); point "
                                 "AWS_CA_BUNDLE at the CA bundle that signs it") from e
            except (OSError, http.client.HTTPException, Retry) as e:
                self._failed(e, attempt, name)
                continue
            if resp.status in (200, 206, 416):
                if resp.status == 200 and "Range" in headers:
                    resp.read()
                    raise CacheError(f"{name}: the S3 server answered a ranged GET with the whole object (HTTP 200); "
                                     "set KDCACHE_S3_READS=obstore")
                return resp, _first_byte(resp, start)
            body = resp.read()
            if resp.status == 404:
                raise FileNotFoundError(name)
            if resp.status in (401, 403):
                raise CacheError(f"{name}: S3 refused the read (HTTP {resp.status}: {_code(body)}); check the "
                                 "credentials and the bucket's policy (--storage-option key=… secret=…, or the AWS_* "
                                 "environment)")
            raise CacheError(f"{name}: the S3 read failed (HTTP {resp.status}: {_code(body)}); rerun, or set "
                             "KDCACHE_S3_READS=obstore")
        raise AssertionError("unreachable")

    def _failed(self, e: BaseException, attempt: int, name: str) -> None:
        """After try ``attempt`` (from 0) failed with ``e``: its connection dropped, then the one-line error when it
        was the last try, else the pause before the next."""
        self._drop()
        if attempt == ATTEMPTS - 1:
            raise CacheError(f"{name}: the S3 read failed after {ATTEMPTS} tries ({_one_line(e)}); rerun, or set "
                             "KDCACHE_S3_READS=obstore") from e
        time.sleep(BACKOFF_S * 4**attempt)

    def _request(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        headers = self._signed(url, headers)
        target = urllib.parse.urlsplit(url).path  # the endpoint's own path (if any) included, as signed
        conn = self._conn()
        try:
            conn.request("GET", target, headers=headers)
            return conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # the server closed the kept-alive connection between two requests: once more on a new one
            self._drop()
            conn = self._conn()
            conn.request("GET", target, headers=headers)
            return conn.getresponse()

    def _signed(self, url: str, headers: dict[str, str]) -> dict[str, str]:
        if self.config.get("skip_signature"):
            return headers
        from botocore.auth import S3SigV4Auth  # botocore: s3fs's dependency (through aiobotocore)
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        req = AWSRequest(method="GET", url=url, headers=headers)
        creds = Credentials(self.config["access_key_id"], self.config["secret_access_key"],
                            self.config.get("session_token"))
        S3SigV4Auth(creds, "s3", self.region).add_auth(req)
        return dict(req.headers.items())

    def _conn(self) -> http.client.HTTPConnection:
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():  # none yet, or the parent's: a new one
            if self.scheme == "https":
                context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
                local.conn = http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT_S, context=context)
            else:
                local.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
            local.pid = os.getpid()
        return local.conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None


def _first_byte(resp: http.client.HTTPResponse, start: int) -> int:
    rng = resp.getheader("content-range", "")  # "bytes first-last/size"
    if rng.startswith("bytes ") and "-" in rng:
        with contextlib.suppress(ValueError):
            return int(rng[6:].split("-", 1)[0])
    return max(start, 0)


def _code(body: bytes) -> str:
    """S3's error code from its XML answer (``<Code>AccessDenied</Code>``), else the start of the body."""
    text = body.decode("utf-8", "replace")
    if "<Code>" in text and "</Code>" in text:
        return text.split("<Code>", 1)[1].split("</Code>", 1)[0]
    return text.strip().splitlines()[0][:120] if text.strip() else "no body"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
