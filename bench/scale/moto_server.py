"""The S3 server of :mod:`bench.scale`'s reader: moto's, serving a ranged GET from the bytes of its range.

    python bench/scale/moto_server.py     # prints "endpoint HOST:PORT", serves until its stdin closes

(run as a script: importing the ``bench.scale`` package would load torch and timm into the server).

moto 5.2 answers a ranged GET by reading the whole object (``FakeKey.value``) and slicing it afterwards. The
student's reader reads a large tap's shard a 64-row block at a time (``student.stream.BlockRows``), so for the
reader's ViT-L cache each 25 MB GET read a 51 MB object on the server: 40 ms of server CPU a GET, on the two
cores the reader runs on (scratch /tmp/s22/s3get.py, 2026-12-02), 2.1 ms a ViTKD sample in the 8-round run of
2026-12-02 (``server_cpu_ms_per_sample``) against 0.24 with images alone. S3 reads a range without reading the
rest, and its CPU is not the reader's machine's; this server reads the range alone, so what the benchmark
charges the S3 configurations is moto's cost of sending the bytes, not of a whole-object read real S3 does not
do. Everything else (listing, PUT, HEAD, errors, malformed or multi-part ranges) is moto's, unchanged.

Patched here, in the server's own process only: ``FakeKey.value`` answers the range the current request's
``get_object`` asked for (a thread-local: the threaded server runs a request per thread), and ``get_object``
returns it as moto's ``_handle_range_header`` would (206, ``Content-Range``, no checksum headers).
"""

from __future__ import annotations

import re
import sys
import threading

from moto.s3.models import FakeKey
from moto.s3.responses import S3Response

_request = threading.local()  # want: the parsed Range of the GET in flight; served: (begin, end, size)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_whole_value = FakeKey.__dict__.get("value")


def parse(spec: str) -> tuple[int | None, int | None] | None:
    """``(first, last)`` of one HTTP byte range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n`` → ``(None, n)``), or
    None for anything else (left to moto)."""
    m = _RANGE.fullmatch(spec.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = (int(g) if g else None for g in m.groups())
    if first is not None and last is not None and last < first:
        return None
    if first is None and last == 0:
        return None
    return first, last


def _value(self: FakeKey) -> bytes:
    want = getattr(_request, "want", None)
    size = self.contentsize
    if want is None or size == 0:
        return _whole_value.fget(self)
    first, last = want
    if first is None:  # the last n bytes
        first, last = max(0, size - last), size - 1
    else:
        last = size - 1 if last is None else min(last, size - 1)
    if first > last:  # past the end: moto's InvalidRange
        return _whole_value.fget(self)
    with self.lock:
        self._value_buffer.seek(first)
        data = self._value_buffer.read(last - first + 1)
    _request.served = (first, last, size)
    return data


def _get_object(self: S3Response):
    _request.want, _request.served = parse(self.headers.get("range") or ""), None
    try:
        status, headers, body = _plain_get_object(self)
    finally:
        _request.want = None
    served, _request.served = _request.served, None
    if status != 200 or served is None:
        return status, headers, body
    first, last, size = served
    for h in [h for h in headers if h.lower().startswith("x-amz-checksum-")]:  # S3 sends none for a range
        del headers[h]
    headers["content-range"] = f"bytes {first}-{last}/{size}"
    headers["content-length"] = str(len(body))
    return 206, headers, body


if not (isinstance(FakeKey.__dict__.get("value"), property) and callable(getattr(S3Response, "get_object", None))):
    raise RuntimeError("this moto's S3 model has no FakeKey.value property or S3Response.get_object: "
                       "bench/scale/moto_server.py patches both; update it for this moto version")
_plain_get_object = S3Response.get_object
FakeKey.value = property(_value, _whole_value.fset)
S3Response.get_object = _get_object


def main() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    print(f"endpoint {host}:{port}", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
