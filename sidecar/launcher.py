"""``kforge-sidecar run [serve options] -- COMMAND``: run a training command under a sidecar.

1. Use the sidecar already serving the address if there is one (then it is
   neither started nor stopped here); else start ``kforge-sidecar serve`` in
   its own session, with ``--parent-pid`` of this process, and wait until it
   answers.
2. Run COMMAND in this process group with ``KFORGE_SIDECAR_ADDR`` exported.
3. SIGTERM or SIGINT to ``run`` goes to COMMAND first (a SIGINT typed at the
   terminal already reached COMMAND, which is in the foreground group, so it
   is not sent twice); ``run`` keeps waiting for COMMAND to finish its own
   shutdown (checkpoint, ``MetricsClient.close()``).
4. When COMMAND has exited, SIGTERM the sidecar started here: it drains (the
   spool is durable; uploaders hand wandb what is spooled) and exits.

Exit status: COMMAND's, 128+N if signal N killed it, 125 if no sidecar could
be started, 127 if COMMAND was not found, 126 if it could not be executed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from client.address import ENV_ADDRESS, default_socket_dir

from . import options
from .config import ServeConfig
from .control import serving
from .exits import EXIT_CANNOT_EXECUTE, EXIT_IN_USE, EXIT_NO_SIDECAR, EXIT_NOT_FOUND
from .proc import pid_alive
from .spool import default_spool_dir

log = logging.getLogger("kforge_sidecar.run")

READY_TIMEOUT = 30.0  # seconds a new sidecar gets to answer
STOP_MARGIN = 15.0  # seconds beyond --drain-timeout for the sidecar to exit


def job_address(environ: dict[str, str] = os.environ) -> str | None:  # type: ignore[assignment]
    """Inside a SLURM job, with no address given: one socket per job, so that two jobs of
    the same user on one node do not share (and stop) one sidecar."""
    job = environ.get("SLURM_JOB_ID")
    if job and not environ.get(ENV_ADDRESS):
        return f"ipc://{default_socket_dir() / f'sidecar-job{job}.sock'}"
    return None


def job_spool_dir(environ: dict[str, str] = os.environ) -> Path | None:  # type: ignore[assignment]
    """Inside a SLURM job, with no spool given: one spool per job (a spool serves one
    sidecar, and two jobs of one user can share a node). `kforge-sidecar sync` finds it
    under the default spool directory."""
    job = environ.get("SLURM_JOB_ID")
    if job and not environ.get("KFORGE_SPOOL_DIR"):
        return default_spool_dir() / f"job-{job}"
    return None


def serve_argv(cfg: ServeConfig) -> list[str]:
    """The ``serve`` command line of a sidecar process configured as ``cfg``."""
    return [sys.executable, "-m", "sidecar", "serve", *options.argv(cfg)]


class Launcher:
    def __init__(self, cfg: ServeConfig, command: list[str]):
        self.cfg = cfg
        self.command = command
        self.child: subprocess.Popen | None = None
        self.sidecar: subprocess.Popen | None = None  # only one that we started
        self.signals: list[int] = []  # every SIGTERM/SIGINT received
        self._unhandled: list[int] = []  # those the main loop has not acted on yet
        self._tty: int | None = None

    def run(self) -> int:
        if shutil.which(self.command[0]) is None:
            log.error("%s: command not found (or not executable)", self.command[0])
            return EXIT_NOT_FOUND
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
        except OSError:
            self._tty = None  # no controlling terminal (batch job, service)
        try:
            if not self._ensure_sidecar():
                return EXIT_NO_SIDECAR
            self._handle_signals()
            if self.signals:  # told to stop before COMMAND began
                return 128 + self.signals[0]
            try:
                self.child = subprocess.Popen(self.command, env={**os.environ, ENV_ADDRESS: self.cfg.address})
            except OSError as exc:
                log.error("cannot run %s: %s", self.command[0], exc)
                return EXIT_CANNOT_EXECUTE
            code = self._wait(self.child)
            return 128 - code if code < 0 else code
        finally:
            self._stop_sidecar()
            if self._tty is not None:
                os.close(self._tty)

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """The handler: notes the signal; the main loop acts on it (_handle_signals)."""
        self.signals.append(signum)
        self._unhandled.append(signum)

    def _wait(self, proc: subprocess.Popen, timeout: float | None = None) -> int:
        """proc.wait(), acting on signals meanwhile. Raises TimeoutExpired as wait() does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._handle_signals()
            code = proc.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout or 0)
            time.sleep(0.02)

    def _handle_signals(self) -> None:
        while self._unhandled:
            self._act_on(self._unhandled.pop(0))

    def _act_on(self, signum: int) -> None:
        name = signal.Signals(signum).name
        child = self.child
        if child is None:
            log.info("%s: not starting %s", name, self.command[0])
        elif child.returncode is not None:
            log.info("%s: already draining the sidecar (up to %gs)", name, self.cfg.lifetime.drain_timeout)
        elif signum == signal.SIGINT and self._from_terminal():
            log.info("SIGINT from the terminal: %s got it too; waiting for it to exit", self.command[0])
        else:
            log.info("%s: forwarding to %s (pid %d); waiting for it to exit", name, self.command[0], child.pid)
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    def _from_terminal(self) -> bool:
        """True when our process group is the terminal's foreground group: a typed
        Ctrl-C went to every process in it, COMMAND included."""
        if self._tty is None:
            return False
        try:
            return os.tcgetpgrp(self._tty) == os.getpgrp()
        except OSError:
            return False

    # ---------------------------------------------------------------- sidecar

    def _ensure_sidecar(self) -> bool:
        addr = self.cfg.address
        found = serving(addr)
        if found is not None and found.get("stopping"):
            log.info("the sidecar on %s (pid %d) is draining; waiting for it to exit", addr, found["pid"])
            _wait_gone(found["pid"], self.cfg.lifetime.drain_timeout + STOP_MARGIN)
            found = None
        if found is not None:
            log.info("using the sidecar already serving %s (pid %d); it stays running", addr, found["pid"])
            return True
        argv = serve_argv(replace(self.cfg, lifetime=replace(self.cfg.lifetime, parent_pid=os.getpid())))
        # Its own session: a Ctrl-C at the terminal or a signal to our process group must not
        # stop it before COMMAND has closed its client; we stop it once COMMAND has exited.
        self.sidecar = proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), start_new_session=True
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self.signals:
            code = proc.poll()
            if code is not None:
                self.sidecar = None
                if code == EXIT_IN_USE and (found := serving(addr)) is not None:  # another `run` got there first
                    log.info("using the sidecar that just started on %s (pid %d); it stays running", addr, found["pid"])
                    return True
                log.error("the sidecar exited with code %d before serving %s; see its log above", code, addr)
                return False
            found = serving(addr, 0.5)
            if found is not None and found.get("pid") == proc.pid:
                log.info("started a sidecar on %s (pid %d)", addr, proc.pid)
                return True
            time.sleep(0.05)
        if not self.signals:
            log.error("the sidecar (pid %d) did not answer on %s within %.0fs", proc.pid, addr, READY_TIMEOUT)
            return False
        return True  # signalled while waiting: run() sees it and stops the sidecar

    def _stop_sidecar(self) -> None:
        proc, self.sidecar = self.sidecar, None
        if proc is None:
            return
        code = proc.poll()
        if code is not None:
            log.warning(
                "the sidecar (pid %d) exited early (code %d); what it had not uploaded waits in the spool",
                proc.pid,
                code,
            )
            return
        log.info("draining the sidecar (pid %d, up to %gs)", proc.pid, self.cfg.lifetime.drain_timeout)
        proc.send_signal(signal.SIGTERM)
        try:
            code = self._wait(proc, self.cfg.lifetime.drain_timeout + STOP_MARGIN)
        except subprocess.TimeoutExpired:
            log.error("the sidecar (pid %d) did not exit in time; killing it (frames stay in the spool)", proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its session: the uploaders go too
            except ProcessLookupError:
                pass
            proc.wait()
            return
        if code == 0:
            log.info("sidecar drained and stopped")
        else:
            log.warning("the sidecar exited with code %d", code)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_command(cfg: ServeConfig, command: list[str]) -> int:
    return Launcher(cfg, command).run()
