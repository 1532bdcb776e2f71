"""Sidecar peak RSS: 16 trainers at 300 steps/s each, against a 1M-frame backlog from one.

Scenario (the figure): a real ``python -m sidecar serve`` (WANDB_MODE=offline, a temp
spool) and 16 trainer processes, each a real ``client.MetricsClient`` logging 14-key
steps at 300 steps/s for 20 s (``--quick``: 4 s), then ``close()``. Reference (same
run): one trainer that logged a backlog of 1M frames (``--quick``: 100k) before the
sidecar started, then the sidecar takes it all.

The figure is the server process's peak RSS (VmHWM from /proc/<pid>/status, checked
against RSS sampled every 50 ms). The uploader processes the sidecar starts (one per
run, each with a wandb-core) are not counted; their summed RSS is in ``detail``.

With ``--tracemalloc`` the sidecar runs under tracemalloc and writes its top
allocation sites at exit to bench-out/sidecar_rss.tracemalloc.txt.

    PYTHONPATH=. python bench/sidecar_rss.py [--quick] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import OUT, sidecar_env, start_sidecar, stop_process, write_report  # noqa: E402

GOAL_MIB = 100.0
KEYS = 14

# The sidecar under tracemalloc: its top allocation sites go to a file when it exits.
TRACED = """
import atexit, sys, tracemalloc
tracemalloc.start(1)
def dump(path=sys.argv.pop(1)):
    snap = tracemalloc.take_snapshot()
    cur, peak = tracemalloc.get_traced_memory()
    with open(path, "w") as f:
        f.write(f"traced now {cur / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB\\n")
        for stat in snap.statistics("traceback")[:15]:
            f.write(f"{stat.size / 2**20:.2f} MiB in {stat.count} blocks\\n")
            f.write("\\n".join("    " + line for line in stat.traceback.format()) + "\\n")
