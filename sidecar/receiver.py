"""The receiver: validates frames, appends them to the spool, acknowledges them once durable.

It never calls wandb and never blocks on anything but its own socket and the
local disk. Per client session it keeps the highest sequence number in the
spool; a duplicate (a resend) is acknowledged again and not stored twice, a
gap (frames lost in a dead connection) is answered with one nack so the
client resends from there.

Group commit: ``handle`` only appends; ``commit`` fsyncs every run written
since the last commit and then sends the acks and welcomes that were waiting
on it. The server calls ``commit`` every few milliseconds, so one fsync covers
many frames and durability does not cap throughput.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import zmq

from client import protocol
from client.protocol import Close, ConfigUpdate, Control, Hello, Metrics, Ping, ProtocolError, Refused, SummaryUpdate

from .proc import pid_alive
from .record import RunRecord, messages
from .spool import Record as SpoolRecord
from .spool import RunMeta, RunSpool, Spool

log = logging.getLogger("kforge_sidecar.receiver")

# One run holds one session per trainer process that attached to it (a resume is a
# new one); past this many, a hello for the run is refused rather than grow memory.
MAX_SESSIONS_PER_RUN = 1000


@dataclass
class Session:
    session: str
    run_id: str
    seq: int = 0  # highest seq appended to the spool
    durable: int = 0  # highest seq known to be on disk
    identity: bytes | None = None  # the ROUTER identity replies go to
    nacked: int = -1  # the seq last nacked, so a burst of gaps gets one nack
    pid: int | None = None
    host: str | None = None
    last_seen: float = field(default_factory=time.monotonic)  # any message, pings included
    local: bool = False  # its pid was seen alive on this host: pid death is proof of death

    def alive(self, now: float, timeout: float) -> bool:
        if now - self.last_seen > timeout:
            return False
        return not self.local or self.pid is None or pid_alive(self.pid)


@dataclass
class Committed:
    """A run as of its last successful commit, to roll back to if an fsync fails."""

    log_size: int
    record: RunRecord  # RunRecord.counts()
    seqs: dict[str, int]  # each of its sessions' highest seq


@dataclass(kw_only=True)
class RunState(RunRecord):
    """What the receiver knows of one run: the fold over its records (rebuilt from the
    spool on start), and what only a live receiver knows."""

    spool: RunSpool
    meta: RunMeta
    client_dropped: int = 0  # frames the clients reported dropping (full buffer)
    orphaned_since: float | None = None  # open, and every trainer of it gone
    dirty: bool = False
    snapshot: Committed | None = None

    def take_snapshot(self, sessions: dict[str, Session]) -> None:
        seqs = {s: sessions[s].seq for s in self.sessions if s in sessions}
        self.snapshot = Committed(self.spool.log.size(), self.counts(), seqs)


class Receiver:
    def __init__(self, spool: Spool, limits: protocol.Limits, max_runs: int = 64):
        self.spool = spool
        self.host = socket.gethostname()
        self.limits = limits
        self.max_runs = max_runs
        self.runs: dict[str, RunState] = {}
        self.sessions: dict[str, Session] = {}
        self.rejected: Counter[str] = Counter()
        self.duplicates = 0
        self.disk_error: str | None = None
        # replies that wait for the next commit
        self._replies: list[tuple[bytes, bytes]] = []
        self._acks: dict[str, Session] = {}
        self._welcomes: dict[str, Session] = {}
        self._last_reject_log: dict[str, float] = {}

    # ---------------------------------------------------------------- recovery

    def recover(self) -> None:
        """Rebuild run and session state from the spool, cutting torn tails."""
        for run_id in self.spool.run_ids():
            rs = self.spool.run(run_id)
            meta = rs.read_meta()
            if meta is None:
                log.error("run %s: spool directory has no meta.json; skipping it", run_id)
                continue
            rs.log.repair()
            run = RunState(spool=rs, meta=meta)

            def unreadable(rec: SpoolRecord, exc: ProtocolError, run_id: str = run_id) -> None:
                log.error("run %s: unreadable spool record at offset %d: %s", run_id, rec.offset, exc)  # cannot happen for frames we validated

            for _rec, msg in messages(rs.log, on_bad=unreadable):
                self._apply(run, msg)
            rs.log.open_for_append()
            run.take_snapshot(self.sessions)
            for s in run.sessions:
                self.sessions[s].durable = self.sessions[s].seq
            self.runs[run_id] = run
            log.info("run %s: recovered %d frames (closed=%s)", run_id, run.received, run.closed)

    def _apply(self, run: RunState, msg: protocol.Record) -> None:
        """Account for a record that is in the run's log (on recovery, or just appended):
        the run's fold (record.py), and the seq of the session that sent it."""
        if isinstance(msg, Hello):
            if msg.session not in self.sessions:
                sess = self.sessions[msg.session] = Session(msg.session, run.meta.run_id, pid=msg.pid, host=msg.host)
                sess.local = msg.host == self.host and pid_alive(msg.pid)
        else:
            sess = self.sessions.get(msg.session) or self.sessions.setdefault(msg.session, Session(msg.session, run.meta.run_id))
            sess.seq = msg.seq
        run.apply(msg)

    # ---------------------------------------------------------------- frames

    def handle(self, parts: list[bytes]) -> Control | None:
        """One message from the ROUTER socket: [identity, frame]. A control request is
        not the receiver's: it is returned, for the server to answer with ``reply``."""
        if len(parts) != 2:
            self._reject(parts[0], ProtocolError("malformed", f"{len(parts) - 1} frame parts, expected 1"))
            return None
        identity, raw = parts
        try:
            msg = protocol.decode_request(raw, self.limits)
        except ProtocolError as exc:
            if not self._refuse(identity, exc, raw):
                self._reject(identity, exc, raw)
            return None
        if isinstance(msg, Control):
            return msg  # the server's to answer (``reply``)
        sess = self.sessions.get(msg.session)
        if sess is not None:
            sess.last_seen = time.monotonic()
        if isinstance(msg, Ping):
            if sess is None:  # e.g. this sidecar restarted with a fresh spool: the client says hello again
                self._send(identity, protocol.Error(msg.session, "unknown session; say hello first", code=protocol.E_UNKNOWN_SESSION))
        elif isinstance(msg, Hello):
            self._hello(identity, msg, raw)
        else:
            self._frame(identity, msg, raw)
        return None

    def reply(self, identity: bytes, body: dict) -> None:
        """Answer a control request; it leaves with the next commit, as every reply does."""
        self._send(identity, protocol.Reply(body=body))

    def _hello(self, identity: bytes, msg: Hello, raw: bytes) -> None:
        sess = self.sessions.get(msg.session)
        if sess is None:
            run_id = msg.run_id or protocol.mint_run_id()
            run = self.runs.get(run_id)
            refusal = self._over_capacity(run)
            if refusal:
                self.rejected["capacity"] += 1
                log.warning("run %s: refusing session %s (pid %d, host %s): %s", run_id, msg.session, msg.pid, msg.host, refusal)
                self._send(identity, protocol.Error(msg.session, refusal, fatal=True, code=protocol.E_FATAL))
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
                    log.info("run %s: new (project=%s name=%s pid=%d host=%s)", run_id, msg.project, msg.name, msg.pid, msg.host)
                else:
                    log.info("run %s: session %s attached (pid=%d host=%s)", run_id, msg.session, msg.pid, msg.host)
                    if run.orphaned_since is not None:
                        log.info("run %s: a trainer is back within the grace; not finishing it", run_id)
                        run.orphaned_since = None
                # the session -> run mapping must survive a restart: it goes into the log
                run.spool.log.append(raw)
            except OSError as exc:
                self._disk_failed(run_id, exc)
                self._send(identity, protocol.Error(msg.session, f"spool unwritable: {exc}", code=protocol.E_DISK))
                return
            self._apply(run, msg)
            run.dirty = True
            sess = self.sessions[msg.session]
        sess.identity = identity
        if msg.first > sess.seq + 1:  # the client dropped these for good (full buffer)
            run = self.runs[sess.run_id]
            run.client_dropped = min(run.client_dropped + msg.first - 1 - sess.seq, protocol.INT64_MAX)
            log.warning(
                "run %s: session %s dropped frames %d..%d before they reached the sidecar (client buffer full)",
                sess.run_id, sess.session, sess.seq + 1, msg.first - 1,
            )
            sess.seq = msg.first - 1
        self._welcomes[sess.session] = sess

    def _over_capacity(self, run: RunState | None) -> str | None:
        """Why a new session cannot be taken, if it cannot: caps on runs and sessions keep
        one client from filling the sidecar with runs, uploader processes or memory."""
        if run is None:
            open_runs = sum(1 for r in self.runs.values() if not r.closed)
            if open_runs >= self.max_runs:
                return f"this sidecar already has {open_runs} open runs (--max-runs {self.max_runs}); not opening another"
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
            self._acks[sess.session] = sess
            return True
        if seq > sess.seq + 1:  # frames before it are missing: have them first
            self._nack(identity, sess)
            return True
        run = self.runs[sess.run_id]
        record = Refused(sess.session, seq, f"{exc.reason}: {exc.detail}"[:500])
        try:
            run.spool.log.append(protocol.encode(record))
        except OSError as e:
            self._disk_failed(run.meta.run_id, e)
            return True
        self._apply(run, record)
        run.dirty = True
        self._acks[sess.session] = sess
        self._send(identity, protocol.Error(sess.session, str(exc), code=protocol.E_REFUSED, seq=seq))
        return True

    def _nack(self, identity: bytes, sess: Session) -> None:
        if sess.nacked != sess.seq:  # a burst of gaps gets one nack
            sess.nacked = sess.seq
            self._send(identity, protocol.Nack(sess.session, sess.seq))

    def _frame(self, identity: bytes, msg: Metrics | ConfigUpdate | SummaryUpdate | Close, raw: bytes) -> None:
        sess = self.sessions.get(msg.session)
        if sess is None:
            # e.g. the hello was lost with a dead connection: the client says hello again.
            self._send(identity, protocol.Error(msg.session, "unknown session; say hello first", code=protocol.E_UNKNOWN_SESSION))
            return
        sess.identity = identity
        if msg.seq <= sess.seq:  # a resend of what we have
            self.duplicates += 1
            self._acks[sess.session] = sess
            return
        if msg.seq > sess.seq + 1:  # frames in between were lost on the way
            self._nack(identity, sess)
            return
        run = self.runs[sess.run_id]
        try:
            run.spool.log.append(raw)
        except OSError as exc:
            self._disk_failed(run.meta.run_id, exc)
            return
        self._apply(run, msg)
        run.dirty = True
        self._acks[sess.session] = sess

    # ---------------------------------------------------------------- dead trainers

    def reap_orphans(self, session_timeout: float, grace: float) -> None:
        """Finish, as failed, the open runs whose trainers all died without close().

        A trainer counts as dead when its pid is gone (a trainer on this host)
        or it has been silent for ``session_timeout`` (clients ping while idle).
        The run waits ``grace`` seconds for a resume to re-attach; then the
        sidecar appends a close with exit code 1 in its own name, so the
        uploader uploads everything that arrived and finishes the run.
        """
        now = time.monotonic()
        for run in self.runs.values():
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
                self._close_for_dead_trainer(run)

    def has_live_trainer(self, run: RunState, session_timeout: float) -> bool:
        """A session of the run is alive: its pid runs (a trainer on this host), and it
        was heard from within ``session_timeout``."""
        now = time.monotonic()
        return any(self.sessions[s].alive(now, session_timeout) for s in run.sessions if s in self.sessions)

    def _close_for_dead_trainer(self, run: RunState) -> None:
        session = f"sidecar-{run.meta.run_id}"[:64]  # the sidecar's own session: no client's seqs are touched
        seq = self.sessions[session].seq + 1 if session in self.sessions else 1
        msg = Close(session=session, seq=seq, exit_code=1)
        try:
            run.spool.log.append(protocol.encode(msg))
        except OSError as exc:
            self._disk_failed(run.meta.run_id, exc)
            return
        self._apply(run, msg)
        run.dirty = True
        run.orphaned_since = None
        log.warning("run %s: no trainer came back; finishing it as failed (exit code 1)", run.meta.run_id)

    # ---------------------------------------------------------------- commit

    @property
    def dirty(self) -> bool:
        return bool(self._acks or self._welcomes or self._replies)

    def commit(self, sock: zmq.Socket) -> None:
        """Make appended frames durable, then send the replies that waited on it."""
        failed: set[str] = set()
        for run in self.runs.values():
            if not run.dirty:
                continue
            try:
                run.spool.log.sync()
            except OSError as exc:
                self._rollback(run, exc)
                failed.add(run.meta.run_id)
                continue
            run.dirty = False
            run.take_snapshot(self.sessions)
            if self.disk_error:
                log.info("spool writable again")
                self.disk_error = None
        for sess in list(self._welcomes.values()) + list(self._acks.values()):
            if sess.run_id not in failed:
                sess.durable = sess.seq
        for sess in self._welcomes.values():
            if sess.run_id not in failed and sess.identity is not None:
                self._send(sess.identity, protocol.Welcome(sess.session, sess.run_id, sess.durable), sock)
        for sess in self._acks.values():
            if sess.run_id not in failed and sess.identity is not None and sess.session not in self._welcomes:
                self._send(sess.identity, protocol.Ack(sess.session, sess.durable), sock)
        self._welcomes.clear()
        self._acks.clear()
        replies, self._replies = self._replies, []
        for identity, frame in replies:
            _route(sock, identity, frame)

    def _rollback(self, run: RunState, exc: OSError) -> None:
        """An fsync failed: what was appended since the last commit may not be on disk.
        Cut it and forget it; the clients still hold those frames and resend them."""
        self._disk_failed(run.meta.run_id, exc)
        assert run.snapshot is not None  # taken when the run was created or recovered
        run.restore(run.snapshot.record)
        try:
            os.truncate(run.spool.log.path, run.snapshot.log_size)
        except OSError:
            pass
        for s, seq in run.snapshot.seqs.items():
            self.sessions[s].seq = self.sessions[s].durable = seq
        run.dirty = False

    def _disk_failed(self, run_id: str, exc: OSError) -> None:
        reason = f"spool write failed for run {run_id}: {exc}"
        if reason != self.disk_error:
            log.error("%s; not acknowledging until the spool is writable (clients keep buffering)", reason)
        self.disk_error = reason

    # ---------------------------------------------------------------- replies

    def _send(self, identity: bytes, msg: protocol.Response, sock: zmq.Socket | None = None) -> None:
        frame = protocol.encode(msg)
        if sock is None:
            self._replies.append((identity, frame))
        else:
            _route(sock, identity, frame)

    def _reject(self, identity: bytes | None, exc: ProtocolError, raw: bytes = b"") -> None:
        self.rejected[exc.reason] += 1
        self._log_reject(exc)
        if identity is not None:
            # A rejected hello is fatal too: the client could only repeat it, forever.
            fatal = exc.reason == "version" or _is_hello(raw)
            self._send(identity, protocol.Error(None, str(exc), fatal=fatal, code=protocol.E_FATAL if fatal else ""))

    def _log_reject(self, exc: ProtocolError, where: str = "") -> None:
        now = time.monotonic()
        # a flood of garbage must not flood the log: one line per reason per 10 s
        if now - self._last_reject_log.get(exc.reason, -1e9) >= 10.0:
            self._last_reject_log[exc.reason] = now
            context = f" ({where})" if where else ""
            log.warning("rejected frame%s: %s (%d rejected for this reason so far)", context, exc, self.rejected[exc.reason])

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


def _route(sock: zmq.Socket, identity: bytes, frame: bytes) -> None:
    try:
        sock.send_multipart([identity, frame], zmq.NOBLOCK)
    except (zmq.Again, zmq.ZMQError):
        # the peer is gone or not reading: its resend timer covers a lost reply
        pass
