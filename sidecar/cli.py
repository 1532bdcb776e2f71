"""The ``kforge-sidecar`` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
import zmq

from client import protocol
from client.address import resolve_address

from .config import ServeConfig
from .proc import pid_alive as _alive
from .spool import Spool, default_spool_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Out-of-process Weights & Biases metrics for training jobs.",
)

AddressOpt = typer.Option(None, "--address", "-a", help="ZeroMQ address (default: $KFORGE_SIDECAR_ADDR, else a per-user ipc socket).")
SpoolOpt = typer.Option(None, "--spool-dir", help="Spool directory (default: $KFORGE_SPOOL_DIR, else ~/.local/state/kforge-sidecar/spool-$HOSTNAME).")
# serve's options, shared with `run` (which passes them on to the sidecar it starts)
LogLevelOpt = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR.")
DrainOpt = typer.Option(30.0, "--drain-timeout", help="Seconds uploaders get to drain on SIGTERM or stop.")
InitOpt = typer.Option(60.0, "--init-timeout", help="Seconds one wandb.init may take.")
FinishOpt = typer.Option(60.0, "--finish-timeout", help="Seconds wandb finish may take.")
CommitOpt = typer.Option(5.0, "--commit-interval-ms", help="Group commit: at most one fsync per run per interval.")
LogFileOpt = typer.Option(None, "--log-file", help="Append the sidecar's log (and its uploaders') here instead of stderr; SIGHUP reopens it (logrotate).")
HeartbeatOpt = typer.Option(30.0, "--heartbeat-timeout", help="Kill and restart an uploader silent this long (wedged wandb).")
BackoffOpt = typer.Option(2.0, "--retry-backoff", help="First delay before a failed upload is retried; doubles per failure.")
BackoffMaxOpt = typer.Option(60.0, "--retry-backoff-max", help="Longest delay between upload retries.")
SessionOpt = typer.Option(60.0, "--session-timeout", help="A client silent this long is presumed dead (idle clients ping every 5 s; a dead pid on this host counts at once).")
GraceOpt = typer.Option(300.0, "--resume-grace", help="Seconds a run whose trainer died waits for a resume before it is finished as failed.")
FlushOpt = typer.Option(1.0, "--wandb-flush-interval", help="wandb-core's transaction log flush interval (bounds replays after a kill).")
MaxRunsOpt = typer.Option(64, "--max-runs", min=1, help="Most open runs (each an uploader and a wandb-core process) this sidecar takes; a hello beyond is refused.")
SystemMetricsOpt = typer.Option(True, "--system-metrics/--no-system-metrics", help="wandb samples the trainer's process (CPU, memory) and the node's GPUs into each run, as in-process wandb did.")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def control(address: str, request: str, timeout: float) -> dict | None:
    """Send a control request to a running sidecar; None if none answers in time."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # No IMMEDIATE: with it (and LINGER 0) the pipe is torn down when the sidecar disconnects,
    # and a reply not yet read goes with it; `stop` lost the reply to "stop" that way, as the
    # sidecar closes its socket right after sending it. Without it, an unanswered request just
    # waits out the timeout.
    try:
        sock.connect(address)
        deadline = time.monotonic() + timeout
        sent = False
        while time.monotonic() < deadline:
            if not sent:
                try:
                    sock.send(protocol.encode(protocol.Control(t=request)), zmq.NOBLOCK)
                    sent = True
                except zmq.Again:  # not connected (yet)
                    time.sleep(0.02)
                    continue
            if sock.poll(50):
                msg = protocol.decode_response(sock.recv())
                if isinstance(msg, protocol.Reply):
                    return msg.body
                if isinstance(msg, protocol.Error):
                    raise typer.BadParameter(f"sidecar refused the request: {msg.reason}")
        return None
    finally:
        sock.close(linger=0)
        ctx.term()


