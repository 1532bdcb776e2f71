"""How fast does the uploader drain a spooled backlog into wandb (offline)?

    PYTHONPATH=. python bench/uploader_drain.py [--quick] [--frames N] [--pairs K]

Setup (not timed): a spool with one run holding a hello, N metrics frames of the
14-key KempnerForge metric dict (steps 0..N-1) and a close, written with
spool.RunLog exactly as the receiver stores them.

Timed, each from process start to exit, as the parent sees it:

  reference  a bare loop in one process: wandb.init(mode="offline"), run.log(values,
             step=s) for the same N rows, run.finish()
  ours       ``python -m sidecar.uploader --config JSON`` in sync mode (what
             ``kforge-sidecar sync`` starts) draining the spool, then finishing

Same wandb settings where they matter: offline, console off, system stats off
(ours also sets its transaction-log flush interval, which its cursor needs).
Each run's .wandb file is read back afterwards; a run that did not record every
step 0..N-1 exactly once (with all 14 keys) fails the bench instead of reporting
a ratio. Seven pairs, interleaved (reference, ours; the next pair ours first); the
row's ratio is the median of the pairs' own ratios (the machine's speed drifts
between minutes by more than the gap measured: single pairs spread over +-6% on
a 2-core machine, so five left the median's own error near the gap to the goal),
its two rates the medians of each side. Compare only figures from one run.

``--profile`` runs ours once more under ``python -m cProfile``
and prints the top functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import metrics, write_report  # noqa: E402

RUN_ID = "benchdrain1"
SESSION = "bench-session-0001"
DEADLINE = 300.0  # seconds one child may take before it is killed


KEYS = len(metrics(0))


# ------------------------------------------------------------------ setup


def make_spool(root: Path, frames: int) -> Path:
    """A spool holding one closed run of ``frames`` metrics frames; returns the run's directory."""
    from client import protocol
    from client.protocol import Close, Hello
    from sidecar.spool import RunMeta, Spool

    spool = Spool(root)
    spool.ensure()
    meta = RunMeta(run_id=RUN_ID, project="bench", name="drain", config={"lr": 3e-4}, host=platform.node(), pid=1)
    run = spool.create_run(meta)
    hello = Hello(session=SESSION, project="bench", name="drain", run_id=RUN_ID, config={"lr": 3e-4}, pid=1, host="h")
    run.log.open_for_append()
    run.log.append(protocol.encode(hello))
    t0 = time.time()
    for s in range(frames):
        run.log.append(protocol.encode_metrics(SESSION, s + 1, s, "train", t0 + s * 1e-3, metrics(s)))
    run.log.append(protocol.encode(Close(session=SESSION, seq=frames + 1, exit_code=0)))
    run.log.sync()
    run.log.close()
    return run.dir


# ------------------------------------------------------------------ checks


