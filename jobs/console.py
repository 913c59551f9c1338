"""The ``kdcache`` command's process: :func:`jobs.cli.main`, then an exit that does not wait on Python's teardown.

After a command's work is done, Python's own finalisation of what it loaded (torch, timm, Ray, Zarr …) kept the
process alive for seconds: ``kdcache cache`` of the digits printed its summary, then took 5.2 s to exit, of which
Ray's shutdown (an ``atexit`` handler) was 1.5 s, the other ``atexit`` handlers 0.04 s, and 2.7 s the interpreter
tearing down modules and freeing memory the OS frees anyway (measured 2026-12-01 on this 2-core machine). So once
:func:`~jobs.cli.main` returns, the ``atexit`` handlers run (they stop a private Ray, flush and close logging,
reap child processes), stdout and stderr are flushed, and the process ends with ``os._exit``. Where a non-daemon
thread still runs, whose work Python's normal exit would wait for, it exits the normal way. An exception out of
``main`` (``--help``, a usage error, Ctrl-C) takes the normal way too.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main

    rc = cli_main(argv)
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(rc)
    atexit._run_exitfuncs()  # what Python's exit runs first (CPython's, stable since 2.x; no public equivalent)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`kdcache ls | head`) or stream: nothing more to write
            pass
    os._exit(rc)


if __name__ == "__main__":
    main()
