"""Recovery: the receiver's memory rebuilt from the spool when a sidecar starts.

Each run's torn tail (a crash mid-write) is cut first; then its records are applied
in order, as they were when they were appended.
"""

from __future__ import annotations

import logging

from client.protocol import ProtocolError

from .record import messages
from .runstate import Ledger, RunState
from .spool import Record as SpoolRecord
from .spool import Spool

log = logging.getLogger("kforge_sidecar.receiver")


def recover(ledger: Ledger, spool: Spool) -> None:
    """Rebuild run and session state from the spool, cutting torn tails."""
    for run_id in spool.run_ids():
        rs = spool.run(run_id)
        meta = rs.read_meta()
        if meta is None:
            log.error("run %s: spool directory has no meta.json; skipping it", run_id)
            continue
        rs.log.repair()
        run = RunState(spool=rs, meta=meta)

        def unreadable(rec: SpoolRecord, exc: ProtocolError, run_id: str = run_id) -> None:
            log.error(
                "run %s: unreadable spool record at offset %d: %s", run_id, rec.offset, exc
            )  # cannot happen for frames we validated

        for _rec, msg in messages(rs.log, on_bad=unreadable):
            ledger.apply(run, msg)
        rs.log.open_for_append()
        run.take_snapshot(ledger.sessions)
        for s in run.sessions:
            ledger.sessions[s].durable = ledger.sessions[s].seq
        ledger.runs[run_id] = run
        log.info("run %s: recovered %d frames (closed=%s)", run_id, run.received, run.closed)
