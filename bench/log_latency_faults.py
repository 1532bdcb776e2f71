"""log() latency while things break, beside the healthy figure, in one run.

    make bench              (or: python bench/log_latency_faults.py [--calls N])

Each scenario runs in a fresh process with its own sidecar (wandb offline, or
online against a local stand-in backend on 127.0.0.1), injects its fault, and
then times N calls of MetricsClient.log with the 14-key dict:

  healthy          nothing wrong
  sidecar-killed   the sidecar was SIGKILLed after the client connected
  sidecar-stalled  the sidecar and its uploaders are SIGSTOPped
  uploader-wedged  the run's wandb-core is SIGSTOPped (run.log blocks forever)
  backend-down     WANDB_MODE=online against a server that never answers
  spool-full       the spool is on a full 2 MiB tmpfs (skipped where mount is not allowed)

Writes bench-out/log_latency_faults.json.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _common import run_scenarios, scenario_args  # noqa: E402
from log_latency import summarize, timed  # noqa: E402

from sidecar.proc import children  # noqa: E402

SCENARIOS = ("healthy", "sidecar-killed", "sidecar-stalled", "uploader-wedged", "backend-down", "spool-full")


def _status(env: dict) -> dict | None:
    r = subprocess.run([sys.executable, "-m", "sidecar", "status", "--json"], env=env, capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def child(scenario: str, calls: int) -> dict | None:
    from client import MetricsClient

    work = Path(tempfile.mkdtemp(prefix="kfs-fb-"))
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(work), WANDB_SILENT="true",
               KFORGE_SIDECAR_ADDR=f"ipc://{work}/sock/s.sock", KFORGE_SPOOL_DIR=str(work / "spool"))  # fmt: skip
    backend = mounted = None
    stopped: list[int] = []
    if scenario == "backend-down":
        from devtools.fakewandb import FakeWandb

        backend = FakeWandb("hang").start()
        env.update(backend.env(WANDB_DIR=str(work)))
    if scenario == "spool-full":
        (work / "spool").mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(work / "spool")], capture_output=True)
        if r.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            return None
        mounted = work / "spool"
    os.environ.update(env)
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--log-level", "ERROR", "--init-timeout", "600"],
        env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    mc = MetricsClient(name=scenario, buffer_size=100_000)
    try:
        assert mc.wait_run_id(30), "sidecar did not answer"
        for s in range(1, 51):  # a live run with an uploader
            mc.log({"warmup": float(s)}, step=s)
        mc.flush(30)
        if scenario == "sidecar-killed":
            os.kill(sidecar.pid, signal.SIGKILL)
        elif scenario == "sidecar-stalled":
            os.killpg(sidecar.pid, signal.SIGSTOP)
            stopped.append(sidecar.pid)
        elif scenario == "uploader-wedged":
            deadline = time.monotonic() + 30
            run = None
            while time.monotonic() < deadline and not (run and run["state"] == "live" and run["uploader_pid"]):
                time.sleep(0.2)
                run = ((_status(env) or {}).get("runs") or [None])[0]
            for pid in children(run["uploader_pid"]):
                os.kill(pid, signal.SIGSTOP)  # released by the killpg(SIGCONT) of its group below
        elif scenario == "spool-full":
            with open(mounted / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
        time.sleep(0.5)
        lat = timed(lambda d, step: mc.log(d, step=step + 100), calls)
        mc.close(timeout=1.0)
        return summarize(lat) | {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        for pid in stopped:
            os.killpg(pid, signal.SIGCONT)
        # each uploader leads its own process group, and its wandb-core has a session of its own
        uploaders = children(sidecar.pid)
        cores = [c for u in uploaders for c in children(u)]
        for pid in [sidecar.pid, *uploaders, *cores]:
            try:
                os.killpg(pid, signal.SIGCONT)
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sidecar.wait()
        if backend is not None:
            backend.stop()
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    a = scenario_args(__doc__, SCENARIOS, "log_latency_faults.json")
    if a.child:
        print(json.dumps(child(a.child, a.calls)))
        return 0
    results = run_scenarios(__file__, a.scenarios.split(","), a.calls, timeout=900)
    if results is None:
        return 1

    healthy = results.get("healthy")
    print(f"\nlog() latency under faults, 14-key dict, {a.calls} calls each (µs)")
    print(f"{'scenario':<16} {'median':>8} {'p99':>8} {'max':>9} {'p99/healthy':>12}")
    for name, r in results.items():
        if r is None:
            print(f"{name:<16} skipped (cannot mount a tmpfs here)")
            continue
        ratio = r["p99_us"] / healthy["p99_us"] if healthy else float("nan")
        print(f"{name:<16} {r['median_us']:>8.2f} {r['p99_us']:>8.2f} {r['max_us']:>9.1f} {ratio:>12.2f}")
    print("\ntarget: p99 under every fault within 2x of healthy")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"calls": a.calls, "results": results}, indent=2))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
