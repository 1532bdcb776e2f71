"""Every option of ``serve`` (and of ``run``, which passes them to the sidecar it starts),
declared once: its flag, default, help, check and where it goes in ServeConfig.

From these declarations come the typer options of ``serve`` and ``run``
(``with_options``), the ServeConfig they build (``build``), and the command
line of a sidecar started by ``run`` (``argv``). Adding an option is one
``Option(...)`` here and a field in its config section (config.py).

The checks run as options are parsed: a mistake is one line and exit 2.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from client.address import ENV_ADDRESS, resolve_address

from .config import LifetimeConfig, MetricsConfig, ReceiverConfig, ServeConfig, UploadConfig
from .proc import pid_alive
from .retention import RetentionPolicy, parse_duration, parse_size
from .spool import default_spool_dir

# ------------------------------------------------------------------ checks (typer callbacks)


def number(lo: float, strict: bool = False) -> Callable[[Optional[float]], Optional[float]]:
    def check(value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, not {value}")
        if value < lo or (strict and value == lo):
            raise typer.BadParameter(f"must be {'>' if strict else '>='} {lo:g} (got {value:g})")
        return value

    return check


nonneg = number(0)
positive = number(0, strict=True)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
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


def address_opt(value: Optional[str]) -> Optional[str]:
    return None if value is None else check_address(value)


def resolve(address: Optional[str]) -> str:
    """--address, else $KFORGE_SIDECAR_ADDR, else the per-user socket; checked."""
    resolved = resolve_address(address)
    if address is None and os.environ.get(ENV_ADDRESS):
        try:
            check_address(resolved)
        except typer.BadParameter as exc:
            raise typer.BadParameter(exc.message, param_hint=f"${ENV_ADDRESS}") from None
    return resolved


def duration(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def size(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def port(value: Optional[int]) -> Optional[int]:
    if value is not None and not 0 <= value <= 65535:
        raise typer.BadParameter(f"{value} is not a TCP port (0-65535; 0 picks a free one)")
    return value


def pid(value: Optional[int]) -> Optional[int]:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not a process id")
    if value is not None and not pid_alive(value):
        raise typer.BadParameter(f"no process {value} is running (the sidecar would exit at once)")
    return value


def textfile(value: Optional[Path]) -> Optional[Path]:
    from .metrics import textfile_path_problem

    if value is not None and (problem := textfile_path_problem(value)):
        raise typer.BadParameter(problem)
    return value


# ------------------------------------------------------------------ declarations


@dataclass(frozen=True)
class Option:
    name: str  # the parameter's name in the command (and the key ``build`` takes)
    flags: tuple[str, ...]  # as typer takes them: ("--address", "-a"), ("--x/--no-x",)
    type: Any  # the parameter's annotation
    default: Any
    help: str
    section: str  # where it goes in ServeConfig: "" (top level), "receiver", "upload", ...
    field: str  # its name in that section
    check: Callable[[Any], Any] | None = None  # at parse time; raises typer.BadParameter
    to_config: Callable[[Any], Any] = lambda v: v  # the checked value -> ServeConfig's
    to_arg: Callable[[Any], str] = str  # ServeConfig's value -> the flag's argument
    serve_only: bool = False  # not an option of `run`
    none_arg: str | None = None  # how the flag says None, where None is not the default
    extra: dict[str, Any] = field(default_factory=dict)  # typer.Option's other arguments

    def typer_option(self, default: Any = ..., **extra: Any) -> Any:
        return typer.Option(
            self.default if default is ... else default, *self.flags, callback=self.check, help=self.help,
            **{**self.extra, **extra},
        )  # fmt: skip

    def argv(self, value: Any) -> list[str]:
        """The flags that give a sidecar ``value`` (a ServeConfig value); none for None."""
        if value is None:
            return [] if self.none_arg is None else [self.flags[0], self.none_arg]
        if self.type is bool:
            on, off = self.flags[0].split("/")
            return [on if value else off]
        return [self.flags[0], self.to_arg(value)]


def _ms(value: float) -> float:
    return value / 1000.0


def _to_ms(value: float) -> str:
    return str(value * 1000.0)


# In the order `serve --help` shows them.
OPTIONS: tuple[Option, ...] = (
    Option("address", ("--address", "-a"), Optional[str], None, "ZeroMQ address, ipc://PATH or tcp://HOST:PORT (default: $KFORGE_SIDECAR_ADDR, else a per-user ipc socket).", "", "address", address_opt, resolve),
    Option("spool_dir", ("--spool-dir",), Optional[Path], None, "Spool directory (default: $KFORGE_SPOOL_DIR, else /var/tmp/kforge-sidecar-$UID/spool: node-local).", "", "spool_dir", to_config=lambda v: v or default_spool_dir(), extra={"readable": False}),
    Option("log_level", ("--log-level",), str, "INFO", "DEBUG, INFO, WARNING or ERROR.", "", "log_level", log_level, str.upper),
    Option("drain_timeout", ("--drain-timeout",), float, 30.0, "Seconds uploaders get to drain on SIGTERM or stop.", "lifetime", "drain_timeout", nonneg),
    Option("init_timeout", ("--init-timeout",), float, 60.0, "Seconds one wandb.init may take.", "upload", "init_timeout", positive),
    Option("finish_timeout", ("--finish-timeout",), float, 60.0, "Seconds wandb finish may take.", "upload", "finish_timeout", positive),
    Option("commit_interval_ms", ("--commit-interval-ms",), float, 5.0, "Group commit: at most one fsync per run per interval.", "receiver", "commit_interval", nonneg, _ms, _to_ms),
    Option("log_file", ("--log-file",), Optional[Path], None, "Append the sidecar's log (and its uploaders') here instead of stderr; SIGHUP reopens it (logrotate).", "", "log_file", extra={"dir_okay": False}),
    Option("heartbeat_timeout", ("--heartbeat-timeout",), float, 30.0, "Kill and restart an uploader silent this long (wedged wandb).", "upload", "heartbeat_timeout", positive),
    Option("retry_backoff", ("--retry-backoff",), float, 2.0, "First delay before a failed upload is retried; doubles per failure.", "upload", "retry_backoff", positive),
    Option("retry_backoff_max", ("--retry-backoff-max",), float, 60.0, "Longest delay between upload retries.", "upload", "retry_backoff_max", positive),
    Option("flush_interval", ("--wandb-flush-interval",), float, 1.0, "wandb-core's transaction log flush interval (bounds replays after a kill).", "upload", "flush_interval", positive),
    Option("session_timeout", ("--session-timeout",), float, 60.0, "A client silent this long is presumed dead (idle clients ping every 5 s; a dead pid on this host counts at once).", "receiver", "session_timeout", positive),
    Option("resume_grace", ("--resume-grace",), float, 300.0, "Seconds a run whose trainer died waits for a resume before it is finished as failed.", "receiver", "resume_grace", nonneg),
    Option("parent_pid", ("--parent-pid",), Optional[int], None, "Drain and exit when this process is gone (e.g. the job's shell: $$).", "lifetime", "parent_pid", pid, serve_only=True),
    Option("idle_timeout", ("--idle-timeout",), Optional[float], None, "Drain and exit after this many seconds with no open or pending run and no client message.", "lifetime", "idle_timeout", positive, serve_only=True),
    Option("retain", ("--retain",), Optional[str], "7d", "Remove runs from the spool this long after they finished and were fully uploaded: 7d, 12h, 30m, 90s, or never. A run with anything pending is never removed.", "retention", "retain", duration, none_arg="never", extra={"metavar": "DURATION"}),
    Option("spool_max_bytes", ("--spool-max-bytes",), Optional[str], None, "Size cap for the spool (e.g. 20G): over it, finished and uploaded runs are removed before --retain, oldest first. Never a run with anything pending.", "retention", "max_bytes", size, extra={"metavar": "SIZE"}),
    Option("gc_interval", ("--gc-interval",), float, 10.0, "Seconds between retention passes.", "", "gc_interval", positive, serve_only=True, extra={"hidden": True}),
    Option("metrics_port", ("--metrics-port",), Optional[int], None, "Serve Prometheus/OpenMetrics health metrics on this port (off by default; 0 picks a free one, shown by status).", "metrics", "port", port),
    Option("metrics_host", ("--metrics-host",), str, "127.0.0.1", "Address the metrics endpoint binds (default 127.0.0.1: this node only; 0.0.0.0 for a remote Prometheus).", "metrics", "host"),
    Option("metrics_textfile", ("--metrics-textfile",), Optional[Path], None, "Also write the metrics to this file (atomically) for node_exporter's textfile collector.", "metrics", "textfile", textfile, extra={"metavar": "PATH.prom"}),
    Option("metrics_interval", ("--metrics-interval",), float, 5.0, "Seconds between --metrics-textfile writes.", "metrics", "interval", positive, serve_only=True),
    Option("max_runs", ("--max-runs",), int, 64, "Most open runs (each an uploader and a wandb-core process) this sidecar takes; a hello beyond is refused.", "receiver", "max_runs", extra={"min": 1}),
    Option("system_metrics", ("--system-metrics/--no-system-metrics",), bool, True, "wandb samples the trainer's process (CPU, memory) and the node's GPUs into each run, as in-process wandb did.", "upload", "system_metrics"),
)  # fmt: skip
BY_NAME = {o.name: o for o in OPTIONS}
SECTIONS: dict[str, type] = {
    "receiver": ReceiverConfig,
    "upload": UploadConfig,
    "lifetime": LifetimeConfig,
    "retention": RetentionPolicy,
    "metrics": MetricsConfig,
}


def option(name: str) -> Option:
    return BY_NAME[name]


def default(name: str) -> Any:
    """An option's default, as ServeConfig holds it (checked and converted)."""
    o = BY_NAME[name]
    value = o.check(o.default) if o.check is not None else o.default
    return o.to_config(value)


