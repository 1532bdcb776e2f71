"""``kforge-sidecar serve``: the process that owns the socket, the spool and the uploaders.

One thread, one loop: poll the ROUTER socket, hand frames to the receiver,
group-commit, and every so often let the supervisor start or reap uploaders.
SIGTERM and SIGINT (and a ``stop`` request) drain: stop reading, make the
spool durable, give the uploaders ``drain_timeout`` to hand wandb what is
spooled, exit 0. So do ``--parent-pid`` (that process is gone) and
``--idle-timeout`` (no open or pending run and no client message for that
long), so the sidecar never outlives its job. SIGHUP reopens ``--log-file``.
Every few seconds the loop also measures the spool, applies the retention
policy (retention.py) and writes the metrics textfile (metrics.py).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from client.address import SocketDirError, ensure_socket_dir, ipc_path

from .config import ServeConfig
from .exits import EXIT_IN_USE, EXIT_OK, EXIT_UNSAFE
from .proc import pid_alive, redirect_stderr, try_lock
from .receiver import Receiver
from .retention import describe, format_bytes, format_duration, plan, remove_run, sweep_trash
from .runstate import RunState
from .spool import Spool, SpoolDirError, dir_bytes, network_filesystem, prepare_spool_dir
from .status import run_status
from .supervisor import Supervisor

log = logging.getLogger("kforge_sidecar")

SUPERVISE_EVERY = 0.2  # seconds between supervisor ticks
MEASURE_EVERY = 2.0  # seconds between measurements of the spool's size and free space
OVER_CAP_LOG_EVERY = 600.0  # seconds between warnings that the spool is over its cap
_NOBLOCK = int(zmq.NOBLOCK)
# Messages ZeroMQ queues per client before it stops reading that client's socket: a
# backlog waits in the client (which holds every frame until acked anyway), not here.
# Counted in messages, not bytes, and a small message keeps the whole receive buffer it
# was read into (8 KiB and more) alive until the loop takes it: with 1000, sixteen trainers
# at 300 steps/s parked 150 MiB in ZeroMQ's I/O thread whenever uploaders starting up
# held this loop back. A few commit intervals of traffic is all the loop needs to stay busy.
RCVHWM = 128


class StartupError(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.spool = Spool(cfg.spool_dir)
        self.receiver = Receiver(self.spool, cfg.receiver.limits, max_runs=cfg.receiver.max_runs)
        self.supervisor = Supervisor(cfg)
        self.started = time.time()
        self.stopping = False
        self._signals: list[int] = []  # caught by the handlers, acted on by the loop
        self._last_activity = time.monotonic()  # a client message, or a tick with an open or pending run
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._spool_lock_fd: int | None = None
        self._sock_path = ipc_path(cfg.address)
        self.usage: dict[str, Any] = {"bytes": None, "free_bytes": None, "network_fs": None}
        self.removed_runs = 0  # by retention or the size cap, since start
        self.removed_bytes = 0
        self.over_cap = False
        self.metrics: Any = None  # metrics.Exporter, when asked for
        self._last_measure = self._last_gc = 0.0
        self._last_over_cap_log = -1e18

    # ---------------------------------------------------------------- startup

    def _claim_address(self) -> None:
        """Refuse to steal a socket that another sidecar serves (a second ipc bind would)."""
        if self._sock_path is None:
            return  # tcp:// etc.: bind() itself fails with EADDRINUSE
        try:
            ensure_socket_dir(self._sock_path)
        except SocketDirError as exc:
            raise StartupError(str(exc), EXIT_UNSAFE) from None
        self._lock_path = self._sock_path.with_name(self._sock_path.name + ".lock")
        self._lock_fd = _lock_file(
            self._lock_path,
            "another kforge-sidecar (pid {owner}) already serves "
            f"{self.cfg.address}; use `kforge-sidecar status` to see it, or --address for a second one",
        )
        # We hold the lock, so a socket file left here belongs to a dead sidecar.
        if self._sock_path.exists():
            self._sock_path.unlink()

    def _bind(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises instead of vanishing
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)  # a memory guard; real limits are counted
        try:
            sock.bind(self.cfg.address)
        except zmq.ZMQError as exc:
            sock.close()
            raise StartupError(f"cannot bind {self.cfg.address}: {exc}", EXIT_IN_USE) from None
        if self._sock_path is not None:
            os.chmod(self._sock_path, 0o600)
        return sock

    # ---------------------------------------------------------------- loop

    def serve(self) -> int:
        self._claim_address()
        try:
            prepare_spool_dir(self.spool.root)
        except SpoolDirError as exc:
            raise StartupError(str(exc), EXIT_UNSAFE) from None
        netfs = network_filesystem(self.spool.root)
        if netfs:
            log.warning(
                "spool %s is on a network filesystem (%s): every fsync is a network round trip and "
                "other nodes share it; put it on node-local disk (--spool-dir or $KFORGE_SPOOL_DIR, e.g. /var/tmp)",
                self.spool.root, netfs,
            )  # fmt: skip
        self.usage["network_fs"] = netfs
        # One sidecar per spool: two would both recover, repair and upload the same runs.
        self._spool_lock_fd = _lock_file(
            self.spool.root / "sidecar.lock",
            "spool {path} is in use by another kforge-sidecar (pid {owner}); give each sidecar its own --spool-dir",
        )
        sweep_trash(self.spool)
        self.receiver.recover()
        if self.cfg.metrics.port is not None or self.cfg.metrics.textfile is not None:
            from .metrics import Exporter, MetricsError

            try:
                self.metrics = Exporter(self, self.cfg).start()
            except MetricsError as exc:
                raise StartupError(str(exc), EXIT_IN_USE) from None
        ctx = zmq.Context()
        sock = self._bind(ctx)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        # A file-size limit (ulimit -f) is a full disk for us: an error to report, not death.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log.info("serving on %s (spool %s, pid %d)", self.cfg.address, self.spool.root, os.getpid())
        if self.cfg.lifetime.parent_pid is not None:
            log.info("will drain and exit when process %d is gone", self.cfg.lifetime.parent_pid)
        if self.cfg.lifetime.idle_timeout is not None:
            log.info("will drain and exit after %gs idle", self.cfg.lifetime.idle_timeout)
        ret = self.cfg.retention
        log.info(
            "retention: finished and uploaded runs are removed %s%s",
            "never" if ret.retain is None else f"{format_duration(ret.retain)} after they finished",
            "" if ret.max_bytes is None else f", or earlier (oldest first) while the spool is over {format_bytes(ret.max_bytes)}",
        )  # fmt: skip
        try:
            self._loop(sock)
        finally:
            log.info("draining: spool is durable; giving uploaders %.0fs", self.cfg.lifetime.drain_timeout)
            sock.close(linger=1000)  # let the last acks and the stop reply leave
            ctx.term()
            self.supervisor.tick(self.receiver.runs)  # a last look: start uploaders for what just arrived
            self.supervisor.drain(self.cfg.lifetime.drain_timeout, self.receiver.runs)
            self._handle_signals()
            if self.metrics is not None:
                self.metrics.stop()
            self._release()
            log.info("stopped")
        return EXIT_OK

    def _loop(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_commit = 0.0
        last_tick = 0.0
        recv, handle, monotonic = sock.recv, self.receiver.handle, time.monotonic
        interval = self.cfg.receiver.commit_interval
        while not self.stopping:
            now = time.monotonic()
            timeout = SUPERVISE_EVERY
            if self.receiver.dirty:
                timeout = max(0.0, last_commit + self.cfg.receiver.commit_interval - now)
            self._handle_signals()
            if poller.poll(timeout * 1000):
                self._last_activity = started = time.monotonic()
                # Bounded by count and by time (a part may be a batch of many frames), so commits
                # and ticks still happen under load, and what waits for a commit stays small.
                for _ in range(10_000):
                    try:
                        parts = _recv_multipart(recv)
                    except zmq.Again:
                        break
                    try:
                        request = handle(parts)
                        if request is not None:
                            self.receiver.reply(parts[0], self.control(request.t))
                    except Exception as exc:  # one message's bug must not stop every trainer's frames
                        self.receiver.internal_error(exc, parts)
                    if monotonic() - started >= interval:
                        break
            now = time.monotonic()
            if self.receiver.dirty and now - last_commit >= self.cfg.receiver.commit_interval:
                self.receiver.commit(sock)
                last_commit = now
            if now - last_tick >= SUPERVISE_EVERY:
                self.receiver.reap_orphans(self.cfg.receiver.session_timeout, self.cfg.receiver.resume_grace)
                self.supervisor.tick(self.receiver.runs)
                self._housekeeping(now)
                last_tick = now
                reason = self._exit_reason(now)
                if reason:
                    log.info("%s: draining", reason)
                    self.stopping = True
        self._handle_signals()
        # Whatever was appended becomes durable and acknowledged before we go.
        if self.receiver.dirty:
            self.receiver.commit(sock)

    # Signal handlers only note the signal (and SIGTERM/SIGINT stop the loop); the loop
    # logs and acts, between two polls (at most SUPERVISE_EVERY later).

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)
        self.stopping = True

    def _on_hup(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._reopen_log()
            else:
                log.info("%s: draining", signal.Signals(signum).name)

    def _reopen_log(self) -> None:
        if self.cfg.log_file is None:
            log.info("SIGHUP: no --log-file to reopen; ignored")
            return
        try:
            redirect_stderr(self.cfg.log_file)
        except OSError as exc:
            log.error("SIGHUP: cannot reopen %s (%s); still writing to the old file", self.cfg.log_file, exc)
            return
        log.info("SIGHUP: reopened %s", self.cfg.log_file)

    # ---------------------------------------------------------------- housekeeping

    def _housekeeping(self, now: float) -> None:
        """Measure the spool, apply retention, write the metrics textfile: each on its own
        clock. A failure is logged and the sidecar keeps serving."""
        try:
            if now - self._last_measure >= MEASURE_EVERY:
                self._last_measure = now
                self._measure()
            if now - self._last_gc >= self.cfg.gc_interval:
                self._last_gc = now
                self.collect_garbage()
            if self.metrics is not None:
                self.metrics.tick(now)
        except Exception:
            log.exception("housekeeping failed; still serving")

    def _measure(self) -> None:
        self.usage["bytes"] = dir_bytes(self.spool.root)
        try:
            self.usage["free_bytes"] = shutil.disk_usage(self.spool.root).free
        except OSError:
            self.usage["free_bytes"] = None

    def collect_garbage(self) -> None:
        """Remove the runs the retention policy lets go (retention.py has the rule)."""
        policy = self.cfg.retention
        rows = self.status()["runs"]
        p = plan(rows, self.spool, policy)
        wall = time.time()
        for c in p.remove:
            run = self.receiver.runs.get(c.run_id)
            if run is None or run.dirty or c.run_id in self.supervisor.workers:
                continue  # changed since the rows were taken; the next pass looks again
            self._forget(c.run_id)
            try:
                remove_run(self.spool, c.run_id)
            except OSError as exc:
                log.error("run %s: could not remove it from the spool: %s", c.run_id, exc)
                continue
            self.removed_runs += 1
            self.removed_bytes += c.bytes
            log.info("%s: removed from the spool", describe(c, policy, wall))
        if p.remove:
            self._measure()
        self.over_cap = p.over_cap_after
        if self.over_cap and time.monotonic() - self._last_over_cap_log >= OVER_CAP_LOG_EVERY:
            self._last_over_cap_log = time.monotonic()
            log.warning(
                "spool %s is %s, over --spool-max-bytes %s, and no more runs can be removed: every run "
                "left is open or has frames not yet in wandb (never deleted); see `kforge-sidecar status`",
                self.spool.root, format_bytes(p.spool_bytes - sum(c.bytes for c in p.remove)), format_bytes(policy.max_bytes or 0),
            )  # fmt: skip

    def _forget(self, run_id: str) -> None:
        """Drop a run from memory before its directory goes: its sessions too, so a late
        frame of one gets "say hello first" (and a fresh run) rather than a dangling run."""
        run = self.receiver.runs.pop(run_id)
        run.spool.log.close()
        for sid, sess in list(self.receiver.sessions.items()):
            if sess.run_id == run_id:
                del self.receiver.sessions[sid]
        self.supervisor.forget(run_id)

    # ---------------------------------------------------------------- lifetime

    def _exit_reason(self, now: float) -> str | None:
        """Why the sidecar should drain and exit by itself now, if it should."""
        if self.cfg.lifetime.parent_pid is not None and not pid_alive(self.cfg.lifetime.parent_pid):
            return f"parent process {self.cfg.lifetime.parent_pid} is gone"
        if self.cfg.lifetime.idle_timeout is not None:
            if self._busy():
                self._last_activity = now
            elif now - self._last_activity >= self.cfg.lifetime.idle_timeout:
                return f"idle for {self.cfg.lifetime.idle_timeout:g}s (no open or pending run, no client message)"
        return None

    def _busy(self) -> bool:
        """Some run has frames wandb has not seen, or is open with a live trainer (one
        that died without closing does not hold the sidecar)."""
        for run_id, run in self.receiver.runs.items():
            st = self.supervisor.states.get(run_id)
            if st is None:
                return True  # not looked at yet
            if run.needs_upload(st):
                return True
            if not run.closed and self.receiver.has_live_trainer(run, self.cfg.receiver.session_timeout):
                return True
        return False

    def control(self, request: str) -> dict:
        """A control request (control.py): ``stop`` drains; anything else is ``status``."""
        if request == "stop":
            log.info("stop requested: draining")
            self.stopping = True
            return {"stopping": True}
        return self.status()

    def status(self) -> dict:
        return {
            "sidecar": {
                "pid": os.getpid(),
                "address": self.cfg.address,
                "spool_dir": str(self.spool.root),
                "uptime": round(time.time() - self.started, 1),
                "rejected": dict(self.receiver.rejected),
                "duplicates": self.receiver.duplicates,
                "disk_error": self.receiver.disk_error,
                "stopping": self.stopping,
                "version": _version(),
                "client_dropped": sum(r.client_dropped for r in self.receiver.runs.values()),
                "uploader_processes": len(self.supervisor.workers),
                "uploader_failures": dict(self.supervisor.failures),
                "spool": dict(self.usage),
                "retention": {
                    "retain": self.cfg.retention.retain,
                    "max_bytes": self.cfg.retention.max_bytes,
                    "removed_runs": self.removed_runs,
                    "removed_bytes": self.removed_bytes,
                    "over_cap": self.over_cap,
                },
                "metrics": self.metrics.where() if self.metrics is not None else None,
            },
            "runs": [self._run_status(run_id, run) for run_id, run in sorted(self.receiver.runs.items())],
        }

    def _run_status(self, run_id: str, run: RunState) -> dict:
        sup = self.supervisor
        worker = sup.workers.get(run_id)
        return run_status(
            run,
            sup.states.get(run_id) or run.spool.read_uploader(),
            uploader_pid=worker.proc.pid if worker else None,
            retry_in=sup.retry_in(run_id),
            restarts=sup.restarts.get(run_id, 0),
        )

    def _release(self) -> None:
        if self._sock_path is not None and self._lock_fd is not None:
            for path in (self._sock_path, self._lock_path):  # leave the socket directory clean
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._spool_lock_fd is not None:
            os.close(self._spool_lock_fd)
            self._spool_lock_fd = None


@functools.lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kforge-sidecar")
    except PackageNotFoundError:
        return "unknown"


def _recv_multipart(recv: Any) -> list[bytes]:
    """``Socket.recv_multipart(NOBLOCK)`` for the receive loop. A ROUTER message always
    starts with the sender's identity and has a part after it, so the identity is read as
    bytes (copy=True, the cheapest recv); the parts after it as frames, whose ``more`` flag
    says whether another follows (pyzmq's way is a getsockopt(RCVMORE) per part)."""
    parts = [recv(_NOBLOCK)]
    frame = recv(_NOBLOCK, copy=False)
    parts.append(frame.bytes)
    while frame.more:
        frame = recv(_NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


def _lock_file(path: Path, busy: str) -> int:
    """Hold an exclusive lock on ``path`` (with our pid in it) for the process's life.

    The kernel drops it when we die, so a crashed sidecar never blocks the next.

    The file's format is a contract: the sidecar's pid in ASCII decimal, then a newline,
    and nothing else (at most 32 bytes are read). A second sidecar names the owner from
    it, and ``deploy/slurm/epilog.sh`` reads it (``head -c 32 | tr -dc 0-9``) to SIGTERM
    the job's sidecar, then waits on the flock for it to drain; the logrotate recipe in
    deploy/README.md reads it too. Change them together.
    """
    try:
        fd = try_lock(path)
    except OSError as exc:
        raise StartupError(
            f"cannot lock {path}: {exc}; its filesystem must support flock: put the spool and the socket on "
            "node-local disk (--spool-dir, --address)",
            EXIT_UNSAFE,
        ) from None
    if fd is None:
        try:
            owner = path.read_bytes()[:32].decode(errors="replace").strip() or "?"
        except OSError:
            owner = "?"
        raise StartupError(busy.format(owner=owner, path=path.parent), EXIT_IN_USE) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def serve(cfg: ServeConfig) -> int:
    try:
        return Server(cfg).serve()
    except StartupError as exc:
        log.error("%s", exc)
        return exc.code
