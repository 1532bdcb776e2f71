"""The ``kforge-sidecar`` command line."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, List, NoReturn, Optional

import typer

from client.address import ENV_ADDRESS, resolve_address

from .config import ServeConfig
from .control import ControlRefused
from .control import request as control_request
from .exits import EXIT_NOT_FOUND, EXIT_USAGE
from .proc import pid_alive as _alive
from .retention import DEFAULT_RETAIN, RetentionPolicy, parse_duration, parse_size
from .spool import Spool, default_spool_dir

PROG = "kforge-sidecar"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Out-of-process Weights & Biases metrics for training jobs.",
)


def fail(message: str, code: int = 1, command: str = "") -> NoReturn:
    """One line on stderr, naming the fix, and a non-zero exit."""
    typer.echo(f"{PROG}{' ' + command if command else ''}: {message}", err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------ option checks (at parse time)


def _number(lo: float, strict: bool = False) -> Callable:
    def check(value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, not {value}")
        if value < lo or (strict and value == lo):
            raise typer.BadParameter(f"must be {'>' if strict else '>='} {lo:g} (got {value:g})")
        return value

    return check


_nonneg = _number(0)
_positive = _number(0, strict=True)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[\w.*-]+):\d{1,5}$")


def check_address(address: str) -> str:
    """A ZeroMQ address the sidecar can serve and clients can reach: ipc://PATH or
    tcp://HOST:PORT. Raises BadParameter with the spelling that was probably meant."""
    if address.startswith("ipc://") and len(address) > len("ipc://"):
        return address
    if address.startswith("tcp://") and _HOST_PORT.match(address[len("tcp://") :]):
        return address
    if address.startswith("tcp://"):
        raise typer.BadParameter(f"{address!r} has no port; write tcp://HOST:PORT")
    if "://" in address:
        raise typer.BadParameter(f"{address!r}: only ipc:// and tcp:// addresses reach another process")
    if _HOST_PORT.match(address) and not address.endswith(".sock"):
        raise typer.BadParameter(f"{address!r} is not a ZeroMQ address; write tcp://{address}")
    raise typer.BadParameter(f"{address!r} is not a ZeroMQ address; for a socket file write ipc://{address}")


def _address_opt(value: Optional[str]) -> Optional[str]:
    return None if value is None else check_address(value)


def _address(address: Optional[str]) -> str:
    """--address, else $KFORGE_SIDECAR_ADDR, else the per-user socket; checked."""
    resolved = resolve_address(address)
    if address is None and os.environ.get(ENV_ADDRESS):
        try:
            check_address(resolved)
        except typer.BadParameter as exc:
            raise typer.BadParameter(exc.message, param_hint=f"${ENV_ADDRESS}") from None
    return resolved


