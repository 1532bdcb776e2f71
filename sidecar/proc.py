"""Small process helpers shared by ``serve``, ``stop``, ``run`` and the supervisor."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc (Linux)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    return kids


def redirect_stderr(path: Path) -> None:
    """Point this process's file descriptor 2 at ``path`` (appending, 0600).

    Everything that writes to stderr follows: this process's logging, Python's
    own tracebacks, and the uploader processes started afterwards (they
    inherit fd 2). Called again on SIGHUP, after logrotate moved the file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on ``path`` (created 0600): its fd, held until the
    process closes it or dies, or None when another process holds it. Any other failure
    raises OSError: a filesystem without flock (some NFS and Lustre mounts answer ENOLCK
    or ENOSYS) must not read as "held by another process", which names no owner and
    would make a waiter wait forever."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: held
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd
