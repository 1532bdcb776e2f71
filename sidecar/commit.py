"""Group commit: one fsync per written run per interval, then the replies that waited on it.

The receiver only appends (``handle``); every few milliseconds the server calls
``commit``, so one fsync covers many frames and durability does not cap throughput.
An fsync that fails rolls its run back to the last commit (the clients still hold
those frames and resend them), and its sessions get no ack.
"""

from __future__ import annotations

import logging
import os

import zmq

from .replies import Outbox
from .runstate import Ledger, RunState

log = logging.getLogger("kforge_sidecar.receiver")


def commit(ledger: Ledger, outbox: Outbox, sock: zmq.Socket) -> None:
    """Write and make durable what was appended, then send the replies that waited on it."""
    failed, ledger.rolled_back = ledger.rolled_back, set()  # rolled back since the last commit
    for run in ledger.runs.values():
        if not run.dirty:
            continue
        try:
            run.spool.log.sync()  # one write of every record appended since the last commit, one fdatasync
        except OSError as exc:
            rollback(ledger, run, exc)
            failed.add(run.meta.run_id)
            continue
        run.dirty = False
        run.take_snapshot(ledger.sessions)
        if ledger.disk_error:
            log.info("spool writable again")
            ledger.disk_error = None
    ledger.unsynced = False
    ledger.rolled_back.clear()
    outbox.flush(sock, failed)


def rollback(ledger: Ledger, run: RunState, exc: OSError) -> None:
    """A write or fsync failed: what was appended since the last commit may not be on disk.
    Cut it and forget it; the clients still hold those frames and resend them. A session
    whose hello was cut with it is forgotten too: it says hello again (and is written again).
    The run's sessions get no ack from the next commit (``Ledger.rolled_back``)."""
    ledger.disk_failed(run.meta.run_id, exc)
    assert run.snapshot is not None  # taken when the run was created or recovered
    run.spool.log.discard()
    run.restore(run.snapshot.record)
    try:
        os.truncate(run.spool.log.path, run.snapshot.log_size)
    except OSError:
        pass
    seqs = run.snapshot.seqs
    for s in run.sessions:
        sess = ledger.sessions.get(s)
        if sess is None or sess.run_id != run.meta.run_id:
            continue
        if s in seqs:
            sess.seq = sess.durable = seqs[s]
        else:
            del ledger.sessions[s]
    run.dirty = False
    ledger.rolled_back.add(run.meta.run_id)