def _duration(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _size(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _port(value: Optional[int]) -> Optional[int]:
    if value is not None and not 0 <= value <= 65535:
        raise typer.BadParameter(f"{value} is not a TCP port (0-65535; 0 picks a free one)")
    return value


def _pid(value: Optional[int]) -> Optional[int]:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not a process id")
    if value is not None and not _alive(value):
        raise typer.BadParameter(f"no process {value} is running (the sidecar would exit at once)")
    return value


def _textfile(value: Optional[Path]) -> Optional[Path]:
    from .metrics import textfile_path_problem

    if value is not None and (problem := textfile_path_problem(value)):
        raise typer.BadParameter(problem)
    return value


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        def v(dist: str) -> str:
            try:
                return version(dist)
            except PackageNotFoundError:
                return "not installed"

        typer.echo(f"{PROG} {v('kforge-sidecar')} (wandb {v('wandb')}, Python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Out-of-process Weights & Biases metrics for training jobs."""


AddressOpt = typer.Option(None, "--address", "-a", callback=_address_opt, help="ZeroMQ address, ipc://PATH or tcp://HOST:PORT (default: $KFORGE_SIDECAR_ADDR, else a per-user ipc socket).")
SpoolOpt = typer.Option(None, "--spool-dir", readable=False, help="Spool directory (default: $KFORGE_SPOOL_DIR, else /var/tmp/kforge-sidecar-$UID/spool: node-local).")
# serve's options, shared with `run` (which passes them on to the sidecar it starts)
LogLevelOpt = typer.Option("INFO", "--log-level", callback=_log_level, help="DEBUG, INFO, WARNING or ERROR.")
DrainOpt = typer.Option(30.0, "--drain-timeout", callback=_nonneg, help="Seconds uploaders get to drain on SIGTERM or stop.")
InitOpt = typer.Option(60.0, "--init-timeout", callback=_positive, help="Seconds one wandb.init may take.")
FinishOpt = typer.Option(60.0, "--finish-timeout", callback=_positive, help="Seconds wandb finish may take.")
CommitOpt = typer.Option(5.0, "--commit-interval-ms", callback=_nonneg, help="Group commit: at most one fsync per run per interval.")
LogFileOpt = typer.Option(None, "--log-file", dir_okay=False, help="Append the sidecar's log (and its uploaders') here instead of stderr; SIGHUP reopens it (logrotate).")
HeartbeatOpt = typer.Option(30.0, "--heartbeat-timeout", callback=_positive, help="Kill and restart an uploader silent this long (wedged wandb).")
BackoffOpt = typer.Option(2.0, "--retry-backoff", callback=_positive, help="First delay before a failed upload is retried; doubles per failure.")
BackoffMaxOpt = typer.Option(60.0, "--retry-backoff-max", callback=_positive, help="Longest delay between upload retries.")
SessionOpt = typer.Option(60.0, "--session-timeout", callback=_positive, help="A client silent this long is presumed dead (idle clients ping every 5 s; a dead pid on this host counts at once).")
GraceOpt = typer.Option(300.0, "--resume-grace", callback=_nonneg, help="Seconds a run whose trainer died waits for a resume before it is finished as failed.")
FlushOpt = typer.Option(1.0, "--wandb-flush-interval", callback=_positive, help="wandb-core's transaction log flush interval (bounds replays after a kill).")
RetainOpt = typer.Option("7d", "--retain", callback=_duration, metavar="DURATION", help="Remove runs from the spool this long after they finished and were fully uploaded: 7d, 12h, 30m, 90s, or never. A run with anything pending is never removed.")
MaxBytesOpt = typer.Option(None, "--spool-max-bytes", callback=_size, metavar="SIZE", help="Size cap for the spool (e.g. 20G): over it, finished and uploaded runs are removed before --retain, oldest first. Never a run with anything pending.")
GcIntervalOpt = typer.Option(10.0, "--gc-interval", callback=_positive, hidden=True, help="Seconds between retention passes.")
MetricsPortOpt = typer.Option(None, "--metrics-port", callback=_port, help="Serve Prometheus/OpenMetrics health metrics on this port (off by default; 0 picks a free one, shown by status).")
MetricsHostOpt = typer.Option("127.0.0.1", "--metrics-host", help="Address the metrics endpoint binds (default 127.0.0.1: this node only; 0.0.0.0 for a remote Prometheus).")
TextfileOpt = typer.Option(None, "--metrics-textfile", callback=_textfile, metavar="PATH.prom", help="Also write the metrics to this file (atomically) for node_exporter's textfile collector.")
MetricsIntervalOpt = typer.Option(5.0, "--metrics-interval", callback=_positive, help="Seconds between --metrics-textfile writes.")
MaxRunsOpt = typer.Option(64, "--max-runs", min=1, help="Most open runs (each an uploader and a wandb-core process) this sidecar takes; a hello beyond is refused.")
SystemMetricsOpt = typer.Option(True, "--system-metrics/--no-system-metrics", help="wandb samples the trainer's process (CPU, memory) and the node's GPUs into each run, as in-process wandb did.")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def control(address: str, request: str, timeout: float) -> dict | None:
    """control.request, with a refusal as a usage error (one line on stderr)."""
    try:
        return control_request(address, request, timeout)
    except ControlRefused as exc:
        raise typer.BadParameter(str(exc)) from None


def _serve_config(
    address: Optional[str],
    spool_dir: Optional[Path],
    log_level: str,
    commit_interval_ms: float,
    retain: Optional[float] = DEFAULT_RETAIN,
    spool_max_bytes: Optional[int] = None,
    **rest,
) -> ServeConfig:
    if rest.get("retry_backoff_max", 60.0) < rest.get("retry_backoff", 2.0):
        raise typer.BadParameter(
            f"must be >= --retry-backoff ({rest['retry_backoff']:g})", param_hint="'--retry-backoff-max'"
        )
    return ServeConfig(
        address=_address(address),
        spool_dir=spool_dir or default_spool_dir(),
        log_level=log_level.upper(),
        commit_interval=commit_interval_ms / 1000.0,
        retention=RetentionPolicy(retain=retain, max_bytes=spool_max_bytes),
        **rest,
    )


def _preflight_spool(spool_dir: Path) -> None:
    """Create or check the spool before the log may go to a file: the user sees why not."""
    from .spool import SpoolDirError, prepare_spool_dir

    try:
        prepare_spool_dir(spool_dir)
    except SpoolDirError as exc:
        fail(str(exc), EXIT_USAGE, "serve")


@app.command()
def serve(
    address: Optional[str] = AddressOpt,
    spool_dir: Optional[Path] = SpoolOpt,
    log_level: str = LogLevelOpt,
    drain_timeout: float = DrainOpt,
    init_timeout: float = InitOpt,
    finish_timeout: float = FinishOpt,
    commit_interval_ms: float = CommitOpt,
    log_file: Optional[Path] = LogFileOpt,
    heartbeat_timeout: float = HeartbeatOpt,
    retry_backoff: float = BackoffOpt,
    retry_backoff_max: float = BackoffMaxOpt,
    flush_interval: float = FlushOpt,
    session_timeout: float = SessionOpt,
    resume_grace: float = GraceOpt,
    parent_pid: Optional[int] = typer.Option(None, "--parent-pid", callback=_pid, help="Drain and exit when this process is gone (e.g. the job's shell: $$)."),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", callback=_positive, help="Drain and exit after this many seconds with no open or pending run and no client message."),
    retain: Optional[str] = RetainOpt,
    spool_max_bytes: Optional[str] = MaxBytesOpt,
    gc_interval: float = GcIntervalOpt,
    metrics_port: Optional[int] = MetricsPortOpt,
    metrics_host: str = MetricsHostOpt,
    metrics_textfile: Optional[Path] = TextfileOpt,
    metrics_interval: float = MetricsIntervalOpt,
    max_runs: int = MaxRunsOpt,
    system_metrics: bool = SystemMetricsOpt,
) -> None:
    """Serve metrics clients: spool every frame, upload to wandb from one process per run."""
    from .proc import redirect_stderr
    from .server import serve as run_server

    cfg = _serve_config(
        address, spool_dir, log_level, commit_interval_ms, retain, spool_max_bytes,  # type: ignore[arg-type]
        drain_timeout=drain_timeout, init_timeout=init_timeout, finish_timeout=finish_timeout, log_file=log_file,
        heartbeat_timeout=heartbeat_timeout, retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
        flush_interval=flush_interval, session_timeout=session_timeout, resume_grace=resume_grace,
        parent_pid=parent_pid, idle_timeout=idle_timeout, gc_interval=gc_interval,
        metrics_port=metrics_port, metrics_host=metrics_host, metrics_textfile=metrics_textfile,
        metrics_interval=metrics_interval, max_runs=max_runs, system_metrics=system_metrics,
    )  # fmt: skip
    _preflight_spool(cfg.spool_dir)
    if log_file is not None:
        try:
            redirect_stderr(log_file)
        except OSError as exc:
            fail(f"cannot open --log-file {log_file}: {exc.strerror or exc}", EXIT_USAGE, "serve")
    _setup_logging(log_level)
    raise typer.Exit(run_server(cfg))


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def run(
    command: List[str] = typer.Argument(..., metavar="-- COMMAND", help="The training command, e.g. torchrun --nproc-per-node 8 train.py."),
    address: Optional[str] = AddressOpt,
    spool_dir: Optional[Path] = SpoolOpt,
    log_level: str = LogLevelOpt,
    drain_timeout: float = DrainOpt,
    init_timeout: float = InitOpt,
    finish_timeout: float = FinishOpt,
    commit_interval_ms: float = CommitOpt,
    log_file: Optional[Path] = LogFileOpt,
    heartbeat_timeout: float = HeartbeatOpt,
    retry_backoff: float = BackoffOpt,
    retry_backoff_max: float = BackoffMaxOpt,
    flush_interval: float = FlushOpt,
    session_timeout: float = SessionOpt,
    resume_grace: float = GraceOpt,
    retain: Optional[str] = RetainOpt,
    spool_max_bytes: Optional[str] = MaxBytesOpt,
    metrics_port: Optional[int] = MetricsPortOpt,
    metrics_host: str = MetricsHostOpt,
    metrics_textfile: Optional[Path] = TextfileOpt,
    max_runs: int = MaxRunsOpt,
    system_metrics: bool = SystemMetricsOpt,
) -> None:
    """Run COMMAND under a sidecar: start one (or use the one already serving), export
    KFORGE_SIDECAR_ADDR to COMMAND, and when COMMAND exits drain and stop the sidecar it
    started. SIGTERM/SIGINT go to COMMAND first. Inside a SLURM job with no address given,
    the socket is per job. Exit status: COMMAND's (128+N if signal N killed it; 125 if no
    sidecar could be started, 126/127 if COMMAND cannot be executed / is not found)."""
    from .launcher import job_address, job_spool_dir, run_command

    if command and command[0] == "--":  # click keeps a `--` that follows the options
        command = command[1:]
    if not command:
        fail("no COMMAND given; write: kforge-sidecar run [options] -- COMMAND ...", EXIT_USAGE, "run")
    exe = shutil.which(command[0])
    if exe is None:
        # before any sidecar is started: nothing to start, drain and stop for a typo
        fail(f"{command[0]}: command not found (not on PATH, or not executable)", EXIT_NOT_FOUND, "run")
    _setup_logging(log_level)
    address = address or job_address()
    spool_dir = spool_dir or job_spool_dir()
    cfg = _serve_config(
        address, spool_dir, log_level, commit_interval_ms, retain, spool_max_bytes,  # type: ignore[arg-type]
        drain_timeout=drain_timeout, init_timeout=init_timeout, finish_timeout=finish_timeout, log_file=log_file,
        heartbeat_timeout=heartbeat_timeout, retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
        flush_interval=flush_interval, session_timeout=session_timeout, resume_grace=resume_grace,
        metrics_port=metrics_port, metrics_host=metrics_host, metrics_textfile=metrics_textfile,
        max_runs=max_runs, system_metrics=system_metrics,
    )  # fmt: skip
    raise typer.Exit(run_command(cfg, command))


@app.command()
def status(
    address: Optional[str] = AddressOpt,
    spool_dir: Optional[Path] = SpoolOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every run)."),
    show_all: bool = typer.Option(False, "--all", "-A", help="Show every run in the spool, finished and uploaded ones too."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh in place until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", callback=_positive, help="Seconds between refreshes with --watch."),
    timeout: float = typer.Option(2.0, "--timeout", callback=_positive, help="Seconds to wait for the sidecar."),
) -> None:
    """Show the runs that are live or have frames pending (--all: every run), their state and
    where their frames are. Exit 1 if no sidecar answers (then the view comes from the spool)."""
    from .status import offline_status, render_status, watch_status

    addr = _address(address)
    spool = Spool(spool_dir or default_spool_dir())

    def fetch() -> tuple[dict, bool]:
        body = control(addr, "status", timeout)
        if body is None:
            return offline_status(spool), False
        return body, True

    if watch:
        if as_json:
            fail("--watch and --json do not go together; poll `status --json` instead", EXIT_USAGE, "status")
        raise typer.Exit(watch_status(fetch, interval, show_all))
    body, live = fetch()
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        render_status(body, show_all)
    raise typer.Exit(0 if live else 1)


@app.command()
def stop(
    address: Optional[str] = AddressOpt,
    timeout: float = typer.Option(60.0, "--timeout", callback=_positive, help="Seconds to wait for the sidecar to drain and exit."),
) -> None:
    """Ask the sidecar to drain and exit; waits until it has."""
    addr = _address(address)
    body = control(addr, "status", 5.0)
    if body is None or control(addr, "stop", 5.0) is None:
        fail(command="stop", message=f"no sidecar answers on {addr} (see `kforge-sidecar status`, or give its --address)")
    pid = body["sidecar"]["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            typer.echo(f"sidecar (pid {pid}) drained and stopped")
            return
        time.sleep(0.1)
    fail(command="stop", message=f"the sidecar on {addr} (pid {pid}) is still draining after {timeout:g}s; wait, or raise --timeout")


def _spool_root(spool_dir: Optional[Path], command: str) -> Path:
    """The spool (or directory of spools) a command reads; fails in one line if there is none."""
    from .spool import legacy_spool_root
    from .sync import spools_under

    root = spool_dir or default_spool_dir()
    legacy = legacy_spool_root()
    hint = ""
    if spool_dir is None and not os.environ.get("KFORGE_SPOOL_DIR") and spools_under(legacy):
        hint = f"; older versions spooled in {legacy}: {PROG} {command} --spool-dir {legacy}"
    if not root.exists():
        fail(command=command, message=f"no spool at {root} (no such directory){hint or '; point --spool-dir at a spool or a directory of spools'}")
    if not root.is_dir():
        fail(command=command, message=f"{root} is not a directory; point --spool-dir at a spool or a directory of spools")
    if not spools_under(root):
        fail(command=command, message=f"no spool in {root} (no runs/ directory in it or below it){hint}")
    return root


@app.command()
def sync(
    run_ids: Optional[List[str]] = typer.Argument(None, help="Runs to upload (default: every run with something left)."),
    spool_dir: Optional[Path] = SpoolOpt,
    init_timeout: float = InitOpt,
    finish_timeout: float = typer.Option(300.0, "--finish-timeout", callback=_positive, help="Seconds wandb finish may take."),
    log_level: str = typer.Option("WARNING", "--log-level", callback=_log_level, help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Upload runs left in the spool, or in the spools below it (failed, interrupted, or spooled offline). Exit 0 if all of it got out."""
    from .sync import sync as run_sync

    root = _spool_root(spool_dir, "sync")
    _setup_logging(log_level)
    raise typer.Exit(run_sync(root, run_ids or [], init_timeout, finish_timeout, log_level))


@app.command()
def gc(
    spool_dir: Optional[Path] = SpoolOpt,
    retain: Optional[str] = RetainOpt,
    spool_max_bytes: Optional[str] = MaxBytesOpt,
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Show what would be removed; remove nothing."),
) -> None:
    """Remove finished and fully uploaded runs from the spool (or the spools below it) now, by
    the rule the sidecar applies by itself. Never a run with anything pending. A spool that a
    running sidecar serves is left to it."""
    from .gc import collect

    root = _spool_root(spool_dir, "gc")
    raise typer.Exit(collect(root, RetentionPolicy(retain=retain, max_bytes=spool_max_bytes), dry_run))  # type: ignore[arg-type]


# typer raises click's exceptions (its own vendored copy since typer 0.2x): find their base
# class through typer's, so that this works with either.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NoArgsIsHelp: type[Exception] | None = getattr(sys.modules[_ClickException.__module__], "NoArgsIsHelpError", None)


def main() -> None:
    """Run the CLI; a usage mistake is one line on stderr and exit 2, never a traceback."""
    try:
        code = app(prog_name=PROG, standalone_mode=False)
    except _ClickException as exc:
        if _NoArgsIsHelp is not None and isinstance(exc, _NoArgsIsHelp):
            typer.echo(exc.format_message(), err=True)  # the help text
            sys.exit(EXIT_USAGE)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else PROG
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"{where}: {message} (see: {where} --help)\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
