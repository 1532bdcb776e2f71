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
