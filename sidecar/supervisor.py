"""The supervisor: one uploader process per run, started on demand and watched.

Like an arbiter of worker processes: it spawns an uploader when a run has
frames that wandb has not kept yet, reaps it when it exits, restarts it with
exponential backoff when it crashed or hit a transient failure, kills it when
its heartbeat stops (wandb-core can block ``run.log`` forever), and on drain
sends SIGTERM, waits up to the drain deadline, then kills what is left.
A run whose uploader entered the failure sentinel ("failed") is left alone.

Each uploader leads its own process group, so a kill takes its wandb-core
with it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

from .config import ServeConfig, UploaderConfig
from .exits import EXIT_LOCKED, EXIT_RETRY
from .proc import children
from .runstate import RunState
from .spool import Heartbeat, UploaderState


def uploader_argv(cfg: UploaderConfig) -> list[str]:
    """The command line of an uploader process: its whole configuration in one argument."""
    return [sys.executable, "-m", "sidecar.uploader", "--config", cfg.to_json()]


log = logging.getLogger("kforge_sidecar.supervisor")


@dataclass
class Worker:
    proc: subprocess.Popen
    started: float  # wall time


@dataclass
class Backoff:
    failures: int = 0
    not_before: float = 0.0  # monotonic


class Supervisor:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.workers: dict[str, Worker] = {}
        self.states: dict[str, UploaderState] = {}  # the last uploader.json seen per run
        self.backoff: dict[str, Backoff] = {}
        self.restarts: dict[str, int] = {}
        # uploader exits other than a clean one, by reason: "retry" (wandb failed transiently),
        # "wedged" (killed: no heartbeat), "crash" (any other exit); for the health metrics
        self.failures: Counter[str] = Counter()
        self._wedged: set[str] = set()

    def tick(self, runs: dict[str, RunState], spawn: bool = True) -> None:
        now = time.monotonic()
        self._reap(now)
        for run_id, run in runs.items():
            st = self.states[run_id] = run.spool.read_uploader()
            w = self.workers.get(run_id)
            if w is not None:
                self._check_heartbeat(run_id, w, run.spool.read_heartbeat())
                continue
            if spawn and run.needs_upload(st) and now >= self.backoff.get(run_id, Backoff()).not_before:
                if len(self.workers) >= self.cfg.receiver.max_runs:
                    continue  # at the cap of uploader processes: this run waits for a free one
                if run.spool.uploader_running():
                    continue  # an uploader not ours (a killed sidecar's, still draining): its exit frees the run
                self._spawn(run_id, run)

    def retry_in(self, run_id: str) -> float | None:
        b = self.backoff.get(run_id)
        if b is None or run_id in self.workers:
            return None
        left = b.not_before - time.monotonic()
        return round(left, 1) if left > 0 else None

    def _spawn(self, run_id: str, run: RunState) -> None:
        cmd = uploader_argv(UploaderConfig.for_run(self.cfg, run.spool.dir))
        # wandb's own settings (WANDB_MODE, WANDB_DIR, WANDB_API_KEY, ...) pass through in the environment.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            start_new_session=True,
            # SIGTERM waits (blocked, pending) until the uploader has its handler:
            # a drain right after a spawn must not kill it outright.
            preexec_fn=_block_sigterm,
        )
        self.workers[run_id] = Worker(proc, time.time())
        log.info("run %s: uploader started (pid %d)", run_id, proc.pid)

    def _check_heartbeat(self, run_id: str, w: Worker, hb: Heartbeat) -> None:
        now = time.time()
        last = max(hb.at if hb.pid == w.proc.pid else 0.0, w.started)
        allowed = max(last + self.cfg.upload.heartbeat_timeout, hb.busy_until or 0.0)
        if now > allowed and w.proc.poll() is None:
            log.error(
                "run %s: uploader pid %d is wedged (no heartbeat for %.0fs); killing it and restarting from the cursor",
                run_id, w.proc.pid, now - last,
            )  # fmt: skip
            self._wedged.add(run_id)
            _kill_group(w.proc)

    def forget(self, run_id: str) -> None:
        """Drop what is kept about a run that left the spool (it has no uploader)."""
        for d in (self.states, self.backoff, self.restarts):
            d.pop(run_id, None)
        self._wedged.discard(run_id)

    def _reap(self, now: float) -> None:
        for run_id, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None:
                continue
            del self.workers[run_id]
            b = self.backoff.setdefault(run_id, Backoff())
            _kill_group(w.proc)  # its wandb-core, if it outlived it
            if code == 0:
                b.failures = 0
                log.debug("run %s: uploader exited", run_id)
                continue
            if code == EXIT_LOCKED:
                # It lost a race (tick looks at the lock before a spawn) with an uploader not
                # ours: nothing failed, so no backoff and no failure counted; tick waits for
                # that one's exit, then starts ours.
                log.info("run %s: another uploader holds the run; ours starts when it exits", run_id)
                continue
            b.failures += 1
            wedged = run_id in self._wedged
            self._wedged.discard(run_id)
            self.failures["retry" if code == EXIT_RETRY else "wedged" if wedged else "crash"] += 1
            self.restarts[run_id] = self.restarts.get(run_id, 0) + 1
            delay = min(self.cfg.upload.retry_backoff_max, self.cfg.upload.retry_backoff * 2 ** (b.failures - 1))
            b.not_before = now + delay
            why = "will retry" if code == EXIT_RETRY else f"exited with code {code}"
            log.warning("run %s: uploader %s; next attempt in %.1fs", run_id, why, delay)

    def drain(self, timeout: float, runs: dict[str, RunState]) -> None:
        """SIGTERM every uploader, wait up to ``timeout``, kill the rest. Says which runs
        have frames wandb has not kept and no uploader of ours to hand them over."""
        for run_id, run in runs.items():
            st = self.states.get(run_id)
            if run_id not in self.workers and st is not None and run.needs_upload(st):
                log.warning(
                    "run %s: %d frames are not in wandb yet and stay in the spool (%s); the next `serve` on this "
                    "spool, or `kforge-sidecar sync`, uploads them", run_id, max(run.received - st.trusted, 0),
                    "another uploader holds the run" if run.spool.uploader_running() else "its uploader is waiting to retry",
                )  # fmt: skip
        for w in self.workers.values():
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self._reap(time.monotonic())
            time.sleep(0.05)
        for run_id, w in self.workers.items():
            log.error(
                "run %s: uploader did not drain within %.0fs; killing it (frames stay in the spool)", run_id, timeout
            )
            _kill_group(w.proc)
            w.proc.wait()
        self.workers.clear()


def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill an uploader with its process group and its children: wandb-core runs in a
    session of its own, and a hung one would outlive its parent."""
    for pid in children(proc.pid):
        _kill(pid, os.kill)
    _kill(proc.pid, os.killpg)


def _kill(pid: int, how) -> None:
    try:
        how(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL, but let it see it at once
        how(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
