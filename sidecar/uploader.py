"""The uploader: one process per run, the only code that imports wandb.

Started and watched by the sidecar's supervisor as
``python -m sidecar.uploader --run-dir <spool>/runs/<run_id>`` (and run
in-process by ``kforge-sidecar sync``). It reads the run's frames.log from
its cursor, calls ``wandb.init`` lazily on the first metrics frame, logs every
frame, and advances the cursor in uploader.json. A close frame finishes the
run. wandb can wedge this process; that is why it is a process: the sidecar
kills it when its heartbeat stops, and the other runs never notice.

The cursor only moves past what wandb has really kept:
- offline, a frame counts once its step is in wandb-core's own transaction
  log (run-<id>.wandb, flushed every ``x_transaction_log_flush_interval``
  seconds, which we set low): the uploader reads that file back;
- online, a frame counts once ``finish`` returned: a restart replays the rest,
  and wandb itself drops the steps the server already has on resume.
A hard kill therefore never loses frames, and replays at most a few seconds.

Exit codes: 0 done (finished, failed for good, or drained); 75 a transient
failure (backend unreachable, 5xx, finish timed out): the supervisor starts a
fresh process after a backoff, since wandb cannot re-init the same run ID in
one process; 1 crashed (also restarted); 3 another uploader holds the run.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import re
import signal
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from client import protocol
from client.protocol import Close, Metrics

from .spool import TRUSTED_LIMITS, RunMeta, RunSpool

log = logging.getLogger("kforge_sidecar.uploader")

EXIT_DONE = 0
EXIT_CRASHED = 1
EXIT_LOCKED = 3
EXIT_RETRY = 75  # EX_TEMPFAIL

# Failures that no retry can fix: the sentinel, not a retry loop.
_PERMANENT = re.compile(
    r"\b(401|403)\b|not logged in|api[ _-]?key|unauthori[sz]ed|forbidden|permission denied|not installed",
    re.IGNORECASE,
)


class Transient(Exception):
    """A failure a later attempt in a fresh process may not meet."""


@dataclass(frozen=True)
class UploaderConfig:
    run_dir: Path
    init_timeout: float = 60.0
    finish_timeout: float = 60.0
    flush_interval: float = 1.0  # wandb-core's transaction log flush (its default is 15 s)
    poll_interval: float = 0.05
    heartbeat: float = 0.5  # how often uploader.json is rewritten, busy or idle
    drain_timeout: float = 30.0
    sync: bool = False  # kforge-sidecar sync: retry a failed run, stop at the end of the log


class Uploader:
    def __init__(self, cfg: UploaderConfig, progress: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.spool = RunSpool(cfg.run_dir)
        self.state = self.spool.read_uploader()
        self.run: Any = None  # the wandb run, once initialised
        self.offline = True
        self.draining = False
        self._progress = progress
        self._parent = os.getppid()
        self._last_save = 0.0
        # (monotonic time, offset, frames, step) of each frame handed to wandb, not yet trusted
        self._handed: deque[tuple[float, int, int, int]] = deque()
        self._handed_offset = self.state.offset
        self._drain_deadline: float | None = None
        self._txlog: TransactionLog | None = None
        # the highest step handed to the wandb run (after a restart: the highest kept);
        # a frame below it means a resume from a checkpoint
        self._max_step: int | None = self.state.trusted_step
        self._rewind_to: int | None = None

    def stop(self, *_: Any) -> None:
        """SIGTERM: hand wandb what is spooled within half the drain time, then finish."""
        self.draining = True
        self._drain_deadline = time.monotonic() + self.cfg.drain_timeout / 2
        # The backstop for an orphan whose wandb is stuck (in init, or a wedged
        # run.log) with no supervisor left to kill it: SIGALRM's default action
        # ends the process however blocked it is, and frees the run's lock.
        signal.alarm(int(self.cfg.drain_timeout) + 5)

    # ---------------------------------------------------------------- main loop

    def serve(self) -> int:
        meta = self.spool.read_meta()
        if meta is None:
            log.error("run %s: no meta.json in %s", self.spool.run_id, self.spool.dir)
            return EXIT_DONE
        if self.state.state == "failed" and not self.cfg.sync:
            log.info("run %s: failed earlier (%s); not retrying", meta.run_id, self.state.error)
            return EXIT_DONE
        self.state.pid = os.getpid()
        self.state.uploaded = self.state.trusted
        if self.state.state in ("finished", "failed", "retrying"):
            self.state.state = "waiting"  # re-opened by a resumed session, or retried
        self._save(force=True)
        try:
            while True:
                draining = self.draining or self.cfg.sync or os.getppid() != self._parent
                for rec in self.spool.log.records(self._handed_offset):
                    msg = protocol.decode_request(rec.payload, TRUSTED_LIMITS)
                    if isinstance(msg, Metrics):
                        if self._max_step is not None and msg.step < self._max_step:
                            # A trainer resumed from an earlier checkpoint: wandb would drop
                            # these steps. Rewind the run to just before them instead.
                            if self.run is not None:
                                log.info(
                                    "run %s: step %d after step %d: a resume from a checkpoint; "
                                    "closing this segment and rewinding the run", meta.run_id, msg.step, self._max_step,
                                )  # fmt: skip
                                self._finish(None)
                                return EXIT_DONE  # a fresh uploader inits with the rewind
                            self._rewind_to = msg.step - 1
                        if self.run is None and not self._init(meta):
                            return EXIT_DONE
                        if msg.values:
                            self.run.log(msg.values, step=msg.step)
                        self._max_step = msg.step if self._max_step is None else max(self._max_step, msg.step)
                        self.state.uploaded += 1
                        self.state.last_step = msg.step
                        self._handed.append((time.monotonic(), rec.end, self.state.uploaded, msg.step))
                        if self._progress:
                            self._progress(1)
                    elif isinstance(msg, Close):
                        self._handed_offset = rec.end
                        self._finish(msg.exit_code)
                        return EXIT_DONE
                    self._handed_offset = rec.end
                    self._save()
                    if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                        log.warning("run %s: drain time is up; the rest stays in the spool", self.spool.run_id)
                        break  # keep the rest of the deadline for finish()
                self._save()
                if draining or self.draining:
                    # The job is ending, the sidecar is gone, or sync reached the
                    # end: hand wandb what we have and stop. Frames that arrive
                    # later stay in the spool for the next uploader.
                    if self.run is not None:
                        self._finish(None)
                    else:
                        self._trust_all()
                        self._save(force=True)
                    return EXIT_DONE
                time.sleep(self.cfg.poll_interval)
        except Transient as exc:
            self.state.state = "retrying"
            self.state.error = str(exc)
            self._save(force=True)
            log.warning("run %s: %s; a fresh uploader will retry", self.spool.run_id, exc)
            return EXIT_RETRY

    # ---------------------------------------------------------------- wandb

    def _init(self, meta: RunMeta) -> bool:
        """Lazy wandb.init. A permanent failure enters the sentinel and returns False;
        a transient one raises Transient."""
        self.state.state = "initializing"
        self.state.busy_until = time.time() + self.cfg.init_timeout + 30
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
        if "x_transaction_log_flush_interval" in type(settings).model_fields:  # wandb >= 0.31; before, 15 s
            settings.x_transaction_log_flush_interval = self.cfg.flush_interval
        opts = dict(meta.wandb_init)
        if "base_url" in opts:
            settings.base_url = opts.pop("base_url")
        if self._rewind_to is not None:
            # resume_from rewinds the run's history to that step and continues it; offline
            # the rewind is recorded as the run's branch point and applied at `wandb sync`
            opts["resume_from"] = f"{meta.run_id}?_step={self._rewind_to}"
            log.info("run %s: rewinding to step %d", meta.run_id, self._rewind_to)
        else:
            opts["id"] = meta.run_id
            opts["resume"] = "allow"  # a deleted run comes back as a fresh one under this ID
        t0 = time.monotonic()
        try:
            self.run = wandb.init(
                project=meta.project or None, name=meta.name, config=meta.config, settings=settings, **opts
            )
        except Exception as exc:  # wandb.errors.Error and whatever its backend raises
            reason = f"WandB init failed: {type(exc).__name__}: {exc}"
            if _permanent(exc):
                return self._sentinel(reason)
            raise Transient(" ".join(reason.split())[:500]) from None
        finally:
            self.state.busy_until = None
        self.offline = bool(getattr(self.run.settings, "_offline", False))
        self._txlog = TransactionLog(Path(self.run.dir).parent / f"run-{self.run.id}.wandb")
        if self._rewind_to is not None:
            self._max_step, self._rewind_to = self._rewind_to, None
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
        """finish() bounded by finish_timeout; on success everything handed is kept."""
        if self.run is not None:
            self.state.busy_until = time.time() + self.cfg.finish_timeout + 30
            self._save(force=True)
            try:
                self.run.finish(exit_code=exit_code if exit_code is not None else 0)
            except Exception as exc:
                # A stalled backend: what wandb did not confirm is replayed by a
                # fresh uploader later (wandb drops steps the server already has).
                raise Transient(f"wandb finish failed: {type(exc).__name__}: {exc}") from None
            finally:
                self.state.busy_until = None
            self.run = None
            self._txlog = None
        self._trust_all()
        if exit_code is not None:
            self.state.state = "finished"
            log.info("run %s: finished (exit code %d, %d frames uploaded)", self.spool.run_id, exit_code, self.state.uploaded)
        else:
            self.state.state = "waiting"
        self._save(force=True)

    # ---------------------------------------------------------------- cursor

    def _trust_all(self) -> None:
        self._handed.clear()
        self.state.offset = self._handed_offset
        self.state.trusted = self.state.uploaded
        self.state.trusted_step = self._max_step

    def _trust_flushed(self) -> None:
        """Offline: move the cursor over the frames whose step wandb-core has written.

        A history row for step S is written once a later step arrived, so every
        frame up to step S is in it. Time alone proves nothing: a hung
        wandb-core writes nothing however long we wait.
        """
        if self._txlog is not None:
            written = self._txlog.last_step()
            while self._handed and written is not None and self._handed[0][3] <= written:
                _, self.state.offset, self.state.trusted, self.state.trusted_step = self._handed.popleft()
        if not self._handed and self.run is None:
            self.state.offset = self._handed_offset  # only records with nothing for wandb

    def _save(self, force: bool = False) -> None:
        """Rewrite uploader.json: the cursor, and the heartbeat the supervisor watches."""
        now = time.monotonic()
        if not force and now - self._last_save < self.cfg.heartbeat:
            return
        if self.offline or self.run is None:
            self._trust_flushed()
        self.spool.write_uploader(self.state)
        self._last_save = now


class TransactionLog:
    """Reads back wandb-core's run-<id>.wandb, incrementally: the highest history step in it.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1,
    version 0), then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, u16 length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) around a
    protobuf ``Record``; a block's tail shorter than a header is padding.
    Reading stops at an incomplete chunk, the part wandb-core has not flushed.
    """

    BLOCK = 32 * 1024
    HEAD = struct.Struct("<IHB")

    def __init__(self, path: Path):
        self.path = path
        self._pos = 7  # after the file header
        self._step: int | None = None

    def last_step(self) -> int | None:
        from wandb.proto import wandb_internal_pb2 as pb

        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return self._step
        with f:
            f.seek(self._pos)
            pos, parts = self._pos, []
            while True:
                left = self.BLOCK - pos % self.BLOCK
                if left < self.HEAD.size:
                    f.seek(left, os.SEEK_CUR)
                    pos += left
                    continue
                head = f.read(self.HEAD.size)
                if len(head) < self.HEAD.size:
                    break
                _, length, kind = self.HEAD.unpack(head)
                data = f.read(length)
                if len(data) < length or kind == 0:
                    break  # not flushed yet (or zero fill)
                pos += self.HEAD.size + length
                parts.append(data)
                if kind in (1, 4):  # FULL or LAST: a whole record
                    rec = pb.Record.FromString(b"".join(parts))
                    parts = []
                    self._pos = pos
                    if rec.HasField("history"):
                        self._step = rec.history.step.num
        return self._step


def _permanent(exc: BaseException) -> bool:
    try:
        from wandb.errors import AuthenticationError, UsageError

        if isinstance(exc, (AuthenticationError, UsageError)):
            return True
    except ImportError:
        pass
    return bool(_PERMANENT.search(str(exc)))


def _lock(run_dir: Path) -> int | None:
    """One uploader per run, even across a sidecar restart that left an old one behind."""
    fd = os.open(run_dir / "uploader.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the sidecar dies, so an orphan drains and leaves at once."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the getppid() check in the loop still notices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sidecar.uploader")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--init-timeout", type=float, default=60.0)
    p.add_argument("--finish-timeout", type=float, default=60.0)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--sync", action="store_true", help="kforge-sidecar sync: retry, upload to the end, finish")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(),
        format=f"%(asctime)s %(levelname)s uploader[{a.run_dir.name}] %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    if _lock(a.run_dir) is None:
        log.error("run %s: another uploader is running for this run", a.run_dir.name)
        return EXIT_LOCKED
    cfg = UploaderConfig(
        run_dir=a.run_dir,
        init_timeout=a.init_timeout,
        finish_timeout=a.finish_timeout,
        flush_interval=a.flush_interval,
        drain_timeout=a.drain_timeout,
        sync=a.sync,
    )
    up = Uploader(cfg)
    signal.signal(signal.SIGTERM, up.stop)
    signal.signal(signal.SIGINT, up.stop)
    # the supervisor starts us with these blocked; a pending one is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return up.serve()
    except Exception:
        log.exception("run %s: uploader crashed; the sidecar will restart it from the cursor", a.run_dir.name)
        return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
