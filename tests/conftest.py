"""Fixtures that run the real thing: a sidecar process, trainer processes, wandb offline.

Every process a test starts has a deadline and is stopped by its own pid (the
sidecar runs in its own session, so its process group id is its pid and the
uploaders it started go with it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from sidecar.proc import children  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
TRAINER = Path(__file__).resolve().parent / "trainer.py"


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, group: bool = False, grace: float = 5.0) -> None:
    """Stop a process we started, by its own pid (and its group, if it leads one)."""
    if proc.poll() is None:
        try:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # uploaders left behind, if any
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@dataclass
class Env:
    """Paths and environment for one test: its own socket, spool and wandb dir."""

    base: Path
    address: str
    spool: Path
    wandb_dir: Path
    extra: dict[str, str] = field(default_factory=dict)

    def vars(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "KFORGE_SIDECAR_ADDR": self.address,
                "KFORGE_SPOOL_DIR": str(self.spool),
                "WANDB_MODE": "offline",
                "WANDB_DIR": str(self.wandb_dir),
                "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("RANK", None)
        env.update(self.extra)
        return env


@pytest.fixture
def env() -> Env:
    # ipc paths are limited to 107 bytes: keep the base short, not under pytest's tmp_path.
    base = Path(tempfile.mkdtemp(prefix="kfs-", dir="/tmp"))
    os.chmod(base, 0o700)
    (base / "wandb").mkdir()
    e = Env(base=base, address=f"ipc://{base}/sock/sidecar.sock", spool=base / "spool", wandb_dir=base / "wandb")
    yield e
    shutil.rmtree(base, ignore_errors=True)


class Sidecar:
    """A real ``kforge-sidecar serve`` process."""

    def __init__(self, env: Env, *args: str):
        self.env = env
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.log_path = env.base / "sidecar.log"

    def start(self, wait: bool = True) -> "Sidecar":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--log-level", "DEBUG", *self.args],
            env=self.env.vars(),
            cwd=self.env.base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pid is its process group id: one kill stops uploaders too
        )
        if wait:
            wait_for(lambda: self.proc.poll() is not None or self.status() is not None, 30, what="sidecar to answer")
            assert self.proc.poll() is None, f"sidecar exited: {self.log()}"
        return self

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            env=self.env.vars(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict | None:
        r = self.cli("status", "--json", "--timeout", "1")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def run(self, run_id: str) -> dict | None:
        s = self.status()
        for r in (s or {}).get("runs", []):
            if r["run_id"] == run_id:
                return r
        return None

    def wait_run(self, run_id: str, state: str, timeout: float = 60) -> dict:
        return wait_for(
            lambda: (r := self.run(run_id)) is not None and r["state"] == state and r,
            timeout,
            interval=0.2,
            what=f"run {run_id} to be {state} (sidecar log: {self.log_path})",
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            stop_process(self.proc, group=True)

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, group=True)
            self._log.close()


@pytest.fixture
def sidecar(env: Env):
    started: list[Sidecar] = []

    def make(*args: str, start: bool = True) -> Sidecar:
        sc = Sidecar(env, *args)
        started.append(sc)
        return sc.start() if start else sc

    yield make
    for sc in started:
        sc.kill()


@pytest.fixture
def raw(env: Env):
    """A bare DEALER socket on the sidecar's address: frames no MetricsClient would send."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(env.address)
    yield sock
    sock.close()
    ctx.term()


