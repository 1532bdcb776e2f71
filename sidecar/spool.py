"""The spool: the on-disk queue between the receiver and the uploaders.

Layout, one directory per run (directories 0700, files 0600)::

    <spool>/runs/<run_id>/
        meta.json      RunMeta: project, name, config; written once by the receiver
        frames.log     append-only records, each: u32 length, u32 crc32, payload
        uploader.json  UploaderState: the uploader's cursor and state, written by it alone
        uploader.heartbeat  Heartbeat: the uploader's pid; its mtime is the last beat

A payload is bytes to the spool: the client's validated frame, byte for byte
(record.py is what reads them as messages; the spool imports nothing of the
wire format). The receiver is the only writer of frames.log; it fsyncs in groups and only then
acknowledges. A crash mid-write leaves a torn tail (short record or bad CRC),
which ``RunLog.repair`` cuts on the next start. Readers (the uploader, sync,
status) stop quietly at an incomplete tail: the writer may still be writing it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from client.ids import RUN_ID_RE

from .proc import try_lock

log = logging.getLogger("kforge_sidecar.spool")

HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_pack_header = HEADER.pack
MAX_RECORD = 16 * 1024 * 1024  # larger lengths can only be garbage
READ_BLOCK = 1024 * 1024  # readers read frames.log in blocks of this size


def default_spool_dir() -> Path:
    """$KFORGE_SPOOL_DIR, else ``/var/tmp/kforge-sidecar-<uid>/spool``.

    Node-local on typical clusters: home directories (and ``$XDG_STATE_HOME`` in
    them) are usually NFS, GPFS or Lustre, where every group-commit fsync is a
    network round trip, and which every node shares. /var/tmp rather than /tmp:
    it survives a reboot (what was not uploaded is still there) and is rarely a
    small tmpfs. Older versions spooled under ``legacy_spool_root()``;
    ``kforge-sidecar sync --spool-dir`` still finds those spools.
    """
    env = os.environ.get("KFORGE_SPOOL_DIR")
    if env:
        return Path(env)
    base = Path("/var/tmp") if os.path.isdir("/var/tmp") else Path(tempfile.gettempdir())
    return base / f"kforge-sidecar-{os.getuid()}" / "spool"


def legacy_spool_root() -> Path:
    """Where versions before 0.2 spooled (one ``spool-<hostname>`` per host below it)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "kforge-sidecar"


class SpoolDirError(RuntimeError):
    """The spool directory cannot be used; the message says why and what to do."""


def prepare_spool_dir(root: Path) -> None:
    """Create the spool (0700) or check an existing one: a directory, ours, writable.

    Raises SpoolDirError with one line a user can act on.
    """
    hint = "choose another with --spool-dir or $KFORGE_SPOOL_DIR"
    uid = os.getuid()
    existed = root.exists()
    if existed and not root.is_dir():
        raise SpoolDirError(f"spool directory {root} is a file, not a directory; {hint}")
    if existed:  # before touching it: someone else's directory is refused, not chmod-ed
        for path, allowed in ((root, (uid,)), (root.parent, (uid, 0))):
            owner = path.stat().st_uid
            if owner not in allowed:
                raise SpoolDirError(f"spool directory {path} belongs to uid {owner}, not to you (uid {uid}); {hint}")
    try:
        Spool(root).ensure()
    except OSError as exc:
        what = "cannot use" if existed else "cannot create"
        raise SpoolDirError(f"{what} spool directory {root}: {exc.strerror or exc}; {hint}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root / "runs")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SpoolDirError(f"spool directory {root} is not writable: {exc.strerror or exc}; {hint}") from None


# Filesystems where a spool is shared between nodes and fsync is a network round trip.
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs", "beegfs",
        "ceph", "fuse.ceph-fuse", "glusterfs", "fuse.glusterfs", "panfs", "pvfs2", "orangefs",
        "wekafs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "davfs",
    }
)  # fmt: skip


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def network_filesystem(path: Path, mounts: str | None = None) -> str | None:
    """``"<fstype> at <mount point>"`` when ``path`` is on a network filesystem, else None.

    ``mounts`` is the text of /proc/mounts (read when not given); the mount
    that holds ``path`` is the longest mount point that is a prefix of it.
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point, fstype = _unescape_mount(parts[1]), parts[2]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    if best is not None and best[1] in NETWORK_FS:
        return f"{best[1]} at {best[0]}"
    return None


def dir_bytes(path: Path) -> int:
    """Bytes in the files below ``path`` (allocated size, as `du` counts)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass  # removed meanwhile
    return total


