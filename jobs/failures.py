"""How a failure of a ``kdcache`` command reaches the shell: one line for what the user can fix, the traceback on
demand for a bug.

An error the user can act on is one of the project's own types (:class:`storage_schemas.errors.KDCacheError`)
or the machine's state (:func:`storage_schemas.errors.storage_error`: a full disk, a path this user cannot
write), wherever it was raised: in this process, inside a Ray task (Ray wraps it, and its ``str()`` is Ray's
traceback), in a Ray Train worker, or in a DataLoader worker (torch re-raises it with the worker's traceback as
its message). :func:`exit_status` prints it as ``kdcache CMD: error: MESSAGE`` (exit status 2); anything else is
a bug: one line saying so (exit status 1), or the traceback with ``--debug`` / ``KDCACHE_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys


def exit_status(command: str, e: Exception, *, debug: bool, ray_was_up: bool) -> int | None:
    """Report ``e``, raised by ``kdcache command``, on stderr and return the exit status; None: the caller
    re-raises it (a bug, with ``debug``). Ray, when this process started it (not ``ray_was_up``), is shut down
    first (:func:`end_ray_output`)."""
    if not ray_was_up:
        end_ray_output()
    msg = user_error(e)
    if msg is not None:  # the user can fix it: exit status 2
        print(f"kdcache {command}: error: {msg}", file=sys.stderr)
        return 2
    if debug or os.environ.get("KDCACHE_DEBUG", "") not in ("", "0"):
        return None
    # a bug: exit status 1, the traceback on demand
    print(f"kdcache {command}: internal error: {type(e).__name__}: {e} (a bug in kdcache: rerun with "
          "--debug or KDCACHE_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
    return 1


def ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # not imported: not started
    return ray is not None and ray.is_initialized()


def end_ray_output() -> None:
    """Disconnect from Ray (stopping the private instance this process started) so that nothing of Ray's comes after
    the error line. Ray's driver prints what its processes write — workers' output, the raylet's own warnings
    ("… is over 95% full …", every 10 s while a disk is nearly full) — on a thread of its own until Ray shuts down,
    which the exit would do only after the line: on CI such a warning came after it and was the shell's last line.
    Disconnecting now costs nothing the exit would not spend anyway (the same shutdown, moved earlier)."""
    if ray_is_up():
        sys.modules["ray"].shutdown()


def user_error(e: BaseException) -> str | None:
    """The message of an error the user can act on — one of the project's own types
    (:class:`storage_schemas.errors.KDCacheError`), possibly raised inside a Ray task — else None."""
    from storage_schemas.errors import KDCacheError, storage_error

    seen = 0
    while e is not None and seen < 10:
        seen += 1
        failures = getattr(e, "worker_failures", None)  # Ray Train: {rank: the exception raised in that worker}
        if isinstance(failures, dict) and failures:
            e = failures[min(failures)]
            continue
        cause = getattr(e, "cause", None)  # a Ray task's error: the exception raised in the task
        if isinstance(cause, BaseException) and cause is not e:
            e = cause  # (a RayTaskError also *is* that type, but its str() is Ray's traceback)
            continue
        worker = _dataloader_worker_error(e)
        if worker is not None:
            return worker
        if isinstance(e, KDCacheError):
            return str(e)
        err = storage_error(e)
        if err is not None:  # the machine's state, not a bug of ours
            return str(err)
        e = e.__cause__
    return None


def _dataloader_worker_error(e: BaseException) -> str | None:
    """The message of one of the project's own errors raised in a DataLoader worker, or None. torch re-raises a
    worker's exception in the main process as its type (or as RuntimeError when that type will not take one
    string) with the worker's traceback as the message (``Caught X in DataLoader worker process N.`` …); the
    traceback's last line names the type and holds the message."""
    import importlib

    from storage_schemas.errors import KDCacheError

    text = str(e)
    if not (text.startswith("Caught ") and "in DataLoader worker process" in text and "\nOriginal Traceback" in text):
        return None
    last = text.rstrip().splitlines()[-1]
    path, sep, message = last.partition(": ")
    module, _, name = path.rpartition(".")
    if not (sep and module):
        return None
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return message if isinstance(cls, type) and issubclass(cls, KDCacheError) else None
