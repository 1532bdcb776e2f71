"""The uploader: one process per run, the only code that imports wandb.

Started and watched by the sidecar's supervisor as
``python -m sidecar.uploader --config JSON`` (config.UploaderConfig, whole;
``kforge-sidecar sync`` starts it the same way, with ``sync`` set). It reads the run's frames.log from
its cursor, calls ``wandb.init`` lazily on the first metrics frame, logs every
frame, and advances the cursor in uploader.json. A close frame finishes the
run. wandb can wedge this process; that is why it is a process: the sidecar
kills it when its heartbeat stops, and the other runs never notice.

Steps follow wandb's own rule (``steps.StepClock``): a row below the run's
current step within one trainer session is late (wandb would drop it): it
is counted, never handed, and never rewinds anything. Only a resumed
session's first row may go back; then the run is rewound to just before it
(``resume_from``), and on a backend without rewind the resumed rows are
appended after the run's last step instead, each with its own step as
``trainer/step`` (README, "Resume").

The cursor only moves past what wandb has really kept:
- offline, a frame counts once its step is in wandb-core's own transaction
  log (run-<id>.wandb, flushed every ``x_transaction_log_flush_interval``
  seconds, which we set low): the uploader reads that file back;
- online, a frame counts once ``finish`` returned: a restart replays the rest,
  and wandb itself drops the steps the server already has on resume.
A hard kill therefore never loses frames, and replays at most a few seconds.

Exit codes (exits.py): EXIT_DONE (finished, failed for good, or drained);
EXIT_RETRY a transient failure (backend unreachable, 5xx, finish timed out):
the supervisor starts a fresh process after a backoff, since wandb cannot
re-init the same run ID in one process; EXIT_CRASHED (also restarted);
EXIT_LOCKED another uploader holds the run.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from client.protocol import Close, ConfigUpdate, Hello, Metrics, SummaryUpdate

from .config import UploaderConfig
from .exits import EXIT_CRASHED, EXIT_DONE, EXIT_LOCKED, EXIT_RETRY
from .record import decode_record
from .spool import RunMeta, RunSpool, UploadState
from .steps import StepClock

log = logging.getLogger("kforge_sidecar.uploader")


# Failures that no retry can fix: the sentinel, not a retry loop.
_PERMANENT = re.compile(
    r"\b(401|403)\b|not logged in|api[ _-]?key|unauthori[sz]ed|forbidden|permission denied|not installed",
    re.IGNORECASE,
)
# A backend that does not offer rewind (self-managed servers; a preview on W&B cloud)
# refuses resume_from: the resume is appended instead (README, "Resume").
_NO_REWIND = re.compile(r"rewind|resume_?from", re.IGNORECASE)
TRAINER_STEP = "trainer/step"  # the trainer's own step, on rows appended after a refused rewind


class Transient(Exception):
    """A failure a later attempt in a fresh process may not meet."""


class _RewindRefused(Exception):
    """This backend refused a rewind before (``UploaderState.rewind_refused``)."""


class Uploader:
    def __init__(self, cfg: UploaderConfig):
        self.cfg = cfg
        self.spool = RunSpool(cfg.run_dir)
        self.state = self.spool.read_uploader()
        self.run: Any = None  # the wandb run, once initialised
        self.offline = True
        self.draining = False
        self._parent = os.getppid()
        self._last_save = 0.0
        # (monotonic time, offset, frames, wandb step, clock snapshot) of each frame handed to wandb, not yet trusted
        self._handed: deque[tuple[float, int, int, int, tuple]] = deque()
        self._handed_offset = self.state.offset
        self._drain_deadline: float | None = None
        self._txlog: TransactionLog | None = None
        # wandb's step rule at the cursor; a resumed session's first row may rewind the run
        self._clock = StepClock.from_dict(self.state.clock)
        self._offset_clock = self._clock.snapshot()  # the clock as of _handed_offset
        self._rewind_to: int | None = None
        self._late = 0
        self._trainer: Hello | None = None  # the latest trainer session seen (its pid and program)

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
        if self.state.state == UploadState.FAILED and not self.cfg.sync:
            log.info("run %s: failed earlier (%s); not retrying", meta.run_id, self.state.error)
            return EXIT_DONE
        self.state.pid = os.getpid()
        self.state.uploaded = self.state.trusted
        if self.state.state in (UploadState.FINISHED, UploadState.FAILED, UploadState.RETRYING):
            self.state.state = UploadState.WAITING  # re-opened by a resumed session, or retried
        self._save(force=True)
        try:
            while True:
                draining = self.draining or self.cfg.sync or os.getppid() != self._parent
                for rec in self.spool.log.records(self._handed_offset):
                    if not self._record(meta, rec.payload, rec.end):
                        return EXIT_DONE
                    self._handed_offset = rec.end
                    self._offset_clock = self._clock.snapshot()
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
            self.state.state = UploadState.RETRYING
            self.state.error = str(exc)
            self._save(force=True)
            log.warning("run %s: %s; a fresh uploader will retry", self.spool.run_id, exc)
            return EXIT_RETRY

    def _record(self, meta: RunMeta, payload: bytes, end: int) -> bool:
        """Hand one spool record to wandb. False when this uploader is done (run finished,
        the sentinel, or a segment closed for a rewind)."""
        msg = decode_record(payload)
        if isinstance(msg, Hello):
            self._clock.hello(msg.session)
            self._trainer = msg
            if msg.config:  # a resumed trainer's config: the run's config follows it
                self._update_config(msg.config)
        elif isinstance(msg, Metrics):
            before = self._clock.top
            step, how = self._clock.place(msg.session, msg.step, msg.commit)
            if how == "late":
                self._count_late(step)
            else:
                if how == "rewind":
                    if self.run is not None:
                        log.info(
                            "run %s: a resumed trainer starts at step %d, below step %d: closing this segment "
                            "(its trainer crashed: exit code 1) and rewinding the run", meta.run_id, step, before,
                        )  # fmt: skip
                        self._finish(1, final=False)  # the next uploader places this frame again, with the rewind
                        return False
                    self._rewind_to = max(step - 1, 0)
                if self.run is None and not self._init(meta):
                    return False
                offset = self.state.step_offset
                if msg.values or offset:
                    values = dict(msg.values, **{TRAINER_STEP: step}) if offset else msg.values
                    self.run.log(values, step=step + offset)
                step += offset
            self.state.uploaded += 1
            self.state.last_step = step
            self._handed.append((time.monotonic(), end, self.state.uploaded, step, self._clock.snapshot()))
        elif isinstance(msg, (ConfigUpdate, SummaryUpdate)):
            if self.run is None and not self._init(meta):
                return False
            if isinstance(msg, ConfigUpdate):
                self._update_config(msg.values)
            else:
                self.run.summary.update(msg.values)
        elif isinstance(msg, Close):
            self._handed_offset = end
            self._offset_clock = self._clock.snapshot()
            self._finish(msg.exit_code)
            return False
        return True  # Refused: nothing for wandb

    def _update_config(self, values: dict) -> None:
        """Config that came after the first hello: kept in uploader.json, so that every later
        wandb segment of the run (a rewind, a restart, sync) starts with it too."""
        self.state.config.update(values)
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def _count_late(self, step: int) -> None:
        self._late += 1
        if self._late == 1 or self._late % 1000 == 0:
            log.warning(
                "run %s: step %d is below the run's current step %d in the same session; wandb cannot chart it, "
                "so it stays in the spool only (%d such rows; `status` counts them as late)",
                self.spool.run_id, step, self._clock.cur, self._late,
            )  # fmt: skip

    # ---------------------------------------------------------------- wandb

    def _settings(self, wandb: Any, meta: RunMeta) -> Any:
        """wandb settings: our timeouts, and the trainer's description, so the run shows the
        trainer's program, args, git and host, and samples the trainer's process."""
        trainer = self._trainer
        process = (trainer.process if trainer else None) or meta.process or {}
        pid = trainer.pid if trainer else meta.pid
        host = (trainer.host if trainer else None) or meta.host
        opts: dict[str, Any] = dict(
            init_timeout=self.cfg.init_timeout,
            finish_timeout=self.cfg.finish_timeout,
            finish_timeout_raises=True,
            x_transaction_log_flush_interval=self.cfg.flush_interval,
            console="off",  # the uploader's own output is not the trainer's
            silent=True,
            host=host or None,
        )
        program = process.get("program")
        if program:
            opts["program"] = program
            if os.path.isabs(program):
                opts["program_abspath"] = program
            # wandb reads the run's arguments from sys.argv: this process is the trainer's stand-in
            sys.argv = [program, *process.get("args", [])]
        if process.get("executable"):
            opts["x_executable"] = process["executable"]
        if process.get("git_commit"):
            opts["git_commit"] = process["git_commit"]
            opts["git_remote_url"] = process.get("git_remote") or None
        else:
            opts["disable_git"] = True  # the sidecar's own checkout is not the trainer's
        local = bool(pid) and host == socket.gethostname()
        if self.cfg.system_metrics and local:
            opts["x_stats_pid"] = pid  # the trainer's CPU and memory; GPUs are the node's
        else:
            opts["x_disable_stats"] = True  # this process's figures are not the job's
        # Settings this wandb does not have (the transaction-log flush interval came in 0.31;
        # before, it is 15 s: a hard kill replays more, loses nothing) are left out.
        known = type(wandb.Settings()).model_fields if hasattr(wandb.Settings, "model_fields") else opts
        return wandb.Settings(**{k: v for k, v in opts.items() if k in known})

    def _init(self, meta: RunMeta) -> bool:
        """Lazy wandb.init. A permanent failure enters the sentinel and returns False;
        a transient one raises Transient."""
        self.state.state = UploadState.INITIALIZING
        self.state.busy_until = time.time() + self.cfg.init_timeout + 30
        self._save(force=True)
        try:
            import wandb
        except ImportError as exc:
            return self._sentinel(f"wandb not installed: {exc}")
        settings = self._settings(wandb, meta)
        opts = dict(meta.wandb_init)
        base_url = opts.pop("base_url", None)
        if base_url:
            settings.base_url = base_url
        t0 = time.monotonic()
        try:
            try:
                if self._rewind_to is not None and self.state.rewind_refused:
                    raise _RewindRefused("refused before by this backend")
                self.run = self._wandb_init(wandb, meta, settings, opts)
            except Exception as exc:
                if self._rewind_to is None or not (isinstance(exc, _RewindRefused) or _NO_REWIND.search(str(exc))):
                    raise
                # The backend has no rewind: append the resumed rows after the run's last
                # step instead, each carrying its own step as trainer/step.
                log.warning(
                    "run %s: the wandb backend refused the rewind (%s); appending the resumed rows after the "
                    "run's last step, with the trainer's step in %r", meta.run_id, " ".join(str(exc).split())[:200], TRAINER_STEP,
                )  # fmt: skip
                self.state.rewind_refused = True
                first, self._rewind_to = self._rewind_to + 1, None
                if not isinstance(exc, _RewindRefused):
                    wandb.teardown()  # after a failed init, wandb holds the run ID in this process
                settings = self._settings(wandb, meta)  # and the last settings kept resume_from
                if base_url:
                    settings.base_url = base_url
                self.run = self._wandb_init(wandb, meta, settings, opts)
                self.state.step_offset = max(0, int(self.run.starting_step) - first)
                self.run.define_metric(TRAINER_STEP)
                log.info(
                    "run %s: resumed at wandb step %d; trainer step %d and on go to wandb step + %d",
                    meta.run_id, self.run.starting_step, first, self.state.step_offset,
                )  # fmt: skip
        except Exception as exc:  # wandb.errors.Error and whatever its backend raises
            reason = f"WandB init failed: {type(exc).__name__}: {exc}"
            if _permanent(exc):
                return self._sentinel(reason)
            raise Transient(" ".join(reason.split())[:500]) from None
        finally:
            self.state.busy_until = None
        self.offline = bool(getattr(self.run.settings, "_offline", False))
        self._txlog = TransactionLog(Path(self.run.dir).parent / f"run-{self.run.id}.wandb")
        self._rewind_to = None
        self.state.state = UploadState.LIVE
        self.state.error = None
        self.state.wandb_dir = str(Path(self.run.dir).parent)
        self._save(force=True)
        log.info("run %s: wandb.init done in %.2fs (%s)", meta.run_id, time.monotonic() - t0, self.state.wandb_dir)
        return True

    def _wandb_init(self, wandb: Any, meta: RunMeta, settings: Any, opts: dict[str, Any]) -> Any:
        opts = dict(opts)
        if self._rewind_to is not None:
            # resume_from rewinds the run's history to that step and continues it; offline
            # the rewind is recorded as the run's branch point and applied at `wandb sync`
            opts["resume_from"] = f"{meta.run_id}?_step={self._rewind_to + self.state.step_offset}"
            log.info("run %s: rewinding to step %d", meta.run_id, self._rewind_to)
        else:
            opts["id"] = meta.run_id
            opts["resume"] = "allow"  # a deleted run comes back as a fresh one under this ID
        config = {**meta.config, **self.state.config}
        return wandb.init(project=meta.project or None, name=meta.name, config=config, settings=settings, **opts)

    def _sentinel(self, reason: str) -> bool:
        reason = " ".join(reason.split())[:500]
        log.error("run %s: %s; frames stay in the spool", self.spool.run_id, reason)
        self.state.state = UploadState.FAILED
        self.state.error = reason
        self._save(force=True)
        return False

    def _finish(self, exit_code: int | None, final: bool = True) -> None:
        """finish() bounded by finish_timeout; on success everything handed is kept.

        ``exit_code`` None (a drain) finishes the wandb segment with 0; ``final`` False
        closes a segment whose run goes on (a rewind)."""
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
        if exit_code is not None and final:
            self.state.state = UploadState.FINISHED
            log.info("run %s: finished (exit code %d, %d frames uploaded)", self.spool.run_id, exit_code, self.state.uploaded)
        else:
            self.state.state = UploadState.WAITING
        self._save(force=True)

    # ---------------------------------------------------------------- cursor

    def _trust_all(self) -> None:
        self._handed.clear()
        self.state.offset = self._handed_offset
        self.state.trusted = self.state.uploaded
        self.state.clock = StepClock.restore(self._offset_clock).to_dict()

    def _trust_flushed(self) -> None:
        """Offline: move the cursor over the frames whose step wandb-core has written.

        A history row for step S is written once a later step arrived, so every
        frame up to step S is in it. Time alone proves nothing: a hung
        wandb-core writes nothing however long we wait.
        """
        if self._txlog is not None:
            written = self._txlog.last_step()
            trusted = None
            while self._handed and written is not None and self._handed[0][3] <= written:
                _, self.state.offset, self.state.trusted, _, trusted = self._handed.popleft()
            if trusted is not None:
                self.state.clock = StepClock.restore(trusted).to_dict()
        if not self._handed and self.run is None:
            self.state.offset = self._handed_offset  # only records with nothing for wandb
            self.state.clock = StepClock.restore(self._offset_clock).to_dict()

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
    p.add_argument("--config", required=True, help="UploaderConfig as JSON (config.py; the supervisor and sync write it)")
    cfg = UploaderConfig.from_json(p.parse_args(argv).config)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s %(levelname)s uploader[{cfg.run_dir.name}] %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    if _lock(cfg.run_dir) is None:
        log.error("run %s: another uploader is running for this run", cfg.run_dir.name)
        return EXIT_LOCKED
    up = Uploader(cfg)
    signal.signal(signal.SIGTERM, up.stop)
    signal.signal(signal.SIGINT, up.stop)
    # the supervisor starts us with these blocked; a pending one is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return up.serve()
    except Exception:
        log.exception("run %s: uploader crashed; the sidecar will restart it from the cursor", cfg.run_dir.name)
        return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
