"""What the benchmark scripts share: the metric dict, a sidecar process, the JSON report."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"


def metrics(step: int) -> dict[str, float]:
    """The 14-key KempnerForge metric dict (the seed's MetricsTracker._log_step)."""
    loss = 11.0 / (1.0 + 0.01 * step)
    return {
        "train/loss": loss, "train/grad_norm": 1.1, "train/lr": 3e-4, "train/tokens_per_sec": 1.2e5,
        "train/mfu": 0.41, "train/step_time_sec": 0.5, "gpu/allocated_gb": 10.5, "gpu/peak_gb": 12.25,
        "gpu/reserved_gb": 14.0, "gpu/mem_utilization": 0.75, "smoothed/loss": loss,
        "smoothed/tokens_per_sec": 1.19e5, "smoothed/mfu": 0.4, "smoothed/step_time": 0.51,
    }  # fmt: skip


def sidecar_env(work: Path) -> dict[str, str]:
    return dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(work), WANDB_SILENT="true")


def start_sidecar(work: Path, address: str, *args: str) -> subprocess.Popen:
    """``kforge-sidecar serve`` with wandb offline, its spool under ``work``; in its own
    session, so that ``stop_sidecar`` stops its uploaders with it."""
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--address", address, "--spool-dir", str(work / "spool"),
         "--log-level", "WARNING", *args],
        env=sidecar_env(work), cwd=ROOT, start_new_session=True,
    )  # fmt: skip


def stop_sidecar(proc: subprocess.Popen, timeout: float = 120) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def sidecar_status(work: Path, address: str) -> dict | None:
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "--json", "--all", "--address", address,
         "--spool-dir", str(work / "spool")],
        env=sidecar_env(work), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"


def write_report(name: str, rows: list[dict], out: Path | None = None) -> Path:
    """The bench JSON schema (see the lead's bench/report.py), and a short table."""
    out = out or OUT / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": name, "machine": machine(), "rows": rows}, indent=2))
    print(f"\n{name} ({machine()})")
    print(f"{'what':<48} {'value':>19} {'reference':>19} {'ratio':>7}  {'goal':<11} met")
    for r in rows:
        value, ref = f"{r['value']:.4g} {r['unit']}", f"{r['reference']:.4g} {r['unit']}"
        print(
            f"{r['what'][:48]:<48} {value:>19} {ref:>19} {r['ratio']:>7.3g}  {r['goal']:<11} {'yes' if r['met'] else 'NO'}"
        )
    print(f"written to {out}")
    return out