def write_json_atomic(path: Path, obj: Any, durable: bool = True) -> None:
    """Replace ``path`` with ``obj`` as JSON: readers see the old or the new file, never half.

    ``durable=False`` skips the fsync: after a machine crash the old version may come back.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(obj, separators=(",", ":")).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _from_dict(cls: type, data: dict) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunMeta:
    run_id: str
    project: str
    name: str | None
    config: dict[str, Any]
    host: str
    wandb_init: dict[str, Any] = field(default_factory=dict)  # per-run wandb.init options
    created: float = field(default_factory=time.time)
    pid: int | None = None  # the first trainer's pid (wandb samples its CPU and memory)
    process: dict[str, Any] = field(default_factory=dict)  # its program, args, cwd, git (protocol.PROCESS_KEYS)


class UploadState(str, Enum):
    """A run's upload state, as ``uploader.json`` stores it (the string values are on disk
    and in ``status``): written by the uploader, read by the supervisor, the server,
    ``status``, ``sync``, retention and the metrics."""

    WAITING = "waiting"  # no wandb run open (yet, or between segments)
    INITIALIZING = "initializing"  # inside wandb.init
    LIVE = "live"  # frames go to wandb
    RETRYING = "retrying"  # a transient failure: a fresh uploader retries after a backoff
    FAILED = "failed"  # the sentinel: a permanent failure (`kforge-sidecar sync` retries it)
    FINISHED = "finished"  # the run is closed and finished in wandb

    # a plain string in every other respect: "live", not "UploadState.LIVE", and the same
    # dict key as "live" (Enum hashes by name)
    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


@dataclass
class UploaderState:
    """The uploader's cursor and health. ``offset`` is a byte offset into frames.log
    up to which every record has been handed to wandb."""

    state: UploadState = UploadState.WAITING
    offset: int = 0  # the restart point: everything before it is kept by wandb
    trusted: int = 0  # metrics frames before ``offset``
    clock: dict[str, Any] | None = None  # the StepClock at ``offset`` (sidecar/steps.py)
    step_offset: int = 0  # wandb's _step minus the trainer's step (a resume on a server without rewind)
    rewind_refused: bool = False  # this run's backend has no rewind: resumes are appended
    config: dict[str, Any] = field(default_factory=dict)  # config after the first hello (updates, resumed hellos)
    uploaded: int = 0  # metrics frames handed to wandb (>= trusted)
    late: int = 0  # rows wandb could not place (below the run's current step), not handed
    last_step: int | None = None
    error: str | None = None
    wandb_dir: str | None = None  # where wandb keeps the run's files
    updated: float = 0.0  # wall time of the last write (after a finish: when it finished)
    # Files of older versions also hold "pid" and "busy_until" (the heartbeat, before it had
    # a file of its own): ignored when read.


@dataclass
class Heartbeat:
    """uploader.heartbeat: written by the uploader, watched by the supervisor. The uploader
    touches it every ``UploaderConfig.heartbeat`` seconds from its main loop, busy or idle;
    an uploader whose file goes stale (outside ``busy_until``) is wedged."""

    pid: int | None = None  # the uploader that beats
    busy_until: float | None = None  # inside init/finish: no beat expected until then
    at: float = 0.0  # the last beat: the file's mtime (not stored in it)


@dataclass(slots=True)
class Record:
    offset: int  # where the record starts
    end: int  # where the next one starts
    payload: bytes


class RunLog:
    """frames.log: append-only, length- and CRC-framed records."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._buf = bytearray()  # records appended since the last write (see ``append``)

    # -- writer side (the receiver only)

    def open_for_append(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._buf = bytearray()

    def append(self, payload: bytes) -> None:
        """Add one record. It is held in memory and written by the next ``write`` (or
        ``sync``): one write per group commit, not one per record. Nothing reads a
        record before it is written, and nothing is acknowledged before ``sync``."""
        assert self._fd is not None, "log not open for append"
        buf = self._buf
        buf += _pack_header(len(payload), zlib.crc32(payload))
        buf += payload

    @property
    def unwritten(self) -> int:
        """Bytes appended and not yet written."""
        return len(self._buf)

    def write(self) -> None:
        """Write the records appended so far (not durable until ``sync``). Raises OSError
        (disk full, ...); the records are gone then, and the log ends where it ended
        before: its writer rolls back to its last commit (commit.py)."""
        data, self._buf = self._buf, bytearray()
        if not data or self._fd is None:
            return
        written = os.write(self._fd, data)
        if written != len(data):  # a short write on a full disk: cut it so the log stays framed
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write)")

    def sync(self) -> None:
        """Write what was appended and make it durable. Raises OSError as ``write``."""
        if self._fd is not None:
            self.write()
            os.fdatasync(self._fd)

    def discard(self) -> None:
        """Forget the records appended and not yet written."""
        self._buf = bytearray()

    def close(self) -> None:
        """Write what was appended (not durable) and close."""
        if self._fd is not None:
            try:
                self.write()
            finally:
                os.close(self._fd)
                self._fd = None

    def repair(self) -> int:
        """Cut a torn tail left by a crash. Returns the number of bytes cut.

        Only the writer calls this, before it appends anything.
        """
        good = 0
        for rec in self.records(0, strict=True):
            good = rec.end
        size = self.path.stat().st_size if self.path.exists() else 0
        if size > good:
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
            log.warning("spool %s: cut a torn tail of %d bytes at offset %d", self.path, size - good, good)
        return size - good

    # -- reader side (anyone)

    def records(self, offset: int = 0, strict: bool = False) -> Iterator[Record]:
        """Records from ``offset`` on; stops at the first incomplete one.

        A record whose CRC does not match ends the iteration too: with
        ``strict`` (repair) it is treated as the torn tail; otherwise it is
        logged, since a concurrent writer never leaves one behind.
        """
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(offset)
            # Read in big blocks (a buffered read returns all it asks for, short only at the
            # end) and cut records out of them: a drain reads millions.
            # ``pos`` is the file offset of buf[i].
            buf, i, pos = b"", 0, offset
            unpack, size, crc32 = HEADER.unpack_from, HEADER.size, zlib.crc32
            while True:
                if len(buf) - i < size:
                    buf, i = buf[i:] + f.read(READ_BLOCK), 0
                    if len(buf) < size:
                        return
                length, crc = unpack(buf, i)
                if length > MAX_RECORD:
                    if not strict:
                        log.error("spool %s: impossible record length %d at offset %d", self.path, length, pos)
                    return
                end = i + size + length
                if end > len(buf):
                    buf, i = buf[i:] + f.read(max(READ_BLOCK, size + length - (len(buf) - i))), 0
                    end = size + length
                    if end > len(buf):
                        return
                payload = buf[i + size : end]
                if crc32(payload) != crc:
                    if not strict:
                        log.error("spool %s: CRC mismatch at offset %d", self.path, pos)
                    return
                i = end
                yield Record(pos, pos + size + length, payload)
                pos += size + length

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