def _serve_config(address: Optional[str], spool_dir: Optional[Path], log_level: str, commit_interval_ms: float, **rest) -> ServeConfig:
    return ServeConfig(
        address=resolve_address(address),
        spool_dir=spool_dir or default_spool_dir(),
        log_level=log_level.upper(),
        commit_interval=commit_interval_ms / 1000.0,
        **rest,
    )


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
    max_runs: int = MaxRunsOpt,
    system_metrics: bool = SystemMetricsOpt,
    parent_pid: Optional[int] = typer.Option(None, "--parent-pid", help="Drain and exit when this process is gone (e.g. the job's shell: $$)."),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", help="Drain and exit after this many seconds with no open or pending run and no client message."),
) -> None:
    """Serve metrics clients: spool every frame, upload to wandb from one process per run."""
    from .proc import redirect_stderr
    from .server import serve as run_server

    if log_file is not None:
        try:
            redirect_stderr(log_file)
        except OSError as exc:
            raise typer.BadParameter(f"cannot open {log_file}: {exc}", param_hint="--log-file") from None
    _setup_logging(log_level)
    cfg = _serve_config(
        address, spool_dir, log_level, commit_interval_ms,
        drain_timeout=drain_timeout, init_timeout=init_timeout, finish_timeout=finish_timeout, log_file=log_file,
        heartbeat_timeout=heartbeat_timeout, retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
        flush_interval=flush_interval, session_timeout=session_timeout, resume_grace=resume_grace,
        max_runs=max_runs, system_metrics=system_metrics, parent_pid=parent_pid, idle_timeout=idle_timeout,
    )  # fmt: skip
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
    max_runs: int = MaxRunsOpt,
    system_metrics: bool = SystemMetricsOpt,
) -> None:
    """Run COMMAND under a sidecar: start one (or use the one already serving), export
    KFORGE_SIDECAR_ADDR to COMMAND, and when COMMAND exits drain and stop the sidecar it
    started. SIGTERM/SIGINT go to COMMAND first. Inside a SLURM job with no address given,
    the socket is per job. Exit status: COMMAND's (128+N if signal N killed it; 125 if no
    sidecar could be started, 126/127 if COMMAND cannot be executed / is not found)."""
    from .launcher import job_address, job_spool_dir, run_command

    _setup_logging(log_level)
    address = address or job_address()
    spool_dir = spool_dir or job_spool_dir()
    cfg = _serve_config(
        address, spool_dir, log_level, commit_interval_ms,
        drain_timeout=drain_timeout, init_timeout=init_timeout, finish_timeout=finish_timeout, log_file=log_file,
        heartbeat_timeout=heartbeat_timeout, retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
        flush_interval=flush_interval, session_timeout=session_timeout, resume_grace=resume_grace,
        max_runs=max_runs, system_metrics=system_metrics,
    )  # fmt: skip
    raise typer.Exit(run_command(cfg, command))


@app.command()
def status(
    address: Optional[str] = AddressOpt,
    spool_dir: Optional[Path] = SpoolOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds to wait for the sidecar."),
) -> None:
    """Show each run's state and where its frames are. Exit 1 if no sidecar answers."""
    from .status import format_status, offline_status

    body = control(resolve_address(address), "status", timeout)
    live = body is not None
    if body is None:
        body = offline_status(Spool(spool_dir or default_spool_dir()))
    typer.echo(json.dumps(body, indent=2) if as_json else format_status(body))
    raise typer.Exit(0 if live else 1)


@app.command()
def stop(
    address: Optional[str] = AddressOpt,
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the sidecar to drain and exit."),
) -> None:
    """Ask the sidecar to drain and exit; waits until it has."""
    addr = resolve_address(address)
    body = control(addr, "status", 5.0)
    if body is None or control(addr, "stop", 5.0) is None:
        typer.echo(f"no sidecar answers on {addr}", err=True)
        raise typer.Exit(1)
    pid = body["sidecar"]["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            typer.echo(f"sidecar (pid {pid}) drained and stopped")
            return
        time.sleep(0.1)
    typer.echo(f"sidecar on {addr} still running after {timeout:.0f}s", err=True)
    raise typer.Exit(1)


@app.command()
def sync(
    run_ids: Optional[List[str]] = typer.Argument(None, help="Runs to upload (default: every run with something left)."),
    spool_dir: Optional[Path] = SpoolOpt,
    init_timeout: float = InitOpt,
    finish_timeout: float = typer.Option(300.0, "--finish-timeout", help="Seconds wandb finish may take."),
    log_level: str = typer.Option("WARNING", "--log-level"),
) -> None:
    """Upload runs left in the spool, or in the spools below it (failed, interrupted, or spooled offline). Exit 0 if all of it got out."""
    from .sync import sync as run_sync

    _setup_logging(log_level)
    raise typer.Exit(run_sync(spool_dir or default_spool_dir(), run_ids or [], init_timeout, finish_timeout, log_level))


def main() -> None:
    app()
