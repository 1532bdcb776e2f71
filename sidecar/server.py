"""``kforge-sidecar serve``: the process that owns the socket, the spool and the uploaders.

One thread, one loop: poll the ROUTER socket, hand frames to the receiver,
group-commit, and every so often let the supervisor start or reap uploaders.
SIGTERM and SIGINT (and a ``stop`` request) drain: stop reading, make the
spool durable, give the uploaders ``drain_timeout`` to hand wandb what is
spooled, exit 0. So do ``--parent-pid`` (that process is gone) and
``--idle-timeout`` (no open or pending run and no client message for that
long), so the sidecar never outlives its job. SIGHUP reopens ``--log-file``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from client.address import SocketDirError, ensure_socket_dir, ipc_path

from .config import ServeConfig
from .proc import pid_alive, redirect_stderr
from .receiver import Receiver, RunState
from .spool import Spool
from .status import run_status
from .supervisor import Supervisor

log = logging.getLogger("kforge_sidecar")

SUPERVISE_EVERY = 0.2  # seconds between supervisor ticks

EXIT_OK = 0
EXIT_IN_USE = 1
EXIT_UNSAFE = 2


class StartupError(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.spool = Spool(cfg.spool_dir)
        self.receiver = Receiver(self.spool, cfg.limits, self._control, max_runs=cfg.max_runs)
        self.supervisor = Supervisor(cfg)
        self.started = time.time()
        self.stopping = False
        self._last_activity = time.monotonic()  # a client message, or a tick with an open or pending run
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._spool_lock_fd: int | None = None
        self._sock_path = ipc_path(cfg.address)

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
        sock.setsockopt(zmq.RCVHWM, 100_000)
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
        self.spool.ensure()
        # One sidecar per spool: two would both recover, repair and upload the same runs.
        self._spool_lock_fd = _lock_file(
            self.spool.root / "sidecar.lock",
            "spool {path} is in use by another kforge-sidecar (pid {owner}); give each sidecar its own --spool-dir",
        )
        self.receiver.recover()
        ctx = zmq.Context()
        sock = self._bind(ctx)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        # A file-size limit (ulimit -f) is a full disk for us: an error to report, not death.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log.info("serving on %s (spool %s, pid %d)", self.cfg.address, self.spool.root, os.getpid())
        if self.cfg.parent_pid is not None:
            log.info("will drain and exit when process %d is gone", self.cfg.parent_pid)
        if self.cfg.idle_timeout is not None:
            log.info("will drain and exit after %gs idle", self.cfg.idle_timeout)
        try:
            self._loop(sock)
        finally:
            log.info("draining: spool is durable; giving uploaders %.0fs", self.cfg.drain_timeout)
            sock.close(linger=1000)  # let the last acks and the stop reply leave
            ctx.term()
            self.supervisor.tick(self.receiver.runs)  # a last look: start uploaders for what just arrived
            self.supervisor.drain(self.cfg.drain_timeout)
            self._release()
            log.info("stopped")
        return EXIT_OK

    def _loop(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_commit = 0.0
        last_tick = 0.0
        while not self.stopping:
            now = time.monotonic()
            timeout = SUPERVISE_EVERY
            if self.receiver.dirty:
                timeout = max(0.0, last_commit + self.cfg.commit_interval - now)
            if poller.poll(timeout * 1000):
                self._last_activity = time.monotonic()
                for _ in range(10_000):  # bounded, so commits and ticks still happen under load
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.receiver.handle(parts)
                    except Exception as exc:  # one message's bug must not stop every trainer's frames
                        self.receiver.internal_error(exc, parts)
            now = time.monotonic()
            if self.receiver.dirty and now - last_commit >= self.cfg.commit_interval:
                self.receiver.commit(sock)
                last_commit = now
            if now - last_tick >= SUPERVISE_EVERY:
                self.receiver.reap_orphans(self.cfg.session_timeout, self.cfg.resume_grace)
                self.supervisor.tick(self.receiver.runs)
                last_tick = now
                reason = self._exit_reason(now)
                if reason:
                    log.info("%s: draining", reason)
                    self.stopping = True
        # Whatever was appended becomes durable and acknowledged before we go.
        if self.receiver.dirty:
            self.receiver.commit(sock)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("%s: draining", signal.Signals(signum).name)
        self.stopping = True

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        if self.cfg.log_file is None:
            log.info("SIGHUP: no --log-file to reopen; ignored")
            return
        try:
            redirect_stderr(self.cfg.log_file)
        except OSError as exc:
            log.error("SIGHUP: cannot reopen %s (%s); still writing to the old file", self.cfg.log_file, exc)
            return
        log.info("SIGHUP: reopened %s", self.cfg.log_file)

    # ---------------------------------------------------------------- lifetime

    def _exit_reason(self, now: float) -> str | None:
        """Why the sidecar should drain and exit by itself now, if it should."""
        if self.cfg.parent_pid is not None and not pid_alive(self.cfg.parent_pid):
            return f"parent process {self.cfg.parent_pid} is gone"
        if self.cfg.idle_timeout is not None:
            if self._busy():
                self._last_activity = now
            elif now - self._last_activity >= self.cfg.idle_timeout:
                return f"idle for {self.cfg.idle_timeout:g}s (no open or pending run, no client message)"
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
            if not run.closed and self.receiver.has_live_trainer(run, self.cfg.session_timeout):
                return True
        return False

    def _control(self, request: str) -> dict:
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


def _lock_file(path: Path, busy: str) -> int:
    """Hold an exclusive lock on ``path`` (with our pid in it) for the process's life.

    The kernel drops it when we die, so a crashed sidecar never blocks the next.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
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
