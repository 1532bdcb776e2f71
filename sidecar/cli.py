"""The ``kforge-sidecar`` command line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer

from .control import ControlRefused
from .control import request as control_request
from .exits import EXIT_NOT_FOUND, EXIT_USAGE
from .options import build, option, positive, resolve, with_options
from .proc import pid_alive as _alive
from .retention import RetentionPolicy
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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Out-of-process Weights & Biases metrics for training jobs."""


AddressOpt = option("address").typer_option()
SpoolOpt = option("spool_dir").typer_option()


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


def _preflight_spool(spool_dir: Path) -> None:
    """Create or check the spool before the log may go to a file: the user sees why not."""
    from .spool import SpoolDirError, prepare_spool_dir

    try:
        prepare_spool_dir(spool_dir)
    except SpoolDirError as exc:
        fail(str(exc), EXIT_USAGE, "serve")


@app.command()
@with_options("serve")
def serve(**options: Any) -> None:
    """Serve metrics clients: spool every frame, upload to wandb from one process per run."""
    from .proc import redirect_stderr
    from .server import serve as run_server

    cfg = build(options)
    _preflight_spool(cfg.spool_dir)
    if cfg.log_file is not None:
        try:
            redirect_stderr(cfg.log_file)
        except OSError as exc:
            fail(f"cannot open --log-file {cfg.log_file}: {exc.strerror or exc}", EXIT_USAGE, "serve")
    _setup_logging(cfg.log_level)
    raise typer.Exit(run_server(cfg))


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
@with_options("run")
def run(
    command: List[str] = typer.Argument(
        ..., metavar="-- COMMAND", help="The training command, e.g. torchrun --nproc-per-node 8 train.py."
    ),
    **options: Any,
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
    _setup_logging(options["log_level"])
    options["address"] = options["address"] or job_address()
    options["spool_dir"] = options["spool_dir"] or job_spool_dir()
    cfg = build(options)
    raise typer.Exit(run_command(cfg, command))


@app.command()
def status(
    address: Optional[str] = AddressOpt,
    spool_dir: Optional[Path] = SpoolOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every run)."),
    show_all: bool = typer.Option(
        False, "--all", "-A", help="Show every run in the spool, finished and uploaded ones too."
    ),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh in place until Ctrl-C."),
    interval: float = typer.Option(
        2.0, "--interval", callback=positive, help="Seconds between refreshes with --watch."
    ),
    timeout: float = typer.Option(2.0, "--timeout", callback=positive, help="Seconds to wait for the sidecar."),
) -> None:
    """Show the runs that are live or have frames pending (--all: every run), their state and
    where their frames are. Exit 1 if no sidecar answers (then the view comes from the spool)."""
    from .status import offline_status, render_status, watch_status

    addr = resolve(address)
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
    timeout: float = typer.Option(
        60.0, "--timeout", callback=positive, help="Seconds to wait for the sidecar to drain and exit."
    ),
) -> None:
    """Ask the sidecar to drain and exit; waits until it has."""
    addr = resolve(address)
    body = control(addr, "status", 5.0)
    if body is None or control(addr, "stop", 5.0) is None:
        fail(
            command="stop", message=f"no sidecar answers on {addr} (see `kforge-sidecar status`, or give its --address)"
        )
    pid = body["sidecar"]["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            typer.echo(f"sidecar (pid {pid}) drained and stopped")
            return
        time.sleep(0.1)
    fail(
        command="stop",
        message=f"the sidecar on {addr} (pid {pid}) is still draining after {timeout:g}s; wait, or raise --timeout",
    )


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
        fail(
            command=command,
            message=f"no spool at {root} (no such directory){hint or '; point --spool-dir at a spool or a directory of spools'}",
        )
    if not root.is_dir():
        fail(
            command=command, message=f"{root} is not a directory; point --spool-dir at a spool or a directory of spools"
        )
    if not spools_under(root):
        fail(command=command, message=f"no spool in {root} (no runs/ directory in it or below it){hint}")
    return root


@app.command()
def sync(
    run_ids: Optional[List[str]] = typer.Argument(
        None, help="Runs to upload (default: every run with something left)."
    ),
    spool_dir: Optional[Path] = SpoolOpt,
    init_timeout: float = option("init_timeout").typer_option(),
    finish_timeout: float = option("finish_timeout").typer_option(300.0),
    log_level: str = option("log_level").typer_option("WARNING"),
) -> None:
    """Upload runs left in the spool, or in the spools below it (failed, interrupted, or spooled offline). Exit 0 if all of it got out."""
    from .sync import sync as run_sync

    root = _spool_root(spool_dir, "sync")
    _setup_logging(log_level)
    raise typer.Exit(run_sync(root, run_ids or [], init_timeout, finish_timeout, log_level))


@app.command()
def gc(
    spool_dir: Optional[Path] = SpoolOpt,
    retain: Optional[str] = option("retain").typer_option(),
    spool_max_bytes: Optional[str] = option("spool_max_bytes").typer_option(),
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
