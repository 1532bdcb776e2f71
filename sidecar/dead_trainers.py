"""The dead-trainer policy: a run whose trainers all died without close() is finished as
failed, after a grace period in which a resume may re-attach.

A trainer counts as dead when its pid is gone (a trainer on this host) or it has been
silent for ``--session-timeout`` (idle clients ping every 5 s). The sidecar then
appends a close with exit code 1 in its own session, so the uploader uploads
everything that arrived and finishes the run.
"""

from __future__ import annotations

import logging
import time

from client.protocol import Close

from .runstate import Ledger, RunState

log = logging.getLogger("kforge_sidecar.receiver")


class DeadTrainers:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def reap(self, session_timeout: float, grace: float) -> None:
        """Finish, as failed, the open runs whose trainers all died without close().

        A trainer counts as dead when its pid is gone (a trainer on this host)
        or it has been silent for ``session_timeout`` (clients ping while idle).
        The run waits ``grace`` seconds for a resume to re-attach; then the
        sidecar appends a close with exit code 1 in its own name, so the
        uploader uploads everything that arrived and finishes the run.
        """
        now = time.monotonic()
        for run in self.ledger.runs.values():
            if run.closed or not run.sessions:
                continue
            if self.has_live_trainer(run, session_timeout):
                run.orphaned_since = None
                continue
            if run.orphaned_since is None:
                run.orphaned_since = now
                log.warning(
                    "run %s: its trainer is gone without close(); finishing it as failed in %.0fs unless it resumes",
                    run.meta.run_id, grace,
                )  # fmt: skip
            elif now - run.orphaned_since >= grace:
                self._close(run)

    def has_live_trainer(self, run: RunState, session_timeout: float) -> bool:
        """A session of the run is alive: its pid runs (a trainer on this host), and it
        was heard from within ``session_timeout``."""
        now = time.monotonic()
        return any(
            self.ledger.sessions[s].alive(now, session_timeout) for s in run.sessions if s in self.ledger.sessions
        )

    def _close(self, run: RunState) -> None:
        session = f"sidecar-{run.meta.run_id}"[:64]  # the sidecar's own session: no client's seqs are touched
        seq = self.ledger.sessions[session].seq + 1 if session in self.ledger.sessions else 1
        if not self.ledger.append(run, Close(session=session, seq=seq, exit_code=1)):
            return
        run.orphaned_since = None
        log.warning("run %s: no trainer came back; finishing it as failed (exit code 1)", run.meta.run_id)
