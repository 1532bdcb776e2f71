"""``kforge-sidecar sync``: upload what runs left in the spool, from any machine.

For runs that failed (the sentinel), were interrupted, or were spooled on a
cluster without network: each run gets a fresh uploader process in sync mode
(retries a failed run, stops at the end of the log, finishes the run), and a
progress bar fed by its cursor. The cursor makes it idempotent: a second sync
finds nothing left and uploads nothing twice.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import options
from .config import UploaderConfig
from .exits import EXIT_DONE, EXIT_LOCKED
from .record import fold, pending_frames
from .spool import RunSpool, Spool, UploadState
from .supervisor import uploader_argv


@dataclass
class Pending:
    run: RunSpool
    frames: int  # metrics frames after the cursor
    closed: bool  # closed by its trainer, but not finished in wandb yet


def pending(run: RunSpool) -> Pending:
    st = run.read_uploader()
    closed = fold(run.log, on_bad=None).closed
    return Pending(run, pending_frames(run.log, st.offset), closed and st.state != UploadState.FINISHED)


def spools_under(root: Path, depth: int = 3) -> list[Spool]:
    """The spool at ``root``, or every spool below it: per-job spools (``job-N/``, and
    ``job-N/NODE/`` from the batch script) sync from their common root."""
    if (root / "runs").is_dir():
        return [Spool(root)]
    if depth == 0 or not root.is_dir():
        return []
    return [s for d in sorted(root.iterdir()) if d.is_dir() for s in spools_under(d, depth - 1)]


def sync(root: Path, run_ids: list[str], init_timeout: float, finish_timeout: float, log_level: str) -> int:
    """Upload the given runs (default: every run with something left) from the spool at
    ``root`` or the spools below it. 0 if all of it got out."""
    console = Console(stderr=True)
    runs: dict[str, RunSpool] = {}
    for spool in spools_under(root):
        for run_id in spool.run_ids():
            runs.setdefault(run_id, spool.run(run_id))  # run IDs are unique across spools
    missing = [r for r in run_ids if r not in runs]
    for r in missing:
        console.print(f"run {r}: not in spool {root}")
    todo = []
    for run_id in run_ids or sorted(runs):
        if run_id in missing:
            continue
        p = pending(runs[run_id])
        if p.frames or p.closed:
            todo.append(p)
        elif run_ids:
            console.print(f"run {run_id}: nothing to upload")
    if not todo:
        console.print(f"nothing to upload in {root}")
        return 1 if missing else 0

    ok = not missing
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for p in todo:
            before = p.run.read_uploader().uploaded
            task = progress.add_task(f"run {p.run.run_id}", total=p.frames)
            cfg = UploaderConfig(
                run_dir=p.run.dir, init_timeout=init_timeout, finish_timeout=finish_timeout, log_level=log_level,
                flush_interval=options.default("flush_interval"), drain_timeout=options.default("drain_timeout"),
                system_metrics=options.default("system_metrics"), sync=True,
            )  # fmt: skip
            proc = subprocess.Popen(uploader_argv(cfg), stdin=subprocess.DEVNULL)
            while proc.poll() is None:
                time.sleep(0.2)
                progress.update(task, completed=max(0, p.run.read_uploader().uploaded - before))
            st = p.run.read_uploader()
            progress.update(task, completed=max(0, st.uploaded - before))
            if proc.returncode == EXIT_LOCKED:
                progress.console.print(
                    f"run {p.run.run_id}: an uploader holds it (is a sidecar serving this spool?); skipped"
                )
                ok = False
            elif proc.returncode != EXIT_DONE or st.state in (UploadState.FAILED, UploadState.RETRYING):
                progress.console.print(
                    f"run {p.run.run_id}: not uploaded: {st.error or f'exit code {proc.returncode}'}"
                )
                ok = False
            else:
                where = f" ({st.wandb_dir})" if st.wandb_dir else ""
                progress.console.print(f"run {p.run.run_id}: {st.uploaded - before} frames uploaded, {st.state}{where}")
    return 0 if ok else 1
