"""Helpers for the framework adapter tests (tests/test_lightning.py, test_transformers.py,
test_accelerate.py): the trainer scripts' records, and wandb's record of a run read back.

A trainer script writes what its framework handed the adapter to a JSON-lines
record (``{"step": s, "values": {...}}`` per call), and prints a JSON report
last (``finish_trainer``). Only the framework's own test imports the framework.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Env, run_files, stop_process, wait_for, wandb_records, wandb_summary

HERE = Path(__file__).resolve().parent


def require(*modules: str) -> str:
    """Skip the calling test module, with a reason, unless one of ``modules`` is installed."""
    for name in modules:
        if importlib.util.find_spec(name) is not None:
            return name
    why = f"{' or '.join(modules)} is not installed (make install installs the `frameworks` test extra)"
    pytest.skip(why, allow_module_level=True)


def read_record(path: Path) -> list[dict]:
    """Every call a trainer script recorded, in order (a SIGKILL may cut the last line)."""
    calls = []
    for line in path.read_text().splitlines():
        try:
            calls.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return calls


def rows(calls: list[dict]) -> dict[int, dict]:
    """step -> {key: value}, the calls merged per step as wandb merges them (the later value wins)."""
    out: dict[int, dict] = {}
    for call in calls:
        out.setdefault(call["step"], {}).update(call["values"])
    return out


def segments(env: Env, run_id: str) -> list[Path]:
    """The run's .wandb files in the order wandb wrote them (one per wandb.init)."""
    files = run_files(env.wandb_dir, run_id)
    assert files, f"no .wandb file for run {run_id} under {env.wandb_dir}"
    return files


def history(path: Path) -> dict[int, dict]:
    """step -> the row wandb recorded in one .wandb file (wandb's own _keys left out)."""
    out: dict[int, dict] = {}
    for rec in wandb_records(path):
        if rec.get("type") == "history":
            item = rec["history"]["item"]
            out[item["_step"]] = {k: v for k, v in item.items() if not k.startswith("_")}
    return out


def run_ids_in(env: Env) -> set[str]:
    """Every run ID wandb wrote a run for under this test's WANDB_DIR."""
    return {p.name.rsplit("-", 1)[1] for p in env.wandb_dir.glob("wandb/*-run-*")}


def assert_logged(recorded: dict[int, dict], wandb_rows: dict[int, dict]) -> None:
    """Every recorded (step, key, value) is in wandb's rows, exactly."""
    missing = [
        (s, k, v, wandb_rows.get(s, {}).get(k))
        for s, row in recorded.items()
        for k, v in row.items()
        if wandb_rows.get(s, {}).get(k) != v
    ]
    assert not missing, f"{len(missing)} values not in wandb's record (step, key, logged, recorded): {missing[:10]}"


def assert_config(files: list[Path], expected: dict) -> None:
    """``expected`` is in the run's config as wandb recorded it, in every segment: the
    fresh run's, and the one a resume opened (the adapters put the hyperparameters
    into the client's hello, which the sidecar keeps with the run for every
    ``wandb.init`` of it)."""
    for f in files:
        config = wandb_summary(f)["config"]
        assert {k: config.get(k) for k in expected} == expected, f"{f.parent.name}: {config}"


def hang_then_kill(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> dict:
    """Wait until a trainer script has written ``marker`` (it then hangs), SIGKILL it: a crash
    after a checkpoint. Returns the marker's JSON."""
    try:
        wait_for(lambda: proc.poll() is not None or marker.exists(), timeout, interval=0.1, what=f"{marker}")
        if proc.poll() is not None:
            _out, err = proc.communicate(timeout=10)
            raise AssertionError(f"the trainer exited ({proc.returncode}) before its marker:\n{err[-4000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop_process(proc)
    return json.loads(marker.read_text())
