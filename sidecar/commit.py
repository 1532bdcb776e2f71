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
    """Make appended frames durable, then send the replies that waited on it."""
    failed: set[str] = set()
    for run in ledger.runs.values():
        if not run.dirty:
            continue
        try:
            run.spool.log.sync()
        except OSError as exc:
            rollback(ledger, run, exc)
            failed.add(run.meta.run_id)
            continue
        run.dirty = False
        run.take_snapshot(ledger.sessions)
        if ledger.disk_error:
            log.info("spool writable again")
            ledger.disk_error = None
    outbox.flush(sock, failed)


def rollback(ledger: Ledger, run: RunState, exc: OSError) -> None:
    """An fsync failed: what was appended since the last commit may not be on disk.
    Cut it and forget it; the clients still hold those frames and resend them."""
    ledger.disk_failed(run.meta.run_id, exc)
    assert run.snapshot is not None  # taken when the run was created or recovered
    run.restore(run.snapshot.record)
    try:
        os.truncate(run.spool.log.path, run.snapshot.log_size)
    except OSError:
        pass
    for s, seq in run.snapshot.seqs.items():
        ledger.sessions[s].seq = ledger.sessions[s].durable = seq
    run.dirty = False
