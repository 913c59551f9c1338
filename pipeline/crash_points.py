"""Named crash points: the moments at which a test kills a job (``kill -9`` on itself) to show that a rerun
with ``--resume`` ends with the same bytes as a job never killed (tests/pipeline/test_kill_points.py).

Killing from outside at random times rarely lands inside the few milliseconds of a manifest, checksum or
completion-record write, which is where resumption is most likely to break; so the code names those moments
and a test picks among them. Two environment variables drive it; with neither set (always, outside tests)
:func:`crash_point` is one dictionary lookup:

``KDCACHE_CRASH_TRACE=FILE``
    every point a process passes is appended to FILE as ``PID NAME`` (the schedule is drawn from this trace
    of an uninterrupted run);
``KDCACHE_CRASH_AT=NAME#N`` with ``KDCACHE_CRASH_MARKER=FILE``
    the process that passes NAME for the N-th time kills itself with SIGKILL, once: the marker file is created
    first (exclusively), so a restarted Ray actor or a retried unit passing the point again lives on;
``KDCACHE_HOLD_AT=NAME#N`` with ``KDCACHE_HOLD_UNTIL=FILE``
    the process that passes NAME for the N-th time waits there (at most 10 minutes) until FILE exists, so a
    test can act while a job stands at that moment (a reader during a growth, tests/pipeline/test_kill_points.py).

Points are named after what is written (``write:manifest.json`` before a stored object's write,
``rename:NAME`` between a local file's temporary copy and its rename, ``wrote:NAME`` after) or the step
(``shard:ARRAY t3 v1`` after one array's shard of a unit, ``grow:resized``, ``train:step 7``).

Written here because the failpoint libraries that exist (FoundationDB's simulation, TiKV's ``fail`` crate)
are not Python; ``pytest-timeout``/signals from outside cannot aim at a write.
"""

from __future__ import annotations

import collections
import os
import signal
import time

TRACE, AT, MARKER = "KDCACHE_CRASH_TRACE", "KDCACHE_CRASH_AT", "KDCACHE_CRASH_MARKER"
HOLD_AT, HOLD_UNTIL = "KDCACHE_HOLD_AT", "KDCACHE_HOLD_UNTIL"
_passed: collections.Counter[str] = collections.Counter()


def crash_point(name: str) -> None:
    """Pass the crash point ``name`` (see the module docstring)."""
    env = os.environ
    trace, at, hold = env.get(TRACE), env.get(AT), env.get(HOLD_AT)
    if not trace and not at and not hold:
        return
    _passed[name] += 1
    if trace:
        with open(trace, "a") as f:  # one short append per line: lines of several processes do not mix
            f.write(f"{os.getpid()} {name}\n")
    here = f"{name}#{_passed[name]}"
    if hold == here:
        deadline = time.monotonic() + 600
        while not os.path.exists(env[HOLD_UNTIL]) and time.monotonic() < deadline:
            time.sleep(0.1)
    if at == here:
        try:
            os.close(os.open(env[MARKER], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
