"""A run's record: what its spool holds, read as messages and folded into one state.

The spool (spool.py) stores bytes. This module is the one place that reads them
as the wire format (client/protocol.py), and the one place that says what a
run's records mean together:

- a ``metrics`` frame counts (``received``), and is ``late`` when wandb's step
  rule (steps.py) cannot place it;
- a ``close`` closes the run, with its exit code;
- a later ``hello`` (a resumed trainer) re-opens it;
- a ``refused`` record (written by the receiver for a frame it refused) counts.

The receiver (recovery and every append), ``status`` without a sidecar,
``sync`` and the uploader all use it. Reading back, they trust what the receiver
validated (``decode_trusted``): a drain reads every record once more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack

from client.protocol import (
    PROTOCOL_VERSION,
    Close,
    Hello,
    Limits,
    Metrics,
    ProtocolError,
    Record,
    Refused,
    decode_request,
    fields_of,
    metrics_of,
)

from .spool import MAX_RECORD, RunLog, UploaderState, UploadState
from .spool import Record as SpoolRecord
from .steps import StepClock

# Records were validated on the way in; read them back without the receiver's caps,
# which may have been lowered since.
TRUSTED_LIMITS = Limits(max_frame_bytes=MAX_RECORD, max_hello_bytes=MAX_RECORD, max_scalars=1 << 20)

OnBad = Callable[[SpoolRecord, ProtocolError], None]


def decode_record(payload: bytes) -> Record:
    """One frames.log record as its message (a client frame, or the receiver's ``refused``),
    validated again in full."""
    return decode_request(payload, TRUSTED_LIMITS, spool=True)  # type: ignore[return-value]


def decode_trusted(payload: bytes) -> Record:
    """``decode_record`` for a drain, which reads every record once more: a metrics frame is
    trusted for what the receiver checked before it stored it (the spool's CRC says these
    are the bytes it stored). The other records (a few per run) go through ``decode_record``.

    Where msgspec is installed, its schema checks a metrics frame's fields, values
    included, in C (``Limits.fast_metrics``), for less than the type checks below cost in
    Python; what it does not take is validated in full, so a record no receiver should
    have stored (one an older version took) is refused here, never handed to wandb.
    Without it, a metrics frame's fields have their types (what the readers compute with),
    else the full decoder decides; the ranges, the kind and the values' scalars are taken
    as the receiver checked them. Never a crash on garbage: ProtocolError."""
    fast = _FAST
    if fast is not None:
        try:
            m = fast(payload)
        except Exception:  # another record type, or one the receiver should not have taken
            return decode_record(payload)
        return metrics_of(fields_of(m))
    try:
        obj = msgpack.unpackb(payload)
        if obj["t"] == "metrics" and obj["v"] == PROTOCOL_VERSION:
            session, seq, step, when, values = obj["session"], obj["seq"], obj["step"], obj["time"], obj["values"]
            if (
                type(session) is str
                and type(seq) is int
                and (step is None or type(step) is int)
                and type(when) in (float, int)
                and type(values) is dict
            ):
                return metrics_of((session, seq, step, obj["kind"], when, values, obj.get("commit") is not False))
    except Exception:  # not msgpack, not a map, a field missing: the full decoder says what is wrong
        pass
    return decode_record(payload)


_FAST = TRUSTED_LIMITS.fast_metrics


def _skip(_rec: SpoolRecord, _exc: ProtocolError) -> None:
    pass


def messages(log: RunLog, offset: int = 0, on_bad: OnBad | None = _skip) -> Iterator[tuple[SpoolRecord, Record]]:
    """The run's records from ``offset`` on, each with its message (``decode_trusted``: the
    receiver validated them). A record that does not decode (it cannot happen for frames
    the receiver wrote) goes to ``on_bad`` and is skipped; with ``on_bad=None`` its
    ProtocolError is raised."""
    for rec in log.records(offset):
        try:
            msg = decode_trusted(rec.payload)
        except ProtocolError as exc:
            if on_bad is None:
                raise
            on_bad(rec, exc)
            continue
        yield rec, msg


@dataclass
class RunRecord:
    """The fold over one run's records, in log order (``apply``)."""

    received: int = 0  # metrics frames
    closed: bool = False
    exit_code: int | None = None
    late: int = 0  # rows below the run's current step in one session: wandb cannot chart them
    refused: int = 0  # frames the receiver refused (their seqs used up)
    clock: StepClock = field(default_factory=StepClock)  # wandb's step rule over the records
    sessions: set[str] = field(default_factory=set)  # every trainer session that said hello

    def apply(self, msg: Record) -> None:
        """Account for the next record of the run."""
        if isinstance(msg, Hello):
            self.sessions.add(msg.session)
            self.clock.hello(msg.session)
            self.closed = False  # a new session after a close re-opens the run (resume)
            self.exit_code = None
        elif isinstance(msg, Metrics):
            self.apply_metrics(msg.session, msg.step, msg.commit)
        elif isinstance(msg, Close):
            self.closed = True
            self.exit_code = msg.exit_code
        elif isinstance(msg, Refused):
            self.refused += 1

    def apply_metrics(self, session: str, step: int | None, commit: bool) -> None:
        """``apply`` for a metrics record, given only what it needs of it (the receiver's
        batch loop builds no Metrics)."""
        self.received += 1
        if self.clock.place(session, step, commit)[1] == "late":
            self.late += 1

    @property
    def last_step(self) -> int | None:
        """The highest step on the run's chart (after a rewind, the resumed trainer's)."""
        return self.clock.top

    def needs_upload(self, up: UploaderState) -> bool:
        """Frames wandb has not kept yet, or a close it has not seen (and not failed for good)."""
        return up.state != UploadState.FAILED and (
            self.received > up.trusted or (self.closed and up.state != UploadState.FINISHED)
        )

    def counts(self) -> RunRecord:
        """A copy of the fold's state, to go back to (``restore``)."""
        return RunRecord(self.received, self.closed, self.exit_code, self.late, self.refused, self.clock.copy())

    def restore(self, saved: RunRecord) -> None:
        """Go back to ``saved`` (from ``counts``). ``sessions`` stay as they are: the
        receiver keeps a session it has met, whatever became of its records."""
        self.received, self.closed, self.exit_code = saved.received, saved.closed, saved.exit_code
        self.late, self.refused, self.clock = saved.late, saved.refused, saved.clock.copy()


def fold(log: RunLog, run: RunRecord | None = None, on_bad: OnBad | None = _skip) -> RunRecord:
    """``run`` (a fresh RunRecord if None) with every record of ``log`` applied."""
    run = RunRecord() if run is None else run
    for _rec, msg in messages(log, on_bad=on_bad):
        run.apply(msg)
    return run


def pending_frames(log: RunLog, cursor: int) -> int:
    """Metrics frames at or after ``cursor`` (a byte offset): what wandb has not kept."""
    return sum(isinstance(msg, Metrics) for rec, msg in messages(log, cursor, on_bad=None))


def first_pending_time(log: RunLog, up: UploaderState) -> float | None:
    """The client's wall time of the first metrics frame not yet handed to wandb.

    The cursor (``up.offset``) is where wandb has kept everything before; the
    uploader has handed ``up.uploaded - up.trusted`` more frames after it.
    """
    skip = max(0, up.uploaded - up.trusted)
    for _rec, msg in messages(log, up.offset):
        if isinstance(msg, Metrics):
            if skip == 0:
                return msg.time
            skip -= 1
    return None
