"""Spool retention: which runs may leave the disk, and removing them safely.

A run is removable only when all three hold:
- it is closed (by its trainer, or by the sidecar for a trainer that died),
- its uploader finished it in wandb (uploader.json state "finished"),
- nothing is pending (every frame in the spool was handed to wandb and kept).

Removable runs are deleted ``--retain`` after they finished. Under a
``--spool-max-bytes`` cap, removable runs are deleted earlier, oldest finished
first, until the spool is under the cap. A run with anything pending is never
deleted, whatever the cap: losing metrics is worse than a full disk, which the
sidecar survives (it stops acknowledging, clients buffer). The same rule serves
the running sidecar (from its live view) and ``kforge-sidecar gc`` (from the
spool on disk).

A run is deleted by renaming its directory out of ``runs/`` first (atomic),
then removing it: a crash half-way never leaves a run directory with some of
its files gone, which would look like a run to upload again from scratch.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spool import Spool, UploadState, dir_bytes, read_json

log = logging.getLogger("kforge_sidecar.retention")

TRASH_PREFIX = ".removed-"
_counter = itertools.count()

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float | None:
    """``7d``, ``12h``, ``30m``, ``45s``, ``1w`` or plain seconds; ``never`` is None (keep forever).

    Raises ValueError for anything else, negative values included.
    """
    t = text.strip().lower()
    if t in ("never", "forever", "inf"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", t)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 7d, 12h, 30m, 90s, 3600, or never)")
    return float(m[1]) * _UNITS.get(m[2] or "s", 1)


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1.5T``, ``4096`` (bytes; K/M/G/T are powers of 1024). Raises ValueError."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 20G, 500M, 1T, or bytes)")
    size = int(float(m[1]) * _SIZES[m[2]])
    if size <= 0:
        raise ValueError(f"{text!r}: the size must be more than 0")
    return size


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class RetentionPolicy:
    """``--retain`` and ``--spool-max-bytes`` (options.py has their defaults)."""

    retain: float | None  # seconds a finished run stays after it finished; None: forever
    max_bytes: int | None  # the spool's size cap; None: no cap


@dataclass
class Candidate:
    run_id: str
    dir: Path
    finished_at: float  # wall time the uploader finished the run
    bytes: int
    why: str = ""  # "retention" or "size cap"


@dataclass
class Plan:
    remove: list[Candidate] = field(default_factory=list)
    spool_bytes: int = 0  # before removing anything
    removable: int = 0  # runs that could be removed now (retention period or not)
    over_cap_after: bool = False  # still over the cap after the plan: nothing else may go


def removable(row: dict[str, Any]) -> bool:
    """The rule, on one row of the status view."""
    return bool(row.get("closed")) and row.get("state") == UploadState.FINISHED and row.get("pending", 1) == 0


def finished_at(run_dir: Path) -> float:
    """When the uploader finished the run: its last write of uploader.json."""
    st = read_json(run_dir / "uploader.json") or {}
    t = st.get("updated")
    if isinstance(t, (int, float)) and t > 0:
        return float(t)
    try:
        return (run_dir / "uploader.json").stat().st_mtime
    except OSError:
        return time.time()


def plan(rows: list[dict[str, Any]], spool: Spool, policy: RetentionPolicy, now: float | None = None) -> Plan:
    """What to remove now, from the status rows of every run in ``spool``."""
    now = time.time() if now is None else now
    p = Plan(spool_bytes=dir_bytes(spool.root) if policy.max_bytes is not None else 0)
    candidates = []
    for row in rows:
        if not removable(row):
            continue
        d = spool.runs_dir / row["run_id"]
        candidates.append(Candidate(row["run_id"], d, finished_at(d), dir_bytes(d)))
    candidates.sort(key=lambda c: c.finished_at)  # oldest finished first
    p.removable = len(candidates)
    left = p.spool_bytes
    for c in candidates:
        if policy.retain is not None and now - c.finished_at >= policy.retain:
            c.why = "retention"
        elif policy.max_bytes is not None and left > policy.max_bytes:
            c.why = "size cap"
        else:
            continue
        p.remove.append(c)
        left -= c.bytes
    p.over_cap_after = policy.max_bytes is not None and left > policy.max_bytes
    return p


def remove_run(spool: Spool, run_id: str) -> None:
    """Take the run out of ``runs/`` atomically, then delete it. Raises OSError."""
    src = spool.runs_dir / run_id
    trash = spool.runs_dir / f"{TRASH_PREFIX}{run_id}-{os.getpid()}-{next(_counter)}"
    os.rename(src, trash)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_trash(spool: Spool) -> None:
    """Finish removals that a crash interrupted."""
    if not spool.runs_dir.is_dir():
        return
    for p in spool.runs_dir.iterdir():
        if p.name.startswith(TRASH_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def describe(c: Candidate, policy: RetentionPolicy, now: float) -> str:
    age = format_duration(max(0.0, now - c.finished_at))
    if c.why == "retention":
        return f"run {c.run_id}: finished and uploaded {age} ago (--retain {format_duration(policy.retain)}); {format_bytes(c.bytes)}"
    return (
        f"run {c.run_id}: finished and uploaded {age} ago, the oldest such run; removed early to get "
        f"the spool under --spool-max-bytes {format_bytes(policy.max_bytes or 0)}; {format_bytes(c.bytes)}"
    )
