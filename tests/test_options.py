"""The options of `serve` and `run` are declared once (sidecar/options.py): the typer
options, the ServeConfig and a child sidecar's command line all come from there."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import typer

from sidecar import options
from sidecar.cli import app
from sidecar.config import UploaderConfig
from sidecar.launcher import serve_argv


def _parse(command: str, args: list[str]) -> dict:
    """The checked option values `command` gets from ``args`` (no command runs)."""
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    with cmd.make_context(command, list(args)) as ctx:
        return dict(ctx.params)


def test_every_option_is_a_flag_of_serve_and_run_takes_all_but_the_serve_only_ones():
    serve = {p.name for p in typer.main.get_command(app).commands["serve"].params}  # type: ignore[attr-defined]
    run = {p.name for p in typer.main.get_command(app).commands["run"].params}  # type: ignore[attr-defined]
    assert {o.name for o in options.OPTIONS} == serve
    assert run - {"command"} == {o.name for o in options.OPTIONS if not o.serve_only}


def test_defaults_come_from_the_declarations(tmp_path):
    cfg = options.build(_parse("serve", ["--address", "ipc:///tmp/x.sock", "--spool-dir", str(tmp_path)]))
    assert cfg.lifetime.drain_timeout == 30.0 and cfg.receiver.commit_interval == 0.005
    assert cfg.retention.retain == 7 * 86400.0 and cfg.retention.max_bytes is None
    assert cfg.receiver.max_runs == 64 and cfg.upload.system_metrics is True and cfg.metrics.port is None
    assert options.default("flush_interval") == cfg.upload.flush_interval


def test_a_child_sidecar_gets_the_same_configuration(tmp_path):
    given = [
        "--address", "ipc:///tmp/x.sock", "--spool-dir", str(tmp_path), "--log-level", "debug",
        "--drain-timeout", "7", "--init-timeout", "11", "--finish-timeout", "13", "--commit-interval-ms", "2.5",
        "--log-file", str(tmp_path / "log"), "--heartbeat-timeout", "17", "--retry-backoff", "3",
        "--retry-backoff-max", "19", "--wandb-flush-interval", "0.5", "--session-timeout", "23",
        "--resume-grace", "0", "--retain", "never", "--spool-max-bytes", "20G", "--metrics-port", "0",
        "--metrics-host", "0.0.0.0", "--metrics-textfile", str(tmp_path / "m.prom"), "--max-runs", "3",
        "--no-system-metrics",
    ]  # fmt: skip
    cfg = options.build(_parse("run", [*given, "--", "true"]))
    cfg = replace(cfg, lifetime=replace(cfg.lifetime, parent_pid=os.getpid()))
    argv = serve_argv(cfg)
    assert argv[1:4] == ["-m", "sidecar", "serve"]
    assert options.build(_parse("serve", argv[4:])) == cfg
    for other in (["--retain", "12h"], ["--system-metrics"], []):  # the defaults, and the other way round
        cfg = options.build(
            _parse("run", ["--address", "ipc:///tmp/x.sock", "--spool-dir", str(tmp_path), *other, "--", "true"])
        )
        assert options.build(_parse("serve", serve_argv(cfg)[4:])) == cfg


def test_the_uploader_gets_one_serialised_config(tmp_path):
    cfg = options.build(
        _parse("serve", ["--address", "ipc:///tmp/x.sock", "--spool-dir", str(tmp_path), "--init-timeout", "9"])
    )
    up = UploaderConfig.for_run(cfg, tmp_path / "runs" / "r1")
    assert up.init_timeout == 9 and up.drain_timeout == cfg.lifetime.drain_timeout and not up.sync
    assert UploaderConfig.from_json(up.to_json()) == up
    assert isinstance(UploaderConfig.from_json(up.to_json()).run_dir, Path)
