"""``kforge-sidecar gc``: apply the retention rule to spools on disk, now.

The rule is retention.py's, the one a running sidecar applies by itself. A
spool that a running sidecar serves is left to that sidecar: gc takes the
spool's lock for as long as it works, exactly as a sidecar does, so the two
never touch one spool at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from .proc import try_lock
from .retention import RetentionPolicy, describe, format_bytes, plan, removable, remove_run, sweep_trash
from .spool import Spool
from .status import offline_status
from .sync import spools_under


def _lock(spool: Spool) -> int | None:
    """The spool's sidecar lock, or None when a running sidecar holds it."""
    return try_lock(spool.root / "sidecar.lock")


def _owner(spool: Spool) -> str:
    try:
        return (spool.root / "sidecar.lock").read_text().strip() or "?"
    except OSError:
        return "?"


def collect(root: Path, policy: RetentionPolicy, dry_run: bool) -> int:
    """Remove (or, dry, list) what the policy lets go. 0 unless a spool could not be looked at."""
    now = time.time()
    code = 0
    removed = freed = kept_pending = kept_open = 0
    for spool in spools_under(root):
        try:
            fd = None if dry_run else _lock(spool)
        except OSError as exc:
            typer.echo(f"spool {spool.root}: cannot lock it: {exc}; skipped", err=True)
            code = 1
            continue
        if not dry_run and fd is None:
            typer.echo(
                f"spool {spool.root}: served by a running kforge-sidecar (pid {_owner(spool)}), which applies "
                "its own --retain and --spool-max-bytes; skipped",
                err=True,
            )
            code = 1
            continue
        try:
            if not dry_run:
                sweep_trash(spool)
            rows = offline_status(spool)["runs"]
            for row in rows:
                if not removable(row):
                    if row["pending"]:
                        kept_pending += 1
                    else:
                        kept_open += 1
            p = plan(rows, spool, policy, now)
            for c in p.remove:
                if not dry_run:
                    try:
                        remove_run(spool, c.run_id)
                    except OSError as exc:
                        typer.echo(f"run {c.run_id}: could not remove {c.dir}: {exc}", err=True)
                        code = 1
                        continue
                removed += 1
                freed += c.bytes
                typer.echo(f"{'would remove' if dry_run else 'removed'} {describe(c, policy, now)}")
            if p.over_cap_after:
                typer.echo(
                    f"spool {spool.root}: still over --spool-max-bytes {format_bytes(policy.max_bytes or 0)}; "
                    "every run left is open or has frames pending (never removed)",
                    err=True,
                )
        finally:
            if fd is not None:
                os.close(fd)
    verb = "would remove" if dry_run else "removed"
    typer.echo(
        f"{verb} {removed} run{'s' if removed != 1 else ''} ({format_bytes(freed)}); kept "
        f"{kept_pending} with frames pending and {kept_open} not finished in wandb"
    )
    return code