def history_steps(wandb_dir: Path) -> tuple[list[int], int]:
    """(every history step, rows without all keys) of the one .wandb file under ``wandb_dir``,
    read back with wandb's own protobuf (the txlog.py format)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one .wandb file under {wandb_dir}, found {files}"
    data = files[0].read_bytes()
    block, head = 32 * 1024, struct.Struct("<IHB")
    pos, parts, steps, short = 7, [], [], 0
    while True:
        left = block - pos % block
        if left < head.size:
            pos += left
            continue
        if pos + head.size > len(data):
            break
        _, length, kind = head.unpack_from(data, pos)
        if kind == 0 or pos + head.size + length > len(data):
            break
        parts.append(data[pos + head.size : pos + head.size + length])
        pos += head.size + length
        if kind in (1, 4):
            rec = pb.Record.FromString(b"".join(parts))
            parts = []
            if rec.HasField("history"):
                steps.append(rec.history.step.num)
                keys = {item.key or "/".join(item.nested_key) for item in rec.history.item}
                short += not all(k in keys for k in metrics(0))
    return steps, short


def check(wandb_dir: Path, frames: int) -> dict:
    steps, short = history_steps(wandb_dir)
    ok = sorted(steps) == list(range(frames)) and short == 0
    return {"rows": len(steps), "distinct": len(set(steps)), "rows_missing_keys": short, "complete": ok}


# ------------------------------------------------------------------ timed runs


def env_for(wandb_dir: Path) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KFORGE_BENCH_PROFILE", None)
    return env


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one child from start to exit; CPU counts the child and what it
    reaped (wandb-core, when it outlives the child, is not in it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(DEADLINE)
    except BaseException as exc:  # past the deadline, or the bench interrupted: no child outlives it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"{argv[:3]} ran past {DEADLINE}s") from None
        raise
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{argv[:3]} exited {rc}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def run_reference(work: Path, frames: int) -> tuple[float, dict]:
    wandb_dir = work / "ref"
    wandb_dir.mkdir()
    wall, cpu = timed([sys.executable, __file__, "--reference-child", str(frames)], env_for(wandb_dir))
    return wall, {"cpu_s": round(cpu, 2)} | check(wandb_dir, frames)


def run_ours(work: Path, frames: int, spool_src: Path, profile: Path | None = None) -> tuple[float, dict]:
    from sidecar.config import UploaderConfig
    from sidecar.supervisor import uploader_argv

    wandb_dir = work / "ours"
    wandb_dir.mkdir()
    spool = work / "spool"
    shutil.copytree(spool_src, spool)  # a fresh cursor every time
    run_dir = spool / "runs" / RUN_ID
    cfg = UploaderConfig(
        run_dir=run_dir, init_timeout=60.0, finish_timeout=120.0, flush_interval=1.0, drain_timeout=30.0,
        log_level="WARNING", system_metrics=False, sync=True,
    )  # fmt: skip
    env = env_for(wandb_dir)
    argv = uploader_argv(cfg)
    if profile is not None:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile), *argv[1:]]
    wall, cpu = timed(argv, env)
    state = json.loads((run_dir / "uploader.json").read_text())
    detail = {"cpu_s": round(cpu, 2)} | check(wandb_dir, frames)
    detail |= {"state": state["state"], "uploaded": state["uploaded"], "trusted": state["trusted"]}
    detail["complete"] = detail["complete"] and state["state"] == "finished" and state["trusted"] == frames
    return wall, detail


def reference_child(frames: int) -> None:
    import wandb

    rows = [metrics(s) for s in range(frames)]
    settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
    run = wandb.init(mode="offline", project="bench", id=RUN_ID, name="drain", config={"lr": 3e-4}, settings=settings)
    for s, values in enumerate(rows):
        run.log(values, step=s)
    run.finish()


# ------------------------------------------------------------------ driver


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10k frames, one pair")
    p.add_argument("--frames", type=int)
    p.add_argument("--pairs", type=int)
    p.add_argument("--only", choices=("reference", "ours"))
    p.add_argument("--profile", action="store_true", help="also run ours once under cProfile and print the top")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "uploader_drain.json")
    p.add_argument("--reference-child", type=int)
    a = p.parse_args()
    if a.reference_child is not None:
        reference_child(a.reference_child)
        return 0
    frames = a.frames or (10_000 if a.quick else 100_000)
    pairs = a.pairs or (1 if a.quick else 7)

    base = Path(tempfile.mkdtemp(prefix="kfs-drain-"))
    try:
        spool_src = base / "spool-src"
        make_spool(spool_src, frames)
        refs: list[float] = []
        ours: list[float] = []
        details: list[dict] = []
        for i in range(pairs):
            # each pair's order alternates: neither side always runs after the other
            for which in ("reference", "ours") if i % 2 == 0 else ("ours", "reference"):
                if a.only and a.only != which:
                    continue
                work = base / f"{which}-{i}"
                work.mkdir()
                if which == "reference":
                    wall, detail = run_reference(work, frames)
                    refs.append(wall)
                else:
                    wall, detail = run_ours(work, frames, spool_src)
                    ours.append(wall)
                detail = {"what": which, "pair": i, "wall_s": round(wall, 3)} | detail
                details.append(detail)
                print(json.dumps(detail), file=sys.stderr, flush=True)
                if not detail["complete"]:
                    raise SystemExit(f"{which}: the run did not record every row: {detail}")
                shutil.rmtree(work, ignore_errors=True)
        if a.profile:
            work = base / "profile"
            work.mkdir()
            prof = base / "uploader.prof"
            run_ours(work, frames, spool_src, profile=prof)
            import pstats

            st = pstats.Stats(str(prof))
            st.sort_stats("tottime").print_stats(25)
            st.sort_stats("cumulative").print_stats("sidecar/", 25)  # ours, within the whole
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if not refs or not ours:
        return 0
    ref, our = statistics.median(refs), statistics.median(ours)
    value, reference = frames / our, frames / ref
    # The machine's speed drifts by more than the difference measured: the ratio is the median
    # of each interleaved pair's own ratio, not the ratio of two medians from different minutes.
    pair_ratios = [r / o for r, o in zip(refs, ours)]
    ratio = statistics.median(pair_ratios)
    row = {
        "what": f"uploader drains {frames} spooled 14-key frames into wandb offline (sync, start to exit)",
        "value": round(value, 1),
        "unit": "rows/s",
        "reference_what": "bare wandb offline loop: init, run.log(values, step=s) per row, finish (start to exit)",
        "reference": round(reference, 1),
        "ratio": round(ratio, 3),
        "goal": ">= 0.95",
        "met": ratio >= 0.95,
        "detail": {
            "frames": frames,
            "pairs": pairs,
            "pair_ratios": [round(r, 3) for r in pair_ratios],
            "note": "ratio: the median of the pairs' ratios; value and reference: the medians of each side",
            "ours_wall_s": [round(w, 3) for w in ours],
            "reference_wall_s": [round(w, 3) for w in refs],
            "runs": details,
        },
    }
    write_report("uploader_drain", [row], a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