def for_command(command: str) -> list[Option]:
    return [o for o in OPTIONS if command == "serve" or not o.serve_only]


def with_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command (``def serve(**options)``) the options ``command`` takes; they
    follow the function's own parameters."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        added = [
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.typer_option(), annotation=o.type)
            for o in for_command(command)
        ]
        func.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        func.__annotations__ = {**func.__annotations__, **{p.name: p.annotation for p in added}}
        return func

    return decorate


def build(values: dict[str, Any]) -> ServeConfig:
    """The ServeConfig of checked option values (``values`` by option name; an option not
    given takes its default). Checks that span options raise BadParameter."""
    backoff = values.get("retry_backoff", BY_NAME["retry_backoff"].default)
    if values.get("retry_backoff_max", BY_NAME["retry_backoff_max"].default) < backoff:
        raise typer.BadParameter(f"must be >= --retry-backoff ({backoff:g})", param_hint="'--retry-backoff-max'")
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for o in OPTIONS:
        value = o.to_config(values[o.name]) if o.name in values else default(o.name)
        (sections[o.section] if o.section else top)[o.field] = value
    return ServeConfig(**top, **{name: cls(**sections[name]) for name, cls in SECTIONS.items()})


def argv(cfg: ServeConfig) -> list[str]:
    """The ``serve`` options of a sidecar configured as ``cfg``."""
    out: list[str] = []
    for o in OPTIONS:
        value = getattr(getattr(cfg, o.section) if o.section else cfg, o.field)
        out += o.argv(value)
    return out
