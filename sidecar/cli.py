"""The ``kforge-sidecar`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import zmq

from client import protocol
from client.address import resolve_address

from .config import ServeConfig
from .spool import Spool, default_spool_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Out-of-process Weights & Biases metrics for training jobs.",
)

AddressOpt = typer.Option(None, "--address", "-a", help="ZeroMQ address (default: $KFORGE_SIDECAR_ADDR, else a per-user ipc socket).")
SpoolOpt = typer.Option(None, "--spool-dir", help="Spool directory (default: $KFORGE_SPOOL_DIR, else ~/.local/state/kforge-sidecar/spool).")


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


@app.command()
def serve(
    address: Optional[str] = AddressOpt,
    spool_dir: Optional[Path] = SpoolOpt,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="Seconds uploaders get to drain on SIGTERM or stop."),
    init_timeout: float = typer.Option(60.0, "--init-timeout", help="Seconds one wandb.init may take."),
    finish_timeout: float = typer.Option(60.0, "--finish-timeout", help="Seconds wandb finish may take."),
    commit_interval_ms: float = typer.Option(5.0, "--commit-interval-ms", help="Group commit: at most one fsync per run per interval."),
) -> None:
    """Serve metrics clients: spool every frame, upload to wandb from one process per run."""
    from .server import serve as run_server

    _setup_logging(log_level)
    cfg = ServeConfig(
        address=resolve_address(address),
        spool_dir=spool_dir or default_spool_dir(),
        log_level=log_level.upper(),
        drain_timeout=drain_timeout,
        init_timeout=init_timeout,
        finish_timeout=finish_timeout,
        commit_interval=commit_interval_ms / 1000.0,
    )
    raise typer.Exit(run_server(cfg))


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


def _alive(pid: int) -> bool:
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


def main() -> None:
    app()
