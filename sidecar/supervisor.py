"""The supervisor: one uploader process per run, started on demand and watched.

Like an arbiter of worker processes: it spawns an uploader when a run has
frames that wandb has not seen, reaps it when it exits, restarts it with
exponential backoff when it crashed, and on drain sends SIGTERM, waits up to
the drain deadline, then SIGKILLs what is left. A run whose uploader entered
the failure sentinel ("failed") is not restarted.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .config import ServeConfig
from .receiver import RunState
from .spool import UploaderState

log = logging.getLogger("kforge_sidecar.supervisor")

BACKOFF_MAX = 60.0
_DRAIN_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@dataclass
class Worker:
    proc: subprocess.Popen
    started: float


@dataclass
class Backoff:
    failures: int = 0
    not_before: float = 0.0


class Supervisor:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.workers: dict[str, Worker] = {}
        self.states: dict[str, UploaderState] = {}  # the last uploader.json seen per run
        self._backoff: dict[str, Backoff] = {}

    def tick(self, runs: dict[str, RunState]) -> None:
        now = time.monotonic()
        self._reap(now)
        for run_id, run in runs.items():
            st = self.states[run_id] = run.spool.read_uploader()
            if run_id in self.workers or st.state == "failed":
                continue
            if now < self._backoff.get(run_id, Backoff()).not_before:
                continue
            pending = run.received > st.uploaded or (run.closed and st.state != "finished")
            if pending:
                self._spawn(run_id, run)

    def _spawn(self, run_id: str, run: RunState) -> None:
        cmd = [
            sys.executable, "-m", "sidecar.uploader",
            "--run-dir", str(run.spool.dir),
            "--init-timeout", str(self.cfg.init_timeout),
            "--finish-timeout", str(self.cfg.finish_timeout),
            "--log-level", self.cfg.log_level,
        ]  # fmt: skip
        # wandb's own settings (WANDB_MODE, WANDB_DIR, WANDB_API_KEY, ...) pass through in the environment.
        # The child starts with SIGTERM/SIGINT blocked (the mask survives exec) and unblocks them once
        # its handlers are in: a drain right after a spawn must not kill it before it has read the spool.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _DRAIN_SIGNALS)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.workers[run_id] = Worker(proc, time.monotonic())
        log.info("run %s: uploader started (pid %d)", run_id, proc.pid)

    def _reap(self, now: float) -> None:
        for run_id, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None:
                continue
            del self.workers[run_id]
            b = self._backoff.setdefault(run_id, Backoff())
            if code == 0:
                b.failures = 0
                log.debug("run %s: uploader exited", run_id)
                continue
            b.failures += 1
            delay = min(BACKOFF_MAX, 2.0 ** (b.failures - 1))
            b.not_before = now + delay
            log.warning("run %s: uploader exited with code %d; restarting in %.0fs", run_id, code, delay)

    def drain(self, timeout: float) -> None:
        """SIGTERM every uploader, wait up to ``timeout``, SIGKILL the rest."""
        for w in self.workers.values():
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self._reap(time.monotonic())
            time.sleep(0.05)
        for run_id, w in self.workers.items():
            log.error("run %s: uploader did not drain within %.0fs; killing it (frames stay in the spool)", run_id, timeout)
            w.proc.kill()
            w.proc.wait()
        self.workers.clear()
