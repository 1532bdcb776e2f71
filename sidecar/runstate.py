"""What the receiver holds in memory: its runs and their trainer sessions (the ledger).

Rebuilt from the spool on start (recovery.py); changed only by appending a record to a
run's log and applying it (``Ledger.apply``), so memory and spool say the same.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

from client import protocol
from client.protocol import Hello

from .proc import pid_alive
from .record import RunRecord
from .spool import RunMeta, RunSpool

log = logging.getLogger("kforge_sidecar.receiver")


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


class Ledger:
    """The runs and sessions of one receiver, and the spool's health as its writes found it."""

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.runs: dict[str, RunState] = {}
        self.sessions: dict[str, Session] = {}
        self.disk_error: str | None = None  # the last spool write that failed, until a commit succeeds
        self.unsynced = False  # something was appended since the last commit
        self.rolled_back: set[str] = set()  # runs rolled back since the last commit: owed nothing by it

    def apply(self, run: RunState, msg: protocol.Record) -> None:
        """Account for a record that is in the run's log (on recovery, or just appended):
        the run's fold (record.py), and the seq of the session that sent it."""
        if isinstance(msg, Hello):
            if msg.session not in self.sessions:
                sess = self.sessions[msg.session] = Session(msg.session, run.meta.run_id, pid=msg.pid, host=msg.host)
                sess.local = msg.host == self.host and pid_alive(msg.pid)
        else:
            sess = self.sessions.get(msg.session) or self.sessions.setdefault(
                msg.session, Session(msg.session, run.meta.run_id)
            )
            sess.seq = msg.seq
        run.apply(msg)

    def append(
        self, run: RunState, msg: protocol.Record, raw: bytes | None = None, sess: Session | None = None
    ) -> bool:
        """Append a record (``raw``, else ``msg`` encoded) to the run's log and apply it;
        written and made durable by the next commit (commit.py), which rolls the run back
        if that fails. True: the record is the spool's now."""
        run.spool.log.append(protocol.encode(msg) if raw is None else raw)
        if sess is None:
            self.apply(run, msg)
        else:  # a client's seq'd frame, its session at hand: apply, less the lookups
            sess.seq = msg.seq
            run.apply(msg)
        run.dirty = True
        self.unsynced = True
        return True

    def append_metrics(
        self, run: RunState, sess: Session, seq: int, step: int | None, commit: bool, raw: bytes
    ) -> None:
        """``append`` for a client's metrics frame, given its validated fields
        (protocol.metrics_fields) instead of a Metrics: the receiver's hot path."""
        run.spool.log.append(raw)
        sess.seq = seq
        run.apply_metrics(sess.session, step, commit)
        run.dirty = True
        self.unsynced = True

    def disk_failed(self, run_id: str, exc: OSError) -> None:
        reason = f"spool write failed for run {run_id}: {exc}"
        if reason != self.disk_error:
            log.error("%s; not acknowledging until the spool is writable (clients keep buffering)", reason)
        self.disk_error = reason
