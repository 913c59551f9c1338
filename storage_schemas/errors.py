"""The project's error types: what a user can cause and fix, as opposed to a bug.

``kdcache`` turns exactly these into one line ``kdcache CMD: error: …`` (exit status 2); any other
exception is an internal error and keeps its traceback. Each subclasses ``ValueError`` (or
``RuntimeError`` where the state of a cache, not a value, is wrong) so that callers which caught
the built-in type keep working.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class KDCacheError(Exception):
    """Base of every error a user can act on; its message names what is wrong, where, and what to do."""


class ConfigError(KDCacheError, ValueError):
    """A config, option or argument value is wrong (the message names the key)."""


class InputDataError(KDCacheError, ValueError):
    """The input data (a tar, a sample in it) cannot be used as it is."""


class CacheError(KDCacheError, RuntimeError):
    """A cache is missing, unfinished, in use, damaged, or does not fit what is asked of it."""


class CacheMismatchError(CacheError, ValueError):
    """A cache does not hold what is asked of it (targets, teacher weights, layout)."""


class NotFoundError(KDCacheError, FileNotFoundError):
    """A file, folder, input tar or cache that the user named does not exist."""


_KINDS = {c.__name__: c for c in (KDCacheError, ConfigError, InputDataError, CacheError, CacheMismatchError,
                                  NotFoundError)}


def portable(e: KDCacheError) -> tuple[str, str]:
    """``e`` as (kind, message) strings, to cross a process boundary intact.

    Ray pickles an exception raised in a task or actor by its ``args`` only and wraps it
    (``RayTaskError``, Ray Data's ``UserCodeException: UDF failed to process a data block``), so
    its chain and any subclass with its own ``__init__`` arrive mangled or as a traceback; a
    returned pair of strings arrives as it left. ``kind`` is the nearest type of this module.
    """
    kind = next(c.__name__ for c in type(e).__mro__ if c.__name__ in _KINDS and c.__module__ == __name__)
    return kind, str(e)


def from_portable(kind: str, message: str) -> KDCacheError:
    """The error :func:`portable` described, to raise on this side."""
    return _KINDS.get(kind, KDCacheError)(message)


class Failed(NamedTuple):
    """What a :func:`returning_errors` function returns instead of raising: :func:`portable`'s pair."""

    kind: str
    message: str


def returning_errors(fn: Callable[..., T]) -> Callable[..., T | Failed]:
    """``fn`` for a Ray task: an error the user can fix is returned (as :func:`portable` strings), not raised,
    so that :func:`task_result` raises it in the driver as it was, not as a Ray traceback.

    It lives here, in a module that imports nothing heavy, because a Ray worker that runs the task imports the
    module of everything the wrapper refers to: defined in :mod:`pipeline.job`, it made each worker of the index
    pass import torch, timm and torch._dynamo (~10 s of CPU a process on this machine) to index a tar."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDCacheError as e:
            return Failed(*portable(e))
    return run


def task_result(value):
    """A :func:`returning_errors` task's value, its error raised here."""
    if isinstance(value, Failed):
        raise from_portable(value.kind, value.message)
    return value


# the state of the machine or the bucket, not a bug: permissions, a read-only file system, no space, quota
STORAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def storage_error(e: BaseException, where: str | None = None) -> CacheError | None:
    """A :class:`CacheError` saying what to do for an ``OSError`` the user can fix (see ``STORAGE_ERRNOS``), else
    None; ``where`` names the place when the error does not (Zarr's writes do not)."""
    # s3fs raises S3's AccessDenied (a bucket policy, a quota) as PermissionError without an errno
    if not isinstance(e, OSError) or not (e.errno in STORAGE_ERRNOS or isinstance(e, PermissionError)):
        return None
    return CacheError(f"{e.filename or where or 'a file'}: {e.strerror or e}: kdcache cannot write or read there; "
                      "choose a URL this user can write to (output.url, output.root, the train output) or free "
                      "space (a caching job then continues where it stopped when rerun)")
