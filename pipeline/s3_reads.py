"""Reads of a cache's arrays from S3 through obstore, a compiled (Rust) object-store client, instead of s3fs.

Why: the student's reader from S3 spends its CPU on the client side of small requests. A unit of the reader
benchmark's ViT-L cache (``bench.scale``, 32 rows, moto on 127.0.0.1, 3 interleaved repeats, scratch script
2026-12-01) costs, per unit, read through Zarr's ``FsspecStore`` vs Zarr's ``ObjectStore`` over obstore:
its 14 small arrays (labels, view records, logits …) 163–171 → 53–56 ms of client CPU (wall 299–314 → 119–125
ms); the three raw ViTKD tap shards (38 MB, :mod:`pipeline.raw_shards`) 88–94 → 47–53 ms. Only reads move
here; writing, listing and every other protocol stay on fsspec (one code path for the caching job's writes). The
raw shards' GETs themselves now go through :class:`pipeline.s3_ranges.RangeReader` (the same bucket, endpoint
and credentials, :func:`s3_config`), which reads them from the socket straight into the rows' buffers at half
obstore's CPU; ``KDCACHE_S3_READS=obstore`` keeps them on obstore.

When obstore is used (else s3fs, as before): an ``s3://`` URL opened read-only whose s3fs storage options
translate exactly (:func:`s3_config`): explicit ``key``/``secret`` (``token``) or ``anon``, or the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` environment without ``AWS_PROFILE``; a region or an
``endpoint_url``; no other option that changes a request. Credentials from profiles, the shared credentials
file or instance metadata are botocore's, which obstore does not read the same way, so those stay on s3fs.
``KDCACHE_S3_READS=fsspec`` turns obstore off.

Fork safety: obstore runs one tokio runtime per process, and a process forked after its parent used it hangs on
its first request (tried: a forked child's GET never returns, with the parent's store or a new one). A
DataLoader forks its workers from the training process, which is safe while that process has not read through
obstore itself; when it has (``num_workers=0`` then workers, a read in the main process first), the forked
process reads through s3fs instead: :data:`_runtime_pid` records which process started the runtime.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from storage_schemas.errors import CacheError

if TYPE_CHECKING:
    from obstore.store import S3Store

log = logging.getLogger(__name__)

ENV = "KDCACHE_S3_READS"  # "fsspec": every S3 read through s3fs; "obstore": raw shards too (not pipeline.s3_ranges)
# s3fs options that change no GET (its listing cache, block sizes for file objects): obstore may ignore them
NO_EFFECT_ON_GET = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
                    "default_block_size", "default_fill_cache", "default_cache_type", "cache_regions"}
CLIENT_KWARGS = {"endpoint_url", "region_name"}
TOKIO_THREADS = 2  # obstore's runtime threads in a process that reads through it (see claim)

_runtime_pid: int | None = None  # the process whose obstore runtime has run (None: not yet, in any ancestor)


def s3_config(url: str, storage_options: dict | None) -> tuple[str, str, dict] | None:
    """``(bucket, prefix, config)`` for reading ``url`` (``s3://bucket/prefix``) with obstore's ``S3Config``
    ``config``: the same endpoint, region and credentials as s3fs would use for ``storage_options``; or None when
    reads of ``url`` stay on s3fs (not S3, options that do not translate, ``KDCACHE_S3_READS=fsspec``, or
    obstore's runtime started in an ancestor process: see the module docstring). :mod:`.s3_ranges` reads with the
    same."""
    if not url.startswith("s3://") or os.environ.get(ENV, "").lower() == "fsspec":
        return None
    if _runtime_pid is not None and _runtime_pid != os.getpid():
        log.info("%s: read through s3fs: obstore ran in the process this one was forked from (it would hang here)",
                 url)
        return None
    config = _config(dict(storage_options or {}))
    if config is None:
        return None
    bucket, _, prefix = url.removeprefix("s3://").strip("/").partition("/")
    return bucket, prefix, config


def store_for(bucket: str, prefix: str, config: dict) -> S3Store:
    """obstore's ``S3Store`` for :func:`s3_config`'s answer (``store_for(*got)``)."""
    from obstore.store import S3Store

    client = {"allow_http": True} if config.get("endpoint", "").startswith("http://") else {}
    return S3Store(bucket, prefix=prefix or None, config=config, client_options=client)


def _config(opts: dict) -> dict | None:
    """obstore's ``S3Config`` for s3fs options ``opts``, or None where they do not translate exactly."""
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    if set(client_kwargs) - CLIENT_KWARGS:
        return None
    endpoint = opts.pop("endpoint_url", None) or client_kwargs.get("endpoint_url")
    region = client_kwargs.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key, secret, token = opts.pop("key", None), opts.pop("secret", None), opts.pop("token", None)
    anon = bool(opts.pop("anon", False))
    if set(opts) - NO_EFFECT_ON_GET:  # profile, config_kwargs, requester_pays, use_ssl …: s3fs's business
        return None
    if not (key or secret or anon):  # botocore's environment step, the one obstore reads the same way
        if os.environ.get("AWS_PROFILE"):
            return None
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        token = os.environ.get("AWS_SESSION_TOKEN")
    if not anon and not (key and secret):
        return None  # shared files, instance metadata …: botocore's chain
    if not (region or endpoint):
        return None  # a bucket in another region: s3fs finds it, obstore would be redirected
    config: dict = {"region": region or "us-east-1"}  # botocore signs for us-east-1 without a region, too
    if endpoint:
        config["endpoint"] = endpoint
    if anon:
        config["skip_signature"] = True
    else:
        config.update(access_key_id=key, secret_access_key=secret)
        if token:
            config["session_token"] = token
    return config


def claim() -> None:
    """Record that this process runs obstore's runtime (call before any request through it, Zarr's included).
    Its runtime starts a thread per core by default (tokio's default: on a 96-core node each DataLoader worker would
    start 96); a worker's reads are a few concurrent requests at a time, so it gets :data:`TOKIO_THREADS` unless
    ``TOKIO_WORKER_THREADS`` is set (read once, when the runtime starts; inherited by processes this one starts)."""
    global _runtime_pid
    if _runtime_pid != os.getpid():
        os.environ.setdefault("TOKIO_WORKER_THREADS", str(TOKIO_THREADS))
    _runtime_pid = os.getpid()


def get(store: S3Store, key: str, start: int, end: int | None, *, name: str) -> np.ndarray:
    """Bytes ``start..end`` of object ``key`` (``start`` < 0: the last ``-start`` bytes; ``end`` None: to the
    end) as a read-only uint8 array over obstore's own buffer, not copied: the caller copies it where it must
    land (:meth:`pipeline.raw_shards.RawShard._read`: into a reused buffer, checksummed as it lands). ``name`` is
    the object's URL for errors. A missing object raises ``FileNotFoundError``, as s3fs does; a refused or failed
    request a :class:`CacheError` naming it."""
    import obstore
    from obstore.exceptions import BaseError

    claim()
    try:
        if start < 0:
            data = obstore.get(store, key, options={"range": {"suffix": -start}}).bytes()
        elif start == 0 and end is None:
            data = obstore.get(store, key).bytes()
        elif end is None:
            data = obstore.get(store, key, options={"range": {"offset": start}}).bytes()
        else:
            data = obstore.get_range(store, key, start=start, end=end)
    except FileNotFoundError:
        raise
    except BaseError as e:
        raise request_error(e, name) from e
    return np.frombuffer(data, np.uint8)


def request_error(e: BaseException, name: str) -> CacheError:
    """A one-line :class:`CacheError` for obstore's error ``e`` reading ``name`` (its message runs to several
    lines of the Rust error chain)."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, (PermissionDeniedError, UnauthenticatedError)):
        return CacheError(f"{name}: S3 refused the read ({first}); check the credentials and the bucket's policy "
                          "(--storage-option key=… secret=…, or the AWS_* environment)")
    return CacheError(f"{name}: the S3 read failed ({first}); rerun, or set {ENV}=fsspec to read through s3fs")
