"""The uploader's spool consumer: reads a run's frames.log from its cursor, hands each
record to wandb (through a WandbSession), and keeps uploader.json, the run's upload
state and cursor, and uploader.heartbeat.

State changes (spool.UploadState), all made here:

- start: ``finished``, ``failed`` (only under ``sync``) and ``retrying`` go back to
  ``waiting`` (a resumed session re-opened the run, or a retry); ``failed`` without
  ``sync`` stays, and the process exits at once;
- the first frame for wandb: ``initializing``, then ``live`` (``failed`` if wandb.init
  fails for good; a transient failure raises Transient);
- a close: ``finished``; a drain, or a segment closed for a rewind: ``waiting``;
- a transient failure anywhere: ``retrying``, and exit EXIT_RETRY.

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
  seconds, which we set low): the uploader reads that file back (txlog.py);
- online, a frame counts once ``finish`` returned: a restart replays the rest,
  and wandb itself drops the steps the server already has on resume.
A hard kill therefore never loses frames, and replays at most a few seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from client.protocol import Close, ConfigUpdate, Hello, Metrics, ProtocolError, Record, SummaryUpdate

from .config import UploaderConfig
from .exits import EXIT_DONE, EXIT_RETRY
from .record import decode_trusted
from .spool import Heartbeat, RunMeta, RunSpool, UploadState
from .spool import Record as SpoolRecord
from .steps import StepClock
from .wandb_errors import Permanent, Transient
from .wandb_session import TRAINER_STEP, WandbSession

log = logging.getLogger("kforge_sidecar.uploader")

DECODE_AHEAD = 512  # spool records decoded in one go (see Uploader._messages)


class Uploader:
    def __init__(self, cfg: UploaderConfig, session: Callable[[UploaderConfig, RunMeta], Any] = WandbSession):
        self.cfg = cfg
        self.spool = RunSpool(cfg.run_dir)
        self.state = self.spool.read_uploader()
        self._new_session = session
        self.session: Any = None  # a WandbSession (or a stand-in), once meta.json is read
        self.draining = False
        self._stop_at: float | None = None  # when SIGTERM came (monotonic)
        self._parent = cfg.parent_pid if cfg.parent_pid is not None else os.getppid()
        self._last_save = 0.0
        self._heartbeat = Heartbeat(pid=os.getpid())
        self._heartbeat_changed = True  # write its contents, not only its mtime
        # (offset, frames, wandb step, clock snapshot) of each frame handed to wandb, not yet trusted
        self._handed: deque[tuple[int, int, int, tuple]] = deque()
        self._handed_offset = self.state.offset
        # wandb's step rule at the cursor; a resumed session's first row may rewind the run
        self._clock = StepClock.from_dict(self.state.clock)
        self._offset_clock = self._clock.snapshot()  # the clock as of _handed_offset
        self._rewind_to: int | None = None
        self._late = 0
        self._trainer: Hello | None = None  # the latest trainer session seen (its pid and program)

    def stop(self, *_: Any) -> None:
        """The SIGTERM/SIGINT handler: note it; the main loop hands wandb what is spooled
        within half the drain time, then finishes.

        One more thing, which only the handler can do: the backstop for an orphan whose
        wandb is stuck (in init, or a wedged run.log) with no supervisor left to kill it.
        SIGALRM's default action ends the process however blocked it is, and frees the
        run's lock; no main loop would get to arm it."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.draining = True
        signal.alarm(int(self.cfg.drain_timeout) + 5)

    def _drain_time_up(self) -> bool:
        return self._stop_at is not None and time.monotonic() > self._stop_at + self.cfg.drain_timeout / 2

    @property
    def _wandb_open(self) -> bool:
        return self.session is not None and self.session.active

    # ---------------------------------------------------------------- main loop

    def serve(self) -> int:
        meta = self.spool.read_meta()
        if meta is None:
            log.error("run %s: no meta.json in %s", self.spool.run_id, self.spool.dir)
            return EXIT_DONE
        if self.state.state == UploadState.FAILED and not self.cfg.sync:
            log.info("run %s: failed earlier (%s); not retrying", meta.run_id, self.state.error)
            return EXIT_DONE
        self.session = self._new_session(self.cfg, meta)
        self.state.uploaded = self.state.trusted
        if self.state.state in (UploadState.FINISHED, UploadState.FAILED, UploadState.RETRYING):
            self.state.state = UploadState.WAITING  # re-opened by a resumed session, or retried
        self._save(force=True)
        try:
            while True:
                draining = self.draining or self.cfg.sync or os.getppid() != self._parent
                for end, msg in self._messages(self._handed_offset):
                    if not self._record(meta, msg, end):
                        return EXIT_DONE
                    self._handed_offset = end
                    self._offset_clock = self._clock.snapshot()
                    if time.monotonic() - self._last_save >= self.cfg.heartbeat:
                        self._save()
                    if self._stop_at is not None and self._drain_time_up():
                        log.warning("run %s: drain time is up; the rest stays in the spool", self.spool.run_id)
                        break  # keep the rest of the deadline for finish()
                self._save()
                if draining:
                    # The job is ending, the sidecar is gone, or sync reached the
                    # end, and this pass began after that, so it read everything
                    # stored before: hand wandb what we have and stop. Frames that
                    # arrive later stay in the spool for the next uploader. (A drain
                    # that began during the pass gets one more pass first: records
                    # are read ahead of wandb, so the ones stored meanwhile, up to
                    # the trainer's close, may not have been read yet.)
                    if self._wandb_open:
                        self._finish(None)
                    else:
                        self._trust_all()
                        self._save(force=True)
                    return EXIT_DONE
                if not self.draining:
                    time.sleep(self.cfg.poll_interval)
        except Transient as exc:
            self.state.state = UploadState.RETRYING
            self.state.error = str(exc)
            self._save(force=True)
            log.warning("run %s: %s; a fresh uploader will retry", self.spool.run_id, exc)
            return EXIT_RETRY

    def _messages(self, offset: int) -> Iterator[tuple[int, Record]]:
        """The spool's records from ``offset`` on, as (end offset, message), decoded
        ``DECODE_AHEAD`` at a time. Measured: decoding each record between two
        ``run.log`` calls costs wandb's hand-off to its own I/O thread several times
        the decode itself; in blocks, the loop that feeds wandb is as lean as a bare
        one. What is decoded and not handed (the uploader stops) is read again next time."""
        records = self.spool.log.records(offset)
        while block := list(islice(records, DECODE_AHEAD)):
            yield from [(rec.end, self._decode(rec)) for rec in block]

    def _decode(self, rec: SpoolRecord) -> Record | None:
        try:
            return decode_trusted(rec.payload)
        except ProtocolError as exc:  # cannot happen for records the receiver wrote; never a reason to die
            log.error("run %s: unreadable spool record before offset %d skipped: %s", self.spool.run_id, rec.end, exc)
            return None

    def _record(self, meta: RunMeta, msg: Record | None, end: int) -> bool:
        """Hand one spool record to wandb. False when this uploader is done (run finished,
        the sentinel, or a segment closed for a rewind)."""
        if msg is None:  # unreadable: skipped
            return True
        if type(msg) is Metrics:
            before = self._clock.top
            step, how = self._clock.place(msg.session, msg.step, msg.commit)
            if how == "late":
                self._count_late(step)
            else:
                if how == "rewind":
                    if self._wandb_open:
                        log.info(
                            "run %s: a resumed trainer starts at step %d, below step %d: closing this segment "
                            "(its trainer crashed: exit code 1) and rewinding the run", meta.run_id, step, before,
                        )  # fmt: skip
                        self._finish(1, final=False)  # the next uploader places this frame again, with the rewind
                        return False
                    self._rewind_to = max(step - 1, 0)
                if not self._wandb_open and not self._init(meta):
                    return False
                offset = self.state.step_offset
                if msg.values or offset:
                    values = dict(msg.values, **{TRAINER_STEP: step}) if offset else msg.values
                    self.session.log(values, step + offset)
                step += offset
            state = self.state
            state.uploaded += 1
            state.last_step = step
            self._handed.append((end, state.uploaded, step, self._clock.snapshot()))
        elif isinstance(msg, Hello):
            self._clock.hello(msg.session)
            self._trainer = msg
            if msg.config:  # a resumed trainer's config: the run's config follows it
                self._update_config(msg.config)
        elif isinstance(msg, (ConfigUpdate, SummaryUpdate)):
            if not self._wandb_open and not self._init(meta):
                return False
            if isinstance(msg, ConfigUpdate):
                self._update_config(msg.values)
            else:
                self.session.update_summary(msg.values)
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
        if self._wandb_open:
            self.session.update_config(values)

    def _count_late(self, step: int) -> None:
        self._late += 1
        if self._late == 1 or self._late % 1000 == 0:
            log.warning(
                "run %s: step %d is below the run's current step %d in the same session; wandb cannot chart it, "
                "so it stays in the spool only (%d such rows; `status` counts them as late)",
                self.spool.run_id, step, self._clock.cur, self._late,
            )  # fmt: skip

    # ---------------------------------------------------------------- wandb

    def _init(self, meta: RunMeta) -> bool:
        """Lazy wandb.init. A permanent failure enters the sentinel and returns False;
        a transient one raises Transient."""
        self.state.state = UploadState.INITIALIZING
        self._busy(time.time() + self.cfg.init_timeout + 30)
        self._save(force=True)
        t0 = time.monotonic()
        try:
            self.session.start(self.state, self._trainer, self._rewind_to)
        except Permanent as exc:
            return self._sentinel(str(exc))
        finally:
            self._busy(None)
        self._rewind_to = None
        self.state.state = UploadState.LIVE
        self.state.error = None
        self.state.wandb_dir = self.session.wandb_dir
        self._save(force=True)
        log.info("run %s: wandb.init done in %.2fs (%s)", meta.run_id, time.monotonic() - t0, self.state.wandb_dir)
        return True

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
        if self._wandb_open:
            self._busy(time.time() + self.cfg.finish_timeout + 30)
            self._save(force=True)
            try:
                self.session.finish(exit_code if exit_code is not None else 0)
            finally:
                self._busy(None)
        self._trust_all()
        if exit_code is not None and final:
            self.state.state = UploadState.FINISHED
            log.info(
                "run %s: finished (exit code %d, %d frames uploaded)", self.spool.run_id, exit_code, self.state.uploaded
            )
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
        if self.session is not None and self.session.txlog is not None:
            written = self.session.written_step()
            trusted = None
            while self._handed and written is not None and self._handed[0][2] <= written:
                self.state.offset, self.state.trusted, _, trusted = self._handed.popleft()
            if trusted is not None:
                self.state.clock = StepClock.restore(trusted).to_dict()
        if not self._handed and not self._wandb_open:
            self.state.offset = self._handed_offset  # only records with nothing for wandb
            self.state.clock = StepClock.restore(self._offset_clock).to_dict()

    def _busy(self, until: float | None) -> None:
        """Inside init/finish (until then, wall time) no beat is expected; None: out of it."""
        self._heartbeat.busy_until = until
        self._heartbeat_changed = True

    def _save(self, force: bool = False) -> None:
        """Rewrite uploader.json (the cursor) and beat (uploader.heartbeat, which the
        supervisor watches): at most every ``heartbeat`` seconds unless forced."""
        now = time.monotonic()
        if not force and now - self._last_save < self.cfg.heartbeat:
            return
        if self.session is None or self.session.offline or not self._wandb_open:
            self._trust_flushed()
        self.spool.write_uploader(self.state)
        if self._heartbeat_changed:
            self.spool.write_heartbeat(self._heartbeat)
            self._heartbeat_changed = False
        else:
            self.spool.beat()
        self._last_save = now
