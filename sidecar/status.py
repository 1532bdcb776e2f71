"""What ``kforge-sidecar status`` shows: per run, where its frames are.

The live view comes from the sidecar over its socket; when no sidecar
answers, the same view is rebuilt from the spool on disk.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .record import first_pending_time, fold
from .runstate import RunState
from .spool import Spool, UploaderState, UploadState


def run_status(
    run: RunState,
    up: UploaderState,
    uploader_pid: int | None = None,
    retry_in: float | None = None,
    restarts: int = 0,
) -> dict[str, Any]:
    state = up.state
    if state == UploadState.FINISHED and not run.closed:
        state = UploadState.WAITING  # re-opened by a resumed session
    pending = max(0, run.received - up.uploaded)
    oldest = first_pending_time(run.spool.log, up) if pending else None
    return {
        "run_id": run.meta.run_id,
        "project": run.meta.project,
        "name": run.meta.name,
        "state": state,
        "received": run.received,
        "uploaded": up.uploaded,
        "pending": pending,
        # durable and acknowledged to the client (the receiver's state at its last commit)
        "acknowledged": _acknowledged(run),
        # how long the oldest frame not yet handed to wandb has waited (from the client's clock)
        "oldest_pending_age": None if oldest is None else round(max(0.0, time.time() - oldest), 3),
        "last_step": run.last_step,
        "closed": run.closed,
        "exit_code": run.exit_code,
        "client_dropped": run.client_dropped,
        "late": run.late,  # rows wandb cannot chart (below the run's current step in one session)
        "refused": run.refused,
        "uploader_pid": uploader_pid,
        "uploader_restarts": restarts,
        "retry_in": retry_in,
        "last_error": up.error,
        "wandb_dir": up.wandb_dir,
        "spool": str(run.spool.dir),
    }


def _acknowledged(run: RunState) -> int:
    """Durable and acknowledged: the receiver's count at its last commit."""
    return run.snapshot.record.received if run.snapshot is not None else run.received


def offline_status(spool: Spool) -> dict[str, Any]:
    """The status view read from the spool alone (no sidecar running)."""
    runs = []
    for run_id in spool.run_ids():
        rs = spool.run(run_id)
        meta = rs.read_meta()
        if meta is None:
            continue
        run = fold(rs.log, RunState(spool=rs, meta=meta))
        runs.append(run_status(run, rs.read_uploader()))
    return {"sidecar": None, "spool_dir": str(spool.root), "runs": runs}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    from .retention import format_duration

    return format_duration(seconds)


def status_view(body: dict[str, Any], show_all: bool = False) -> Group:
    """The status as rich renderables: a header, one table row per run, then per-run notes.

    By default only runs that still matter are shown: open, or with frames not yet in
    wandb, or not finished; finished-and-uploaded runs (which retention removes) need --all.
    """
    from .retention import format_bytes, removable

    parts: list[Any] = []
    sc = body.get("sidecar")
    if sc:
        head = f"sidecar pid {sc['pid']} on {sc['address']}, up {_age(sc['uptime'])}, spool {sc['spool_dir']}"
        spool = sc.get("spool") or {}
        if spool.get("bytes") is not None:
            head += f" ({format_bytes(spool['bytes'])}"
            if spool.get("free_bytes") is not None:
                head += f", {format_bytes(spool['free_bytes'])} free"
            head += ")"
        parts.append(Text(head))
        if (sc.get("metrics") or {}).get("url"):
            parts.append(Text(f"metrics: {sc['metrics']['url']}"))
        rejected = sc.get("rejected") or {}
        total = sum(rejected.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
        parts.append(Text(f"rejected frames: {total}" + (f" ({detail})" if detail else "")))
        if spool.get("network_fs"):
            parts.append(
                Text(
                    f"WARNING: the spool is on a network filesystem ({spool['network_fs']}); use node-local disk",
                    style="yellow",
                )
            )
        if (sc.get("retention") or {}).get("over_cap"):
            parts.append(
                Text(
                    "WARNING: the spool is over --spool-max-bytes and holds no run that may be removed", style="yellow"
                )
            )
        if sc.get("disk_error"):
            parts.append(Text(f"SPOOL NOT WRITABLE: {sc['disk_error']}", style="bold red"))
    else:
        parts.append(Text(f"no sidecar running; spool {body.get('spool_dir')}"))
    runs = body.get("runs") or []
    shown = runs if show_all else [r for r in runs if not removable(r)]
    if not shown:
        parts.append(Text("no runs" if not runs else "no live or pending runs"))
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        table.add_column("RUN", no_wrap=True)
        table.add_column("PROJECT/NAME", overflow="fold")
        table.add_column("STATE", no_wrap=True)
        for col in ("RECEIVED", "UPLOADED", "PENDING", "OLDEST PENDING", "LAST STEP"):
            table.add_column(col, justify="right", no_wrap=True)
        styles = {"failed": "red", "retrying": "yellow", "live": "green", "finished": "dim"}
        for r in shown:
            table.add_row(
                r["run_id"],
                f"{r['project']}/{r['name'] or '-'}",
                Text(r["state"], style=styles.get(r["state"], "")),
                str(r["received"]),
                str(r["uploaded"]),
                str(r["pending"]),
                _age(r.get("oldest_pending_age")) if r["pending"] else "-",
                "-" if r["last_step"] is None else str(r["last_step"]),
            )
        parts.append(table)
        for r in shown:
            if r.get("late"):
                parts.append(
                    Text(
                        f"{r['run_id']}: {r['late']} rows logged below the run's current step (wandb cannot chart them; kept in the spool)"
                    )
                )
            if r.get("refused"):
                parts.append(Text(f"{r['run_id']}: {r['refused']} frames refused by the sidecar (see its log)"))
            if r["last_error"]:
                retry = f" (next attempt in {r['retry_in']:.0f}s)" if r.get("retry_in") else ""
                parts.append(Text(f"{r['run_id']}: {r['last_error']}{retry}"))
            if r["wandb_dir"]:
                parts.append(Text(f"{r['run_id']}: wandb files in {r['wandb_dir']}"))
    hidden = len(runs) - len(shown)
    if hidden:
        parts.append(
            Text(
                f"{hidden} finished and uploaded run{'s' if hidden != 1 else ''} not shown (--all shows them)",
                style="dim",
            )
        )
    return Group(*parts)


def _console() -> Console:
    # Not a terminal (a pipe, a log): wide, so that nothing is wrapped or cut
    return Console() if sys.stdout.isatty() else Console(width=200, no_color=True)


def render_status(body: dict[str, Any], show_all: bool = False) -> None:
    _console().print(status_view(body, show_all))


def watch_status(fetch: Callable[[], tuple[dict[str, Any], bool]], interval: float, show_all: bool) -> int:
    """Redraw the status every ``interval`` seconds until Ctrl-C (exit 0). On a terminal it
    refreshes in place; elsewhere (a pipe, a log) it prints one view per refresh."""
    console = _console()

    def view() -> Group:
        body, _live = fetch()
        stamp = Text(time.strftime("%H:%M:%S") + f"  every {interval:g}s, Ctrl-C to stop", style="dim")
        return Group(stamp, status_view(body, show_all))

    try:
        if console.is_terminal:
            with Live(view(), console=console, auto_refresh=False, transient=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(view(), refresh=True)
        else:
            while True:
                console.print(view())
                console.print()
                sys.stdout.flush()
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
