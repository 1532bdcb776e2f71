"""What ``kforge-sidecar status`` shows: per run, where its frames are.

The live view comes from the sidecar over its socket; when no sidecar
answers, the same view is rebuilt from the spool on disk.
"""

from __future__ import annotations

from typing import Any

from client import protocol

from .receiver import RunState
from .spool import Spool, UploaderState, decode_record


def run_status(
    run: RunState,
    up: UploaderState,
    uploader_pid: int | None = None,
    retry_in: float | None = None,
    restarts: int = 0,
) -> dict[str, Any]:
    state = up.state
    if state == "finished" and not run.closed:
        state = "waiting"  # re-opened by a resumed session
    return {
        "run_id": run.meta.run_id,
        "project": run.meta.project,
        "name": run.meta.name,
        "state": state,
        "received": run.received,
        "uploaded": up.uploaded,
        "pending": max(0, run.received - up.uploaded),
        "last_step": run.last_step,
        "closed": run.closed,
        "exit_code": run.exit_code,
        "client_dropped": run.client_dropped,
        "late": max(run.late, up.late),  # rows wandb cannot chart (below the run's current step)
        "refused": run.refused,
        "uploader_pid": uploader_pid,
        "uploader_restarts": restarts,
        "retry_in": retry_in,
        "last_error": up.error,
        "wandb_dir": up.wandb_dir,
        "spool": str(run.spool.dir),
    }


def offline_status(spool: Spool) -> dict[str, Any]:
    """The status view read from the spool alone (no sidecar running)."""
    runs = []
    for run_id in spool.run_ids():
        rs = spool.run(run_id)
        meta = rs.read_meta()
        if meta is None:
            continue
        run = RunState(spool=rs, meta=meta)
        for rec in rs.log.records():
            try:
                msg = decode_record(rec.payload)
            except protocol.ProtocolError:
                continue
            if isinstance(msg, protocol.Metrics):
                run.received += 1
                run.late += run.clock.place(msg.session, msg.step, msg.commit)[1] == "late"
            elif isinstance(msg, protocol.Close):
                run.closed, run.exit_code = True, msg.exit_code
            elif isinstance(msg, protocol.Hello):
                run.clock.hello(msg.session)
                run.closed, run.exit_code = False, None
            elif isinstance(msg, protocol.Refused):
                run.refused += 1
        runs.append(run_status(run, rs.read_uploader()))
    return {"sidecar": None, "spool_dir": str(spool.root), "runs": runs}


def format_status(body: dict[str, Any]) -> str:
    lines = []
    sc = body.get("sidecar")
    if sc:
        lines.append(f"sidecar pid {sc['pid']} on {sc['address']}, up {sc['uptime']:.0f}s, spool {sc['spool_dir']}")
        rejected = sc.get("rejected") or {}
        total = sum(rejected.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
        lines.append(f"rejected frames: {total}" + (f" ({detail})" if detail else ""))
        if sc.get("disk_error"):
            lines.append(f"SPOOL NOT WRITABLE: {sc['disk_error']}")
    else:
        lines.append(f"no sidecar running; spool {body.get('spool_dir')}")
    runs = body.get("runs") or []
    if not runs:
        lines.append("no runs")
        return "\n".join(lines)
    header = ("RUN", "PROJECT/NAME", "STATE", "RECEIVED", "UPLOADED", "PENDING", "LAST STEP")
    rows = [
        (
            r["run_id"],
            f"{r['project']}/{r['name'] or '-'}",
            r["state"],
            str(r["received"]),
            str(r["uploaded"]),
            str(r["pending"]),
            "-" if r["last_step"] is None else str(r["last_step"]),
        )
        for r in runs
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        lines.append("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    for r in runs:
        if r.get("late"):
            lines.append(f"{r['run_id']}: {r['late']} rows logged below the run's current step (wandb cannot chart them; kept in the spool)")
        if r.get("refused"):
            lines.append(f"{r['run_id']}: {r['refused']} frames refused by the sidecar (see its log)")
        if r["last_error"]:
            retry = f" (next attempt in {r['retry_in']:.0f}s)" if r.get("retry_in") else ""
            lines.append(f"{r['run_id']}: {r['last_error']}{retry}")
        if r["wandb_dir"]:
            lines.append(f"{r['run_id']}: wandb files in {r['wandb_dir']}")
    return "\n".join(lines)