atexit.register(dump)
from sidecar.cli import main
sys.argv[0] = "kforge-sidecar"
main()
"""


def trainer_main(steps_per_s: float, seconds: float, frames: int, name: str) -> None:
    """One trainer: ``frames`` > 0 logs that many steps at once (a backlog), else paces
    ``steps_per_s`` for ``seconds``; then close() and report."""
    from client.metrics_client import MetricsClient

    mc = MetricsClient(project="bench-rss", name=name, buffer_size=max(100_000, frames + 10))
    values = {f"train/metric_{i:02d}": 0.0 for i in range(KEYS)}
    step = 0
    if frames:
        for step in range(1, frames + 1):
            values["train/metric_00"] = 1.0 / step
            mc.log(values, step=step)
        print("logged", flush=True)
        sys.stdin.readline()  # the sidecar is up now
    else:
        start = time.monotonic()
        period = 1.0 / steps_per_s
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due = int((now - start) / period) + 1
            while step < due:
                step += 1
                values["train/metric_00"] = 1.0 / step
                mc.log(values, step=step)
            time.sleep(max(0.0, start + step * period - time.monotonic()))
    closed = mc.close(timeout=300)
    st = mc.stats()
    print(json.dumps({"steps": step, "closed": closed, "dropped": st.dropped, "acked": st.acked}), flush=True)


# ------------------------------------------------------------------ measuring


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


class Sampler(threading.Thread):
    """RSS of the server process, and of its descendants (uploaders, wandb-core), every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.peak_others_kib = 0
        self.series: list[tuple[float, int]] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        n = 0
        while not self.halt.wait(0.05):
            rss = proc_status(self.pid).get("VmRSS", 0)
            self.peak_kib = max(self.peak_kib, rss)
            if n % 10 == 0:
                self.series.append((round(time.monotonic() - self.t0, 1), rss // 1024))
                others = sum(proc_status(p).get("VmRSS", 0) for p in descendants(self.pid))
                self.peak_others_kib = max(self.peak_others_kib, others)
            n += 1


def start_traced_sidecar(base: Path, traced: Path | None) -> tuple[subprocess.Popen, dict, str]:
    """The sidecar (under tracemalloc when ``traced``) with its socket up; its env (for trainers), its address."""
    os.chmod(base, 0o700)
    address = f"ipc://{base}/sock/sidecar.sock"
    env = sidecar_env(base, KFORGE_SIDECAR_ADDR=address)
    server = start_sidecar(
        base, address, "--no-system-metrics", "--drain-timeout", "2", "--max-runs", "64", env=env,
        program=("-c", TRACED, str(traced)) if traced else ("-m", "sidecar"), log_level="INFO",
        log=base / "sidecar.log", cwd=base, wait=True,
    )  # fmt: skip
    return server, env, address


def trainer(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--trainer", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def report(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def scenario_many(trainers: int, rate: float, seconds: float, traced: Path | None) -> dict:
    base = Path(tempfile.mkdtemp(prefix="kfs-rss-", dir="/tmp"))
    server, env, _ = start_traced_sidecar(base, traced)
    procs: list[subprocess.Popen] = []
    try:
        start_kib = proc_status(server.pid).get("VmRSS", 0)
        sampler = Sampler(server.pid)
        sampler.start()
        t0 = time.monotonic()
        procs = [trainer(env, str(rate), str(seconds), "0", f"t{i}") for i in range(trainers)]
        reports = [report(p, seconds + 300) for p in procs]
        wall = time.monotonic() - t0
        sampler.halt.set()
        sampler.join()
        hwm = proc_status(server.pid).get("VmHWM", 0)
        return {
            "peak_mib": max(hwm, sampler.peak_kib) / 1024,
            "start_mib": start_kib / 1024,
            "uploaders_peak_mib_not_counted": sampler.peak_others_kib / 1024,
            "wall_s": round(wall, 1),
            "frames": sum(r["steps"] for r in reports),
            "dropped": sum(r["dropped"] for r in reports),
            "all_closed": all(r["closed"] for r in reports),
            "rss_mib_series": sampler.series[:: max(1, len(sampler.series) // 40)],
        }
    finally:
        for p in procs:
            stop_process(p)
        stop_process(server, group=True)
        if not os.environ.get("KFORGE_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


def scenario_backlog(frames: int, traced: Path | None) -> dict:
    base = Path(tempfile.mkdtemp(prefix="kfs-rss-", dir="/tmp"))
    server = None
    os.chmod(base, 0o700)
    env = sidecar_env(base, KFORGE_SIDECAR_ADDR=f"ipc://{base}/sock/sidecar.sock")
    tr = trainer(env, "0", "0", str(frames), "backlog")
    try:
        assert "logged" in tr.stdout.readline()
        server, _, _ = start_traced_sidecar(base, traced)
        sampler = Sampler(server.pid)
        sampler.start()
        t0 = time.monotonic()
        tr.stdin.write("go\n")
        tr.stdin.flush()
        rep = report(tr, 600)
        sampler.halt.set()
        sampler.join()
        hwm = proc_status(server.pid).get("VmHWM", 0)
        return {
            "peak_mib": max(hwm, sampler.peak_kib) / 1024,
            "frames": frames,
            "acked": rep["acked"],
            "closed": rep["closed"],
            "wall_s": round(time.monotonic() - t0, 1),
            "uploaders_peak_mib_not_counted": sampler.peak_others_kib / 1024,
        }
    finally:
        stop_process(tr)
        if server is not None:
            stop_process(server, group=True)
        if not os.environ.get("KFORGE_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--trainers", type=int, default=16)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--backlog", type=int, default=None)
    args = ap.parse_args()
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    backlog = args.backlog or (100_000 if args.quick else 1_000_000)
    OUT.mkdir(exist_ok=True)
    traced = (OUT / "sidecar_rss.tracemalloc.txt").resolve() if args.tracemalloc else None

    many = scenario_many(args.trainers, args.rate, seconds, traced)
    ref = scenario_backlog(backlog, None)
    row = {
        "what": f"sidecar server peak RSS, {args.trainers} trainers x {args.rate:g} steps/s x {seconds:g} s "
        f"({KEYS}-key frames, real MetricsClient; uploaders not counted)",
        "value": round(many["peak_mib"], 1),
        "unit": "MiB",
        "reference_what": f"sidecar server peak RSS taking a {backlog}-frame backlog from one trainer "
        "(logged before the sidecar started), same run",
        "reference": round(ref["peak_mib"], 1),
        "ratio": round(many["peak_mib"] / ref["peak_mib"], 3),
        "goal": f"<= {GOAL_MIB:g} MiB",
        "met": many["peak_mib"] <= GOAL_MIB,
        "detail": {"trainers": many, "backlog": ref, "system_metrics": False},
    }
    write_report("sidecar_rss", [row])
    print(
        f"  trainers: start {many['start_mib']:.0f} MiB, {many['frames']} frames in {many['wall_s']} s, "
        f"dropped {many['dropped']}, all closed {many['all_closed']}; uploaders (not counted) "
        f"peak {many['uploaders_peak_mib_not_counted']:.0f} MiB"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trainer":
        trainer_main(float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
