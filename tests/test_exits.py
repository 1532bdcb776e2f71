"""The exit codes other processes act on are defined once (sidecar/exits.py)."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar import exits

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "kforge-sidecar@.service"


def test_systemd_unit_does_not_restart_what_a_restart_cannot_fix():
    line = re.search(r"^RestartPreventExitStatus=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert line is not None
    assert sorted(int(c) for c in line.group(1).split()) == sorted(set(exits.SERVE_NO_RESTART))


def test_the_modules_use_the_shared_codes():
    from sidecar import consumer, launcher, server, supervisor

    assert server.EXIT_IN_USE is exits.EXIT_IN_USE and launcher.EXIT_IN_USE is exits.EXIT_IN_USE
    assert consumer.EXIT_RETRY is exits.EXIT_RETRY and supervisor.EXIT_RETRY is exits.EXIT_RETRY
    assert launcher.EXIT_NOT_FOUND == 127 and exits.EXIT_RETRY == 75


def _reaped(tmp_path: Path, code: int):
    """A real Supervisor after it reaped a real uploader-like process that exited with ``code``."""
    import subprocess
    import sys
    import time

    from sidecar import options
    from sidecar.supervisor import Supervisor, Worker

    cfg = options.build({"address": f"ipc://{tmp_path}/s.sock", "spool_dir": tmp_path})
    sup = Supervisor(cfg)
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"], start_new_session=True)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    sup.workers["run1"] = Worker(proc, time.time())
    now = time.monotonic()
    sup._reap(now)
    assert sup.workers == {}
    return sup, now


def test_an_uploader_that_found_the_run_locked_is_no_failure_and_waits_no_backoff(tmp_path):
    """EXIT_LOCKED: it lost the race with an uploader the sidecar did not start. Nothing
    failed: no failure is counted in the health metrics and no backoff delays the next
    start (tick starts one once the other's lock is free)."""
    sup, now = _reaped(tmp_path, exits.EXIT_LOCKED)
    assert sum(sup.failures.values()) == 0 and sup.restarts == {}
    assert sup.backoff["run1"].not_before <= now and sup.retry_in("run1") is None


def test_a_crashed_uploader_counts_and_backs_off(tmp_path):
    sup, now = _reaped(tmp_path, exits.EXIT_CRASHED)
    assert sup.failures == {"crash": 1} and sup.restarts == {"run1": 1}
    assert sup.backoff["run1"].not_before > now and sup.retry_in("run1") is not None