class RunSpool:
    """One run's directory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.run_id = directory.name
        self.log = RunLog(directory / "frames.log")

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    @property
    def uploader_path(self) -> Path:
        return self.dir / "uploader.json"

    def read_meta(self) -> RunMeta | None:
        data = read_json(self.meta_path)
        return _from_dict(RunMeta, data) if data else None

    def write_meta(self, meta: RunMeta) -> None:
        write_json_atomic(self.meta_path, asdict(meta))

    @property
    def heartbeat_path(self) -> Path:
        return self.dir / "uploader.heartbeat"

    @property
    def lock_path(self) -> Path:
        """uploader.lock: the run's one uploader holds it (flock) while it runs."""
        return self.dir / "uploader.lock"

    def lock(self) -> int | None:
        """Take the run's uploader lock (its fd, held until closed or the process dies), or
        None when an uploader already holds it: one uploader per run, even across a sidecar
        restart that left an old one behind."""
        return try_lock(self.lock_path)

    def uploader_running(self) -> bool:
        """Whether an uploader (any process's) holds the run's lock now. A lock that cannot
        be taken at all says no: the uploader started then says why, in its own log."""
        try:
            fd = self.lock()
        except OSError:
            return False
        if fd is None:
            return True
        os.close(fd)
        return False

    def write_heartbeat(self, hb: Heartbeat) -> None:
        """A beat with new contents (a new pid, or busy_until set or cleared)."""
        write_json_atomic(self.heartbeat_path, {"pid": hb.pid, "busy_until": hb.busy_until}, durable=False)

    def beat(self) -> None:
        """A beat: the file's mtime is now."""
        try:
            os.utime(self.heartbeat_path)
        except FileNotFoundError:  # removed under us (never, but not worth dying of)
            self.write_heartbeat(Heartbeat(pid=os.getpid()))

    def read_heartbeat(self) -> Heartbeat:
        """The last beat; ``Heartbeat()`` (at 0) when there is none."""
        data = read_json(self.heartbeat_path) or {}
        try:
            at = self.heartbeat_path.stat().st_mtime
        except FileNotFoundError:
            return Heartbeat()
        return Heartbeat(pid=data.get("pid"), busy_until=data.get("busy_until"), at=at)

    def read_uploader(self) -> UploaderState:
        data = read_json(self.uploader_path)
        if not data:
            return UploaderState()
        state = _from_dict(UploaderState, data)
        try:
            state.state = UploadState(state.state)
        except ValueError:  # not one of ours: shown as it is, acted on as none of them
            pass
        return state

    def write_uploader(self, state: UploaderState) -> None:
        # Rewritten up to twice a second: no fsync. A cursor that goes back
        # after a machine crash only replays frames, it never skips any.
        state.updated = time.time()
        write_json_atomic(self.uploader_path, asdict(state), durable=False)


class Spool:
    """The spool root: ``<root>/runs/<run_id>/``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def ensure(self) -> None:
        """Create the spool 0700 (the writer's job; readers never create it)."""
        for d in (self.root, self.runs_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def run_ids(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir() and RUN_ID_RE.match(p.name))

    def run(self, run_id: str) -> RunSpool:
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        return RunSpool(self.runs_dir / run_id)

    def create_run(self, meta: RunMeta) -> RunSpool:
        run = self.run(meta.run_id)
        run.dir.mkdir(mode=0o700, exist_ok=True)
        run.write_meta(meta)
        _fsync_dir(self.runs_dir)
        return run


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