def run_trainer(env: Env, *args: str, timeout: float = 120) -> dict:
    """Run tests/trainer.py in its own process; return the JSON report it prints last."""
    r = subprocess.run(
        [sys.executable, str(TRAINER), *args],
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"trainer failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_trainer(env: Env, *args: str, script: Path = TRAINER) -> subprocess.Popen:
    """tests/trainer.py (or another trainer script that prints a JSON report last) in
    the background, with tests/ importable; pair with ``finish_trainer``."""
    env_vars = env.vars()
    env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAINER.parent), env_vars.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env_vars,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_trainer(proc: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{stdout}\n{stderr}"
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["raised"] is None, f"log() raised: {out['raised']}"
    return out


# ------------------------------------------------------------------ wandb's record


def run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """A run's .wandb files, one per wandb.init, in the order wandb wrote them. Two inits in
    the same second share a directory name, and wandb gives the later one a ``-1`` suffix."""
    pattern = re.compile(rf"(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?$")
    found = []
    for f in wandb_dir.glob(f"wandb/*-{run_id}*/run-{run_id}.wandb"):
        m = pattern.search(f.parent.name)
        if m:
            found.append(((m[1], int(m[2] or 0)), f))
    return [f for _, f in sorted(found)]


def wandb_file(wandb_dir: Path, run_id: str) -> Path:
    files = run_files(wandb_dir, run_id)
    assert files, f"no .wandb file for run {run_id} under {wandb_dir}"
    return files[-1]


def wandb_cli() -> str:
    """The `wandb` command that reads records back: $KFORGE_TEST_WANDB_CLI if set
    (`make test-wandb-min` tests an older wandb, which has no `leet inspect`, and reads
    its files with the newest one's reader), else this interpreter's (a venv), else the
    one on PATH (wheels installed with --target on a GPU machine)."""
    env = os.environ.get("KFORGE_TEST_WANDB_CLI")
    if env:
        return env
    beside = Path(sys.executable).parent / "wandb"
    return str(beside) if beside.exists() else (shutil.which("wandb") or str(beside))


def wandb_records(path: Path) -> list[dict]:
    """Every record of a .wandb file, as wandb itself reads it back."""
    r = subprocess.run(
        [wandb_cli(), "leet", "inspect", "--json", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def wandb_history(path: Path) -> dict[int, dict]:
    """step -> the row wandb recorded (every logged key, minus wandb's own _keys)."""
    rows: dict[int, dict] = {}
    for rec in wandb_records(path):
        if rec.get("type") == "history":
            item = rec["history"]["item"]
            step = item["_step"]
            assert step not in rows, f"step {step} recorded twice"
            rows[step] = {k: v for k, v in item.items() if not k.startswith("_")}
    return rows


def all_history(wandb_dir: Path, run_id: str) -> tuple[dict[int, dict], int]:
    """Every (step, key, value) of a run across all its .wandb files (offline, a
    restarted uploader starts a new file). Returns step -> {key: value}, and how
    many values were recorded more than once; a repeat must be an exact copy."""
    files = run_files(wandb_dir, run_id)
    assert files, f"no .wandb file for run {run_id} under {wandb_dir}"
    rows: dict[int, dict] = {}
    dups = 0
    for f in files:
        for step, row in wandb_history(f).items():
            merged = rows.setdefault(step, {})
            for key, value in row.items():
                if key in merged:
                    assert merged[key] == value, f"step {step} {key}: {merged[key]} and {value}"
                    dups += 1
                merged[key] = value
    return rows, dups


def wandb_summary(path: Path) -> dict:
    r = subprocess.run(
        [wandb_cli(), "leet", "inspect", "--summary", "--json", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def chart(wandb_dir: Path, run_id: str) -> dict[int, dict]:
    """What the run's chart holds once wandb has taken every segment in order (what
    ``wandb sync`` or the server does): a segment with a branch point first erases the
    rows above it (a rewind); a continuing segment's rows at or below the run's last
    step are dropped, as wandb drops them, unless they only repeat what is there."""
    files = run_files(wandb_dir, run_id)
    assert files, f"no .wandb file for run {run_id} under {wandb_dir}"
    rows: dict[int, dict] = {}
    for f in files:
        records = wandb_records(f)
        branch = next((r["run"].get("branch_point") for r in records if r.get("type") == "run"), None)
        if branch:
            rows = {s: row for s, row in rows.items() if s <= branch["value"]}
        top = max(rows, default=-1)
        for step, row in wandb_history(f).items():
            if step > top:
                rows[step] = row
            else:
                lost = {k: v for k, v in row.items() if rows.get(step, {}).get(k) != v}
                assert not lost, f"segment {f.parent.name} step {step}: wandb drops {lost} (below step {top})"
    return rows
