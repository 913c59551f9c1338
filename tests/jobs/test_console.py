"""jobs.console: the kdcache process exits as soon as its work is done, yet runs what Python's exit would —
atexit handlers (Ray's shutdown, logging), flushed output, the exit status — and waits for a non-daemon thread."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import atexit, sys, threading, time
from pathlib import Path
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
if sys.argv[2] == "thread":  # a non-daemon thread still at work when main returns
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
print("x" * 100000, end="")  # buffered stdout, flushed only at exit
from jobs.console import main
main(sys.argv[3:])
"""


def probe(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), mode, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_the_quick_exit_runs_atexit_handlers_and_flushes_output(tmp_path):
    r = probe(tmp_path, "-", "ls", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x" * 100000 + "no caches\n"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_an_error_keeps_its_exit_status_and_one_line(tmp_path):
    r = probe(tmp_path, "-", "cache", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache cache: error: config file"), r.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_running_non_daemon_thread_is_waited_for(tmp_path):
    r = probe(tmp_path, "thread", "ls", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"
