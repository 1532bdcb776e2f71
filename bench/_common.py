"""What the benchmark scripts share: the metric dict, a sidecar process, the JSON report."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"

# A process that drains a PULL socket: the other end of a raw ZeroMQ floor.
SINK = """
import sys, zmq
sock = zmq.Context().socket(zmq.PULL)
sock.bind(sys.argv[1])
while True:
    sock.recv()
"""


def metrics(step: int) -> dict[str, float]:
    """The 14-key KempnerForge metric dict (the seed's MetricsTracker._log_step)."""
    loss = 11.0 / (1.0 + 0.01 * step)
    return {
        "train/loss": loss, "train/grad_norm": 1.1, "train/lr": 3e-4, "train/tokens_per_sec": 1.2e5,
        "train/mfu": 0.41, "train/step_time_sec": 0.5, "gpu/allocated_gb": 10.5, "gpu/peak_gb": 12.25,
        "gpu/reserved_gb": 14.0, "gpu/mem_utilization": 0.75, "smoothed/loss": loss,
        "smoothed/tokens_per_sec": 1.19e5, "smoothed/mfu": 0.4, "smoothed/step_time": 0.51,
    }  # fmt: skip


def sidecar_env(work: Path, **extra: str) -> dict[str, str]:
    """A sidecar's (and its trainers') environment: wandb offline under ``work``, the spool in
    ``work/spool``, this checkout first on the path; ``extra`` on top (e.g. KFORGE_SIDECAR_ADDR)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(work), WANDB_SILENT="true",
                KFORGE_SPOOL_DIR=str(work / "spool"), PYTHONPATH=path, **extra)  # fmt: skip


def start_sidecar(
    work: Path,
    address: str,
    *args: str,
    env: dict[str, str] | None = None,
    program: tuple[str, ...] = ("-m", "sidecar"),
    log_level: str = "WARNING",
    log: Path | None = None,
    cwd: Path = ROOT,
    wait: bool = False,
) -> subprocess.Popen:
    """``kforge-sidecar serve`` with wandb offline, its spool under ``work``; in its own session,
    so that ``stop_process(..., group=True)`` stops its uploaders with it. ``env``: instead of
    ``sidecar_env(work)``; ``program``: what python runs instead of ``-m sidecar`` (a traced
    sidecar); ``log``: its stdout and stderr go there; ``wait``: until its ipc socket exists."""
    out = open(log, "wb") if log else None
    try:
        proc = subprocess.Popen(
            [sys.executable, *program, "serve", "--address", address, "--spool-dir", str(work / "spool"),
             "--log-level", log_level, *args],
            env=env or sidecar_env(work), cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )  # fmt: skip
    finally:
        if out:
            out.close()  # the sidecar has its own copy
    if wait:
        sock = Path(address.removeprefix("ipc://"))
        wait_until(lambda: proc.poll() is not None or sock.exists(), 30)
        if proc.poll() is not None or not sock.exists():
            stop_process(proc, group=True)
            raise RuntimeError(f"sidecar did not start: {log.read_text()[-2000:] if log else proc.returncode}")
    return proc


def stop_process(proc: subprocess.Popen, grace: float = 30, group: bool = False) -> None:
    """Stop a process we started, by its own pid: SIGTERM, up to ``grace`` s, then SIGKILL.
    ``group`` (a sidecar: it leads its own session): the whole group gets the SIGTERM, so its
    uploaders stop with it, and a SIGKILL after, for any left behind."""
    if proc.poll() is None:
        try:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def sidecar_status(work: Path, address: str) -> dict | None:
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "--json", "--all", "--address", address,
         "--spool-dir", str(work / "spool")],
        env=sidecar_env(work), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return json.loads(r.stdout) if r.returncode == 0 else None


def timed(call, calls: int, warmup: int = 2000) -> list[int]:
    """Nanoseconds of each ``call(metrics dict, step)`` in a tight loop, after ``warmup`` calls."""
    # values vary per step, as in training; the dicts are built outside the timed region
    dicts = [metrics(i) for i in range(1000)]
    for i in range(warmup):
        call(dicts[i % 1000], i)
    out = [0] * calls
    # The harness's own containers (these lists, the dicts) made old before timing: a young
    # collection, in whichever thread it falls, visits every item of a young list, and the
    # 100k-item result lists alone cost one collection 2-4 ms, charged to the call it hit.
    gc.collect()
    clock = time.perf_counter_ns
    for i in range(calls):
        d = dicts[i % 1000]
        t0 = clock()
        call(d, warmup + i)
        out[i] = clock() - t0
    return out


@contextmanager
def push_to_sink(address: str, hwm: int) -> Iterator:
    """A ZeroMQ PUSH socket (LINGER 0, SNDHWM ``hwm``) connected to a sink process that drains it."""
    import zmq

    sink = subprocess.Popen([sys.executable, "-c", SINK, address])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.connect(address)
    time.sleep(0.5)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()
        sink.kill()
        sink.wait()


def scenario_args(doc: str | None, scenarios: tuple[str, ...], out: str) -> argparse.Namespace:
    """The command line of a bench that runs each scenario in a fresh child of its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--scenarios", default=",".join(scenarios))
    p.add_argument("--out", type=Path, default=OUT / out)
    p.add_argument("--child", choices=scenarios)
    return p.parse_args()


def run_scenarios(script: str, names: list[str], calls: int, timeout: float) -> dict[str, Any] | None:
    """Each scenario in a fresh process (``script --child NAME``), so that no thread, socket
    or garbage of one reaches the next; the last line a child prints is its JSON result.
    None, having said which one failed, if one does."""
    results: dict[str, Any] = {}
    for name in names:
        print(f"running {name} ({calls} calls)...", file=sys.stderr, flush=True)
        r = subprocess.run(
            [sys.executable, script, "--child", name, "--calls", str(calls)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        sys.stderr.write(r.stderr[-3000:])
        if r.returncode != 0:
            print(f"{name} failed", file=sys.stderr)
            return None
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return results


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
