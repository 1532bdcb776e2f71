"""The uploader: one process per run, the only code that imports wandb.

Started and watched by the sidecar's supervisor as
``python -m sidecar.uploader --run-dir <spool>/runs/<run_id>``. It reads the
run's frames.log from its cursor, calls ``wandb.init`` lazily on the first
metrics frame, logs every frame, and advances the cursor in uploader.json.
A close frame finishes the run. wandb can wedge this process; that is why it
is a process: the sidecar kills it and the other runs never notice.

Exit codes: 0 done (finished, failed for good, or drained), 1 wandb broke
mid-run (the supervisor restarts it), 3 another uploader holds the run.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import protocol
from client.protocol import Close, Hello, Metrics

from .spool import TRUSTED_LIMITS, RunSpool

log = logging.getLogger("kforge_sidecar.uploader")

EXIT_DONE = 0
EXIT_CRASHED = 1
EXIT_LOCKED = 3


@dataclass(frozen=True)
class UploaderConfig:
    run_dir: Path
    init_timeout: float = 60.0
    finish_timeout: float = 60.0
    poll_interval: float = 0.05
    state_interval: float = 0.5  # how often the cursor is written while busy


class Uploader:
    def __init__(self, cfg: UploaderConfig):
        self.cfg = cfg
        self.spool = RunSpool(cfg.run_dir)
        self.state = self.spool.read_uploader()
        self.run: Any = None  # the wandb run, once initialised
        self.draining = False
        self._parent = os.getppid()
        self._last_state_write = 0.0

    def stop(self, *_: Any) -> None:
        self.draining = True

    # ---------------------------------------------------------------- main loop

    def serve(self) -> int:
        meta = self.spool.read_meta()
        if meta is None:
            log.error("run %s: no meta.json in %s", self.spool.run_id, self.spool.dir)
            return EXIT_DONE
        if self.state.state == "failed":
            log.info("run %s: failed earlier (%s); not retrying", meta.run_id, self.state.error)
            return EXIT_DONE
        self.state.pid = os.getpid()
        if self.state.state == "finished":
            self.state.state = "waiting"  # re-opened by a resumed session
        self._save(force=True)
        while True:
            draining = self.draining or os.getppid() != self._parent
            for rec in self.spool.log.records(self.state.offset):
                msg = protocol.decode_request(rec.payload, TRUSTED_LIMITS)
                if isinstance(msg, Metrics):
                    if self.run is None and not self._init(meta):
                        return EXIT_DONE
                    self.run.log(msg.values, step=msg.step)
                    self.state.uploaded += 1
                    self.state.last_step = msg.step
                elif isinstance(msg, Close):
                    self.state.offset = rec.end
                    self._finish(msg.exit_code)
                    return EXIT_DONE
                elif isinstance(msg, Hello):
                    pass
                self.state.offset = rec.end
                self._save()
            self._save(force=True)
            if draining:
                # The job is ending or the sidecar is gone: hand wandb what we
                # have and stop. Frames that arrive later stay in the spool.
                if self.run is not None:
                    self._finish(None)
                return EXIT_DONE
            time.sleep(self.cfg.poll_interval)

    # ---------------------------------------------------------------- wandb

    def _init(self, meta: Any) -> bool:
        """Lazy wandb.init. On failure: the failure sentinel (no more tries) and False."""
        self.state.state = "initializing"
        self._save(force=True)
        try:
            import wandb
        except ImportError as exc:
            return self._sentinel(f"wandb not installed: {exc}")
        settings = wandb.Settings(
            init_timeout=self.cfg.init_timeout,
            finish_timeout=self.cfg.finish_timeout,
            finish_timeout_raises=True,
            console="off",  # the uploader's own output is not the trainer's
            x_disable_stats=True,  # this process's CPU and memory are not the job's
            silent=True,
        )
        t0 = time.monotonic()
        try:
            self.run = wandb.init(
                project=meta.project or None,
                name=meta.name,
                id=meta.run_id,
                resume="allow",
                config=meta.config,
                settings=settings,
            )
        except Exception as exc:  # wandb.errors.Error and whatever its backend raises
            return self._sentinel(f"WandB init failed: {type(exc).__name__}: {exc}")
        self.state.state = "live"
        self.state.error = None
        self.state.wandb_dir = str(Path(self.run.dir).parent)
        self._save(force=True)
        log.info("run %s: wandb.init done in %.2fs (%s)", meta.run_id, time.monotonic() - t0, self.state.wandb_dir)
        return True

    def _sentinel(self, reason: str) -> bool:
        reason = " ".join(reason.split())[:500]
        log.error("run %s: %s; frames stay in the spool", self.spool.run_id, reason)
        self.state.state = "failed"
        self.state.error = reason
        self._save(force=True)
        return False

    def _finish(self, exit_code: int | None) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code if exit_code is not None else 0)
            except Exception as exc:
                self.state.error = f"wandb finish failed: {type(exc).__name__}: {exc}"
                log.error("run %s: %s", self.spool.run_id, self.state.error)
            self.run = None
        if exit_code is not None:
            self.state.state = "finished"
            log.info("run %s: finished (exit code %d, %d frames uploaded)", self.spool.run_id, exit_code, self.state.uploaded)
        else:
            self.state.state = "waiting"
        self._save(force=True)

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_state_write >= self.cfg.state_interval:
            self.spool.write_uploader(self.state)
            self._last_state_write = now


def _lock(run_dir: Path) -> int | None:
    """One uploader per run, even across a sidecar restart that left an old one behind."""
    fd = os.open(run_dir / "uploader.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sidecar.uploader")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--init-timeout", type=float, default=60.0)
    p.add_argument("--finish-timeout", type=float, default=60.0)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(),
        format=f"%(asctime)s %(levelname)s uploader[{a.run_dir.name}] %(message)s",
        stream=sys.stderr,
    )
    if _lock(a.run_dir) is None:
        log.error("run %s: another uploader is running for this run", a.run_dir.name)
        return EXIT_LOCKED
    up = Uploader(UploaderConfig(run_dir=a.run_dir, init_timeout=a.init_timeout, finish_timeout=a.finish_timeout))
    signal.signal(signal.SIGTERM, up.stop)
    signal.signal(signal.SIGINT, up.stop)
    # the supervisor starts us with these blocked, so a drain that came early is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return up.serve()
    except Exception:
        log.exception("run %s: uploader crashed; the sidecar will restart it from the cursor", a.run_dir.name)
        return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
