"""How much does one log() call cost the train loop?

    make bench              (or: python bench/log_latency.py [--calls N])

Times each call of the 14-key KempnerForge metric dict (the seed's
MetricsTracker._log_step) with time.perf_counter_ns, in a tight loop, in
these scenarios, each in a fresh process:

  floor        raw ZeroMQ + msgpack: packb(dict) and a NOBLOCK send on a
               connected PUSH socket (a sink process drains it)
  healthy      MetricsClient.log against a running kforge-sidecar (wandb offline)
  no-sidecar   MetricsClient.log with nothing listening (frames buffer, then drop)
  in-process   the seed's pattern: wandb.log(d, step=...) in the trainer, offline

Prints median, p99 and max per scenario plus each process's peak RSS, and
writes bench-out/log_latency.json. A tight loop is the worst case for the
client (its sender thread competes for the GIL on every tick); a real step
loop calls log() once per step.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import push_to_sink, run_scenarios, scenario_args, start_sidecar, stop_process, timed  # noqa: E402

SCENARIOS = ("floor", "healthy", "no-sidecar", "in-process")


def summarize(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    return {
        "calls": len(ns),
        "median_us": statistics.median(ns) / 1000,
        "p99_us": ns[int(len(ns) * 0.99) - 1] / 1000,
        "max_us": ns[-1] / 1000,
    }


# ------------------------------------------------------------------ scenarios (child side)


def run_floor(calls: int, work: Path) -> list[int]:
    import msgpack
    import zmq

    with push_to_sink(f"ipc://{work}/floor.sock", 100_000) as sock:

        def call(d: dict, step: int) -> None:
            try:
                sock.send(msgpack.packb({"step": step, "values": d}), zmq.NOBLOCK)
            except zmq.Again:
                pass

        return timed(call, calls)


def run_client(calls: int, work: Path, with_sidecar: bool) -> list[int]:
    from client import MetricsClient

    addr = f"ipc://{work}/sock/sidecar.sock"
    sidecar = None
    if with_sidecar:
        sidecar = start_sidecar(work, addr)
    # room for every call and the warm-up: the healthy scenario times log(), not the overflow path
    mc = MetricsClient(address=addr, name="bench", buffer_size=calls + 20_000)
    try:
        if with_sidecar:
            assert mc.wait_run_id(30), "sidecar did not answer"
        lat = timed(mc.log, calls)
        if with_sidecar:
            ok = mc.close(timeout=120)
            s = mc.stats()
            print(f"  healthy: close ok={ok}, stats={s}", file=sys.stderr)
        else:
            mc.close(timeout=0.1)
        return lat
    finally:
        if sidecar is not None:
            stop_process(sidecar, grace=120, group=True)


def run_in_process(calls: int, work: Path) -> list[int]:
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(work), WANDB_SILENT="true")
    import wandb

    run = wandb.init(project="bench", name="in-process", settings=wandb.Settings(console="off", x_disable_stats=True))
    try:
        return timed(lambda d, step: run.log(d, step=step), calls)
    finally:
        run.finish()


def child(scenario: str, calls: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="kfs-bench-"))
    try:
        if scenario == "floor":
            lat = run_floor(calls, work)
        elif scenario == "healthy":
            lat = run_client(calls, work, with_sidecar=True)
        elif scenario == "no-sidecar":
            lat = run_client(calls, work, with_sidecar=False)
        else:
            lat = run_in_process(calls, work)
        result = summarize(lat) | {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ driver


def main() -> int:
    a = scenario_args(__doc__, SCENARIOS, "log_latency.json")
    if a.child:
        child(a.child, a.calls)
        return 0
    results = run_scenarios(__file__, a.scenarios.split(","), a.calls, timeout=1800)
    if results is None:
        return 1

    print(f"\nlog() latency, 14-key dict, {a.calls} calls each (µs)")
    print(f"{'scenario':<12} {'median':>8} {'p99':>8} {'max':>9} {'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:<12} {r['median_us']:>8.2f} {r['p99_us']:>8.2f} {r['max_us']:>9.1f} {r['peak_rss_mb']:>12.0f}")
    if {"floor", "healthy", "in-process"} <= results.keys():
        f, h, w = results["floor"], results["healthy"], results["in-process"]
        print(f"\nhealthy p99 / floor p99       = {h['p99_us'] / f['p99_us']:.2f}  (target <= 3)")
        print(f"in-process p99 / healthy p99  = {w['p99_us'] / h['p99_us']:.1f}  (target >= 10)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"calls": a.calls, "python": sys.version.split()[0], "results": results}, indent=2))
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
