"""The receiver: validates frames, deduplicates them, appends them to the spool.

It never calls wandb and never blocks on anything but its own socket and the
local disk. Per client session it keeps the highest sequence number in the
spool; a duplicate (a resend) is acknowledged again and not stored twice, a
gap (frames lost in a dead connection) is answered with one nack so the
client resends from there. A frame that fails validation is refused (its seq
used up) or rejected, and counted by reason.

The rest of the receiver's work is in its own modules, which it composes:
runstate.py (runs and sessions in memory), recovery.py (rebuilt from the spool
on start), dead_trainers.py (runs whose trainers died), commit.py (group
commit and rollback: acks only once durable), replies.py (what leaves, when).
Control requests are the server's (``handle`` returns them).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import msgpack
import zmq

from client import protocol
from client.protocol import (
    SEQ_TYPES,
    Close,
    ConfigUpdate,
    Control,
    Hello,
    Metrics,
    MetricsFields,
    Ping,
    ProtocolError,
    Refused,
    Request,
    SummaryUpdate,
    Trailing,
    decode_part,
    decode_unpacked,
    metrics_fields,
)

from .commit import commit, rollback
from .dead_trainers import DeadTrainers
from .recovery import recover
from .replies import Outbox
from .runstate import Ledger, RunState, Session
from .spool import RunMeta, Spool

log = logging.getLogger("kforge_sidecar.receiver")
_monotonic = time.monotonic

# One run holds one session per trainer process that attached to it (a resume is a
# new one); past this many, a hello for the run is refused rather than grow memory.
MAX_SESSIONS_PER_RUN = 1000


class Receiver:
    def __init__(self, spool: Spool, limits: protocol.Limits, max_runs: int):
        self.spool = spool
        self.limits = limits
        self.max_runs = max_runs
        self.ledger = Ledger()
        self.outbox = Outbox(batch=limits.max_batch_bytes)
        self.dead_trainers = DeadTrainers(self.ledger)
        self.rejected: Counter[str] = Counter()
        self.duplicates = 0
        self._last_reject_log: dict[str, float] = {}

    @property
    def runs(self) -> dict[str, RunState]:
        return self.ledger.runs

    @property
    def sessions(self) -> dict[str, Session]:
        return self.ledger.sessions

    @property
    def disk_error(self) -> str | None:
        return self.ledger.disk_error

    # ---------------------------------------------------------------- recovery

    def recover(self) -> None:
        """Rebuild run and session state from the spool, cutting torn tails."""
        recover(self.ledger, self.spool)

    # ---------------------------------------------------------------- frames

    def handle(self, parts: list[bytes]) -> Control | None:
        """One message from the ROUTER socket: [identity, part]. A part holds one frame, or
        a batch of seq'd frames (``_batch``). A control request is not the receiver's: it
        is returned, for the server to answer with ``reply``."""
        if len(parts) != 2:
            self._reject(parts[0], ProtocolError("malformed", f"{len(parts) - 1} frame parts, expected 1"))
            return None
        identity, raw = parts
        try:
            msg = decode_part(raw, self.limits)
        except Trailing as exc:
            self._batch(identity, raw, exc)
            return None
        except ProtocolError as exc:
            if len(raw) > self.limits.max_alone and len(raw) <= self.limits.max_batch_bytes:
                self._batch(identity, raw, exc)  # too large for one frame; a batch may be this large
            elif not self._refuse(identity, exc, raw):
                self._reject(identity, exc, raw)
            return None
        if type(msg) is tuple:  # a metrics frame's validated fields
            self._metrics(identity, msg, raw)
            return None
        return self._other(identity, msg, raw)

    def _other(self, identity: bytes, msg: Request, raw: bytes) -> Control | None:
        """Any frame but the plain metrics frame."""
        if isinstance(msg, Control):
            return msg  # the server's to answer (``reply``)
        if isinstance(msg, Ping):
            sess = self.sessions.get(msg.session)
            if sess is not None:
                sess.last_seen = time.monotonic()
            else:  # e.g. this sidecar restarted with a fresh spool: the client says hello again
                self.outbox.send(
                    identity,
                    protocol.Error(msg.session, "unknown session; say hello first", code=protocol.E_UNKNOWN_SESSION),
                )
        elif isinstance(msg, Hello):
            sess = self.sessions.get(msg.session)
            if sess is not None:
                sess.last_seen = time.monotonic()
            self._hello(identity, msg, raw)
        else:
            self._frame(identity, msg, raw)  # type: ignore[arg-type]
        return None

    def _batch(self, identity: bytes, raw: bytes, exc: ProtocolError) -> None:
        """A part holding several frames back to back (protocol.py): each is split off with
        its own bytes (for the spool), then validated, stored and answered as if it had come
        alone. A part that is no batch, or too large for one, is rejected once, as is what
        is left of one once its bytes no longer split into frames."""
        first = exc.first if isinstance(exc, Trailing) else None
        if first is not None and not (type(first) is dict and first.get("t") in SEQ_TYPES):
            self._reject(identity, exc, raw)  # not a batch: garbage after one object, or a hello with a tail
            return
        if len(raw) > self.limits.max_batch_bytes:
            self._reject(
                identity, ProtocolError("oversize", f"batch of {len(raw)} bytes, limit {self.limits.max_batch_bytes}")
            )
            return
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(raw))
        unpacker.feed(raw)
        limits = self.limits
        unpack, tell, size, append_metrics = unpacker.unpack, unpacker.tell, len(raw), self.ledger.append_metrics
        # The session (and its run) whose frame this batch stored last: its next metrics frame
        # is stored here at once, as ``_metrics`` would store it (its identity, last_seen and
        # ack were set by that frame, and nothing between the two can have changed them).
        sess: Session | None = None
        run: RunState | None = None
        start, index = 0, 0
        while start < size:
            try:
                obj = unpack()
            except Exception as err:  # msgpack raises several unrelated types; OutOfData: a torn tail
                what = "a torn frame" if isinstance(err, msgpack.OutOfData) else f"not msgpack ({type(err).__name__})"
                self._reject(
                    identity, ProtocolError("malformed", f"batch: {what} at byte {start} of {len(raw)}; rest dropped")
                )
                return
            end = tell()
            frame = raw[start:end]
            start = end
            if index == 0 and not (type(obj) is dict and obj.get("t") in SEQ_TYPES):
                if not self._refuse(identity, exc, raw):  # no batch: a frame alone, too large
                    self._reject(identity, exc, raw)
                return
            index += 1
            try:
                # most frames are metrics: validated to their fields, no Metrics built
                fields = metrics_fields(obj, len(frame), limits)
                if fields is None:
                    msg = decode_unpacked(obj, len(frame), limits)
                    if msg.t not in SEQ_TYPES:  # a hello, ping or control request travels alone
                        raise ProtocolError("malformed", f"a {msg.t} frame inside a batch (it travels alone)")
            except ProtocolError as bad:
                if not self._refuse(identity, bad, frame):
                    self._reject(identity, bad, frame)
                continue
            if fields is None:
                self._frame(identity, msg, frame)  # type: ignore[arg-type]
            elif sess is not None and fields[1] == sess.seq + 1 and fields[0] == sess.session:
                append_metrics(run, sess, fields[1], fields[2], fields[6], frame)  # type: ignore[arg-type]
            else:
                sess = self._metrics(identity, fields, frame)
                run = self.ledger.runs[sess.run_id] if sess is not None else None

    def reply(self, identity: bytes, body: dict) -> None:
        """Answer a control request; it leaves with the next commit, as every reply does."""
        self.outbox.send(identity, protocol.Reply(body=body))

    def _hello(self, identity: bytes, msg: Hello, raw: bytes) -> None:
        sess = self.sessions.get(msg.session)
        if sess is None:
            run_id = msg.run_id or protocol.mint_run_id()
            run = self.runs.get(run_id)
            refusal = self._over_capacity(run)
            if refusal:
                self.rejected["capacity"] += 1
                log.warning(
                    "run %s: refusing session %s (pid %d, host %s): %s", run_id, msg.session, msg.pid, msg.host, refusal
                )
                self.outbox.send(identity, protocol.Error(msg.session, refusal, fatal=True, code=protocol.E_FATAL))
                return
            try:
                if run is None:
                    meta = RunMeta(
                        run_id=run_id, project=msg.project, name=msg.name, config=msg.config, host=msg.host,
                        wandb_init=msg.wandb, pid=msg.pid, process=msg.process,
                    )  # fmt: skip
                    rs = self.spool.create_run(meta)
                    rs.log.open_for_append()
                    run = self.runs[run_id] = RunState(spool=rs, meta=meta)
                    run.take_snapshot(self.sessions)
                    log.info(
                        "run %s: new (project=%s name=%s pid=%d host=%s)",
                        run_id,
                        msg.project,
                        msg.name,
                        msg.pid,
                        msg.host,
                    )
                else:
                    log.info("run %s: session %s attached (pid=%d host=%s)", run_id, msg.session, msg.pid, msg.host)
                    if run.orphaned_since is not None:
                        log.info("run %s: a trainer is back within the grace; not finishing it", run_id)
                        run.orphaned_since = None
                # the session -> run mapping must survive a restart: it goes into the log, written
                # at once (with what this run buffered before it), so a full disk is known now
                run.spool.log.append(raw)
                run.spool.log.write()
            except OSError as exc:
                if run is not None and run_id in self.runs:
                    rollback(self.ledger, run, exc)  # what the run buffered before it went too
                else:
                    self.ledger.disk_failed(run_id, exc)
                self.outbox.send(
                    identity, protocol.Error(msg.session, f"spool unwritable: {exc}", code=protocol.E_DISK)
                )
                return
            self.ledger.apply(run, msg)
            run.dirty = self.ledger.unsynced = True
            sess = self.sessions[msg.session]
        sess.identity = identity
        if msg.first > sess.seq + 1:  # the client dropped these for good (full buffer)
            run = self.runs[sess.run_id]
            run.client_dropped = min(run.client_dropped + msg.first - 1 - sess.seq, protocol.INT64_MAX)
            log.warning(
                "run %s: session %s dropped frames %d..%d before they reached the sidecar (client buffer full)",
                sess.run_id,
                sess.session,
                sess.seq + 1,
                msg.first - 1,
            )
            sess.seq = msg.first - 1
        self.outbox.welcome(sess)

    def _over_capacity(self, run: RunState | None) -> str | None:
        """Why a new session cannot be taken, if it cannot: caps on runs and sessions keep
        one client from filling the sidecar with runs, uploader processes or memory."""
        if run is None:
            open_runs = sum(1 for r in self.runs.values() if not r.closed)
            if open_runs >= self.max_runs:
                return (
                    f"this sidecar already has {open_runs} open runs (--max-runs {self.max_runs}); not opening another"
                )
        elif len(run.sessions) >= MAX_SESSIONS_PER_RUN:
            return f"run already had {len(run.sessions)} trainer sessions; not attaching another"
        return None

    def _refuse(self, identity: bytes, exc: ProtocolError, raw: bytes) -> bool:
        """Refuse exactly one frame of a known session, so its stream goes on: its seq is
        used up by a ``refused`` record in the spool. False if the frame cannot be
        attributed (no sound session and seq), for ``_reject``."""
        if exc.reason == "version":
            return False  # fatal for the client, not one frame
        peek = protocol.peek_seq(raw)
        sess = self.sessions.get(peek[0]) if peek else None
        if sess is None or peek is None:
            return False
        seq = peek[1]
        sess.identity = identity
        sess.last_seen = time.monotonic()
        self.rejected[exc.reason] += 1
        self._log_reject(exc, f"run {sess.run_id} session {sess.session} frame {seq}")
        if seq <= sess.seq:  # refused (or stored) before: a resend
            self.outbox.ack(sess)
            return True
        if seq > sess.seq + 1:  # frames before it are missing: have them first
            self._nack(identity, sess)
            return True
        run = self.runs[sess.run_id]
        if not self.ledger.append(run, Refused(sess.session, seq, f"{exc.reason}: {exc.detail}"[:500])):
            return True
        self.outbox.refused(sess, protocol.Error(sess.session, str(exc), code=protocol.E_REFUSED, seq=seq))
        self.outbox.ack(sess)
        return True

    def _nack(self, identity: bytes, sess: Session) -> None:
        if sess.nacked != sess.seq:  # a burst of gaps gets one nack
            sess.nacked = sess.seq
            self.outbox.send(identity, protocol.Nack(sess.session, sess.seq))

    def _frame(self, identity: bytes, msg: Metrics | ConfigUpdate | SummaryUpdate | Close, raw: bytes) -> None:
        sess = self._next(identity, msg.session, msg.seq)
        if sess is not None:
            ledger = self.ledger
            ledger.append(ledger.runs[sess.run_id], msg, raw, sess)
            self.outbox.acks[sess.session] = sess  # Outbox.ack, inlined: once per frame

    def _metrics(self, identity: bytes, fields: MetricsFields, raw: bytes) -> Session | None:
        """``_frame`` for a metrics frame, as its validated fields. Its session if the frame
        was stored."""
        session, seq, step, _kind, _time, _values, commit = fields
        sess = self._next(identity, session, seq)
        if sess is not None:
            ledger = self.ledger
            ledger.append_metrics(ledger.runs[sess.run_id], sess, seq, step, commit, raw)
            self.outbox.acks[session] = sess
        return sess

    def _next(self, identity: bytes, session: str, seq: int) -> Session | None:
        """The session whose next frame this is, for the caller to store it; None if the
        frame was answered here (unknown session, resend, gap) and is not to be stored."""
        sess = self.ledger.sessions.get(session)
        if sess is None:
            # e.g. the hello was lost with a dead connection: the client says hello again.
            self.outbox.send(
                identity, protocol.Error(session, "unknown session; say hello first", code=protocol.E_UNKNOWN_SESSION)
            )
            return None
        sess.identity = identity
        sess.last_seen = _monotonic()
        if seq <= sess.seq:  # a resend of what we have
            self.duplicates += 1
            self.outbox.acks[sess.session] = sess
            return None
        if seq > sess.seq + 1:  # frames in between were lost on the way
            self._nack(identity, sess)
            return None
        return sess

    # ---------------------------------------------------------------- dead trainers

    def reap_orphans(self, session_timeout: float, grace: float) -> None:
        self.dead_trainers.reap(session_timeout, grace)

    def has_live_trainer(self, run: RunState, session_timeout: float) -> bool:
        return self.dead_trainers.has_live_trainer(run, session_timeout)

    # ---------------------------------------------------------------- commit

    @property
    def dirty(self) -> bool:
        """Appended records or replies wait for a commit."""
        return self.outbox.pending or self.ledger.unsynced or bool(self.ledger.rolled_back)

    def commit(self, sock: zmq.Socket) -> None:
        """Make appended frames durable, then send the replies that waited on it."""
        commit(self.ledger, self.outbox, sock)

    def _reject(self, identity: bytes | None, exc: ProtocolError, raw: bytes = b"") -> None:
        self.rejected[exc.reason] += 1
        self._log_reject(exc)
        if identity is not None:
            # A rejected hello is fatal too: the client could only repeat it, forever.
            fatal = exc.reason == "version" or _is_hello(raw)
            self.outbox.send(
                identity, protocol.Error(None, str(exc), fatal=fatal, code=protocol.E_FATAL if fatal else "")
            )

    def _log_reject(self, exc: ProtocolError, where: str = "") -> None:
        now = time.monotonic()
        # a flood of garbage must not flood the log: one line per reason per 10 s
        if now - self._last_reject_log.get(exc.reason, -1e9) >= 10.0:
            self._last_reject_log[exc.reason] = now
            context = f" ({where})" if where else ""
            log.warning(
                "rejected frame%s: %s (%d rejected for this reason so far)", context, exc, self.rejected[exc.reason]
            )

    def internal_error(self, exc: BaseException, parts: list[bytes]) -> None:
        """A bug met while handling one message: counted and logged with context; the
        sidecar goes on serving everyone else."""
        self.rejected["internal"] += 1
        context = "?"
        try:
            obj = msgpack.unpackb(parts[-1], raw=False) if parts else None
            if isinstance(obj, dict):
                context = f"type {str(obj.get('t'))[:20]!r} session {str(obj.get('session'))[:64]!r} seq {str(obj.get('seq'))[:24]}"
        except Exception:
            pass
        now = time.monotonic()
        if now - self._last_reject_log.get("internal", -1e9) >= 10.0:
            self._last_reject_log["internal"] = now
            log.error(
                "internal error handling a message (%s); dropped it and serving on (%d so far)",
                context, self.rejected["internal"], exc_info=exc,
            )  # fmt: skip


def _is_hello(raw: bytes) -> bool:
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("t") == "hello"
