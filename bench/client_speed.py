"""The client's four speed figures (issue #13), each beside its reference measured in the same run.

    PYTHONPATH=. python bench/client_speed.py [--quick]

  log-max    worst log() call over 100k calls (14-key dict, tight loop) against a real
             `kforge-sidecar serve` (wandb offline), vs the worst raw ZeroMQ send of the
             same frames (encode + NOBLOCK send to a PULL sink). Median of 3 runs each,
             interleaved; each run is a fresh process.
  overflow   frames per second delivered (acknowledged) while the trainer logs faster
             than the sidecar takes them and the buffer overflows, vs the same pair
             with a buffer large enough not to overflow. Also: dropped == what did
             not fit (logged - delivered) and the sidecar's count of client drops.
  memory     trainer memory per buffered frame (tracemalloc; no sidecar; every frame
             kept), vs the packed frame's length.
  close      close() with a healthy sidecar (median of several), vs wandb offline
             run.finish() (median of several).

Writes bench-out/client_speed.json (rows: see bench/_common.py). The machine's
other load shows in the references: read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (  # noqa: E402
    metrics,
    push_to_sink,
    sidecar_status,
    start_sidecar,
    stop_process,
    wait_until,
    write_report,
)

FAST_STOP = ("--drain-timeout", "2")  # the bench's spool is thrown away: do not wait for the uploads at the end
DICTS = [metrics(i) for i in range(1000)]  # values vary per step; built outside the timed region


def _lat_summary(ns: list[int], prefix: str = "") -> dict:
    ns = sorted(ns)
    return {
        "calls": len(ns),
        f"{prefix}median_us": statistics.median(ns) / 1000,
        f"{prefix}p99_us": ns[int(len(ns) * 0.99) - 1] / 1000,
        f"{prefix}p9999_us": ns[int(len(ns) * 0.9999) - 1] / 1000,
        f"{prefix}max_us": ns[-1] / 1000,
        f"{prefix}over_1ms": sum(1 for x in ns if x > 1_000_000),
    }


def timed_split(call, calls: int, holds: list[tuple[int, int, int]] | None = None, warmup: int = 2000):
    """Nanoseconds of each call in a tight loop (as _common.timed), and of each one's "own"
    time: the calling thread's CPU time in it, plus the part of it during which the sender
    held the GIL (``holds``: _watch_holds). What is left of the wall time is time no
    thread of ours ran: the OS or the hypervisor gave the core to something else (the
    machine's other load, which no library controls). The clock reads are inside the
    window, so their microsecond counts against the call."""
    for i in range(warmup):
        call(DICTS[i % 1000], i)
    if holds is not None:
        del holds[:]
    # ints only: a tuple per call would feed the garbage collector, whose collections
    # then land in the calls being timed
    starts, ends, cpus = [0] * calls, [0] * calls, [0] * calls
    gc.collect()  # our own lists made old (see _common.timed)
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    for i in range(calls):
        d = DICTS[i % 1000]
        starts[i] = clock()
        c0 = cpu()
        call(d, warmup + i)
        cpus[i] = cpu() - c0
        ends[i] = clock()
    walls = [t1 - t0 for t0, t1 in zip(starts, ends)]
    held = _overlaps(list(zip(starts, ends)), [(h0, h1) for h0, h1, _ in holds or ()])
    return walls, [c + h for c, h in zip(cpus, held)]


def _overlaps(windows: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """For each window, how long ``spans`` cover it (both sorted, neither overlapping itself)."""
    out, j = [0] * len(windows), 0
    for i, (w0, w1) in enumerate(windows):
        while j < len(spans) and spans[j][1] <= w0:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] < w1:
            out[i] += min(w1, spans[k][1]) - max(w0, spans[k][0])
            k += 1
    return out


def _split_summary(walls: list[int], owns: list[int]) -> dict:
    return _lat_summary(walls) | _lat_summary(owns, "own_")


def _client(address: str, name: str, buffer_size: int):
    from client import MetricsClient

    mc = MetricsClient(address=address, name=name, buffer_size=buffer_size)
    mc.log({"warmup": 1.0}, step=0)
    assert mc.flush(60), "sidecar did not answer"
    return mc


# ------------------------------------------------------------------ children (one process each)


def _watch_holds() -> list[tuple[int, int, int]]:
    """The sender thread's GIL holdings: (start, end, CPU ns) from each return of one of its
    blocking calls (a poll, a pause) to the next. The stamps are taken holding the GIL: after
    the call returned, before the next one is made."""
    import zmq

    holds: list[tuple[int, int, int]] = []
    began = [0, 0]
    sender = "kforge-sidecar-client"

    def blocking(real):
        def wrapper(*a, **kw):
            mine = threading.current_thread().name == sender
            if mine and began[0]:
                holds.append((began[0], time.perf_counter_ns(), time.thread_time_ns() - began[1]))
            try:
                return real(*a, **kw)
            finally:
                if mine:
                    began[0], began[1] = time.perf_counter_ns(), time.thread_time_ns()

        return wrapper

    zmq.Poller.poll = blocking(zmq.Poller.poll)
    time.sleep = blocking(time.sleep)  # this child process only; the wrapper looks at the sender's calls alone
    return holds


def _start_sidecar_apart(work: Path, address: str, pin: bool, **kw) -> subprocess.Popen:
    """The bench's sidecar; with ``pin``, the sidecar (and what it starts) on core 0 and this
    process's threads, those it starts later included, on the others: a node where the
    sidecar does not share the train loop's core."""
    import os

    if not pin:
        return start_sidecar(work, address, *FAST_STOP, **kw)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:1])
    try:
        return start_sidecar(work, address, *FAST_STOP, **kw)
    finally:
        os.sched_setaffinity(0, cores[1:])


def child_log_max(work: Path, calls: int, pin: bool = False) -> dict:
    address = f"ipc://{work}/s.sock"
    sc = _start_sidecar_apart(work, address, pin)
    holds = _watch_holds()
    try:
        mc = _client(address, "log-max", max(calls + 10_000, 100_000))
        walls, owns = timed_split(mc.log, calls, holds)
        spans = sorted(h1 - h0 for h0, h1, _ in holds)
        cpu = sorted(c for _, _, c in holds)
        ok = mc.close(timeout=120)
        return _split_summary(walls, owns) | {
            "closed": ok,
            "dropped": mc.stats().dropped,
            "sender_holds": len(spans),
            "sender_hold_max_us": spans[-1] / 1000 if spans else 0.0,
            "sender_hold_cpu_max_us": cpu[-1] / 1000 if cpu else 0.0,
        }
    finally:
        stop_process(sc, grace=120, group=True)


def _raw_send(sock, session: str):
    """encode + NOBLOCK send of each frame, nothing else: the reference for log()."""
    import zmq

    from client import protocol

    seq = 0

    def call(d: dict, step: int) -> None:
        nonlocal seq
        seq += 1
        try:
            sock.send(protocol.encode_metrics(session, seq, step, "train", time.time(), d), zmq.NOBLOCK)
        except zmq.Again:
            pass

    return call


def child_raw_max(work: Path, calls: int) -> dict:
    with push_to_sink(f"ipc://{work}/sink.sock", 1_000_000) as sock:
        return _split_summary(*timed_split(_raw_send(sock, "benchbenchbench0"), calls))


def child_raw_sidecar_max(work: Path, calls: int, pin: bool = False) -> dict:
    """The raw send to a real sidecar (a DEALER after a hello, replies never read): the same
    machine load as log-max (the sidecar's receiver, uploader and wandb-core at work)."""
    import os
    import socket

    import zmq

    from client import protocol

    address = f"ipc://{work}/s.sock"
    sc = _start_sidecar_apart(work, address, pin, wait=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    try:
        sock.connect(address)
        session = "benchrawsidecar0"
        hello = protocol.Hello(session, "bench", "raw-max", None, {}, os.getpid(), socket.gethostname())
        sock.send(protocol.encode(hello))
        assert sock.poll(60_000), "the sidecar did not welcome the raw sender"
        return _split_summary(*timed_split(_raw_send(sock, session), calls))
    finally:
        sock.close()
        ctx.term()
        stop_process(sc, grace=120, group=True)


def child_overflow(work: Path, frames: int, buffer_size: int, pace: int) -> dict:
    """Log ``frames`` frames, ``pace`` calls at a time with a 1 ms breath between (a
    trainer, not a tight loop), then wait until every frame is acknowledged or dropped."""
    address = f"ipc://{work}/s.sock"
    sc = start_sidecar(work, address, *FAST_STOP)
    try:
        mc = _client(address, "overflow", buffer_size)
        before = mc.stats()
        t0 = time.perf_counter()
        for i in range(frames):
            mc.log(DICTS[i % 1000], step=i + 1)
            if i % pace == pace - 1:
                time.sleep(0.001)
        logged_s = time.perf_counter() - t0
        assert mc.flush(300), "not all delivered"
        elapsed = time.perf_counter() - t0
        s = mc.stats()
        delivered = s.acked - before.acked
        ok = mc.close(timeout=60)
        run = wait_until(lambda: ((sidecar_status(work, address) or {}).get("runs") or [None])[0], 30)
        return {
            "frames": frames,
            "buffer": buffer_size,
            "log_rate": frames / logged_s,
            "delivered": delivered,
            "dropped": s.dropped,
            "rate": delivered / elapsed,
            "elapsed_s": elapsed,
            "closed": ok,
            "sidecar_client_dropped": (run or {}).get("client_dropped"),
            "sidecar_received": (run or {}).get("received"),
        }
    finally:
        stop_process(sc, grace=120, group=True)


def child_memory(work: Path, frames: int) -> dict:
    import tracemalloc

    from client import MetricsClient, protocol

    tracemalloc.start()
    mc = MetricsClient(address=f"ipc://{work}/nobody.sock", buffer_size=frames)
    t = mc._transport
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(frames):
        mc.log(DICTS[i % 1000], step=i + 1)
    assert wait_until(lambda: not mc._outbox and t.buffered == frames, 60), "the sender did not take the frames"
    time.sleep(0.2)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    packed = sum(
        len(protocol.encode_metrics(mc._session, i + 1, i + 1, "train", time.time(), DICTS[i % 1000]))
        for i in range(frames)
    )
    mc.close(timeout=0)
    return {"frames": frames, "bytes_per_frame": used / frames, "packed_per_frame": packed / frames}


def child_close(work: Path, trials: int) -> dict:
    address = f"ipc://{work}/s.sock"
    sc = start_sidecar(work, address, *FAST_STOP)
    times = []
    try:
        for k in range(trials):
            mc = _client(address, f"close-{k}", 100_000)
            for i in range(100):
                mc.log(DICTS[i], step=i + 1)
            assert mc.flush(60)
            time.sleep(0.3)  # the sender idle, in its longest wait
            t0 = time.perf_counter()
            ok = mc.close(timeout=60)
            times.append((time.perf_counter() - t0) * 1000)
            assert ok
            time.sleep(0.5)  # let the run's uploader settle
        return {"close_ms": times, "median_ms": statistics.median(times)}
    finally:
        stop_process(sc, grace=120, group=True)


def child_wandb_finish(work: Path, trials: int) -> dict:
    import os

    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(work), WANDB_SILENT="true")
    import wandb

    times = []
    for k in range(trials):
        run = wandb.init(project="bench", name=f"finish-{k}", settings=wandb.Settings(console="off"))
        for i in range(100):
            run.log(DICTS[i], step=i + 1)
        time.sleep(0.3)
        t0 = time.perf_counter()
        run.finish()
        times.append((time.perf_counter() - t0) * 1000)
    return {"finish_ms": times, "median_ms": statistics.median(times)}


CHILDREN = {
    "log-max": lambda w, a: child_log_max(w, a.calls, a.pin),
    "raw-max": lambda w, a: child_raw_max(w, a.calls),
    "raw-sidecar-max": lambda w, a: child_raw_sidecar_max(w, a.calls, a.pin),
    "overflow": lambda w, a: child_overflow(w, a.frames, a.buffer, a.pace),
    "memory": lambda w, a: child_memory(w, a.calls),
    "close": lambda w, a: child_close(w, a.trials),
    "wandb-finish": lambda w, a: child_wandb_finish(w, a.trials),
}


def child(a: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kfs-cs-", dir="/tmp"))  # ipc paths: 107 bytes at most
    try:
        print(json.dumps(CHILDREN[a.child](work, a)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ driver


def run_child(name: str, *args: str, timeout: float = 600) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--child", name, *args], capture_output=True, text=True, timeout=timeout
    )
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def row(what, value, unit, ref_what, ref, ratio, goal, met, detail) -> dict:
    return {
        "what": what, "value": value, "unit": unit, "reference_what": ref_what, "reference": ref,
        "ratio": ratio, "goal": goal, "met": bool(met), "detail": detail,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer calls, one repetition")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", choices=CHILDREN)
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--frames", type=int, default=200_000)
    p.add_argument("--buffer", type=int, default=100_000)
    p.add_argument("--pace", type=int, default=200)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--pin", action="store_true", help="(children) the sidecar on core 0, the trainer on the others")
    a = p.parse_args()
    if a.child:
        child(a)
        return 0

    reps = 1 if a.quick else 3
    calls = 10_000 if a.quick else a.calls
    frames = 20_000 if a.quick else a.frames
    trials = 2 if a.quick else a.trials
    rows = []

    def say(what: str) -> None:
        print(what, file=sys.stderr, flush=True)

    # 1. log() worst case vs raw ZeroMQ, to the same sidecar (sharing the cores, and on a
    # core of its own) and to a bare sink
    say(f"log-max: {reps} x {calls} calls each, client and raw interleaved ...")
    runs: dict[str, list[dict]] = {k: [] for k in ("sink", "raw", "ours", "raw_apart", "ours_apart")}
    for _ in range(reps):
        runs["sink"].append(run_child("raw-max", "--calls", str(calls)))
        for pin in ((), ("--pin",)):
            tail = "_apart" if pin else ""
            runs["raw" + tail].append(run_child("raw-sidecar-max", "--calls", str(calls), *pin))
            runs["ours" + tail].append(run_child("log-max", "--calls", str(calls), *pin))
    detail = {
        "runs": runs,
        "raw_sink_max_us": statistics.median(r["max_us"] for r in runs["sink"]),
        "raw_sink_own_max_us": statistics.median(r["own_max_us"] for r in runs["sink"]),
        "note": "median of the runs' max; ratio = value/reference. The reference sends the same frames raw "
        "(encode + NOBLOCK send, replies never read) to a real sidecar, so both face the same machine load; "
        "*_apart: the sidecar pinned to core 0, the trainer to the others (a node where the sidecar does not "
        "share the train loop's core); raw_sink_*: to a bare PULL sink instead. own_*: each call's CPU time in "
        "the calling thread plus the time in it during which the sender held the GIL: the wall time less the "
        "time no thread of ours ran (the OS or the hypervisor ran something else), which no library controls. "
        "sender_hold_*: the sender's longest GIL holding (from one blocking call to the next), wall and CPU",
    }
    same = "raw ZeroMQ encode+send to the same sidecar"
    for key, tail, what, ref_what in (
        ("max_us", "", "healthy sidecar", same),
        ("max_us", "_apart", "healthy sidecar on another core", same + ", the same way"),
        ("own_max_us", "", "healthy sidecar: log()'s CPU and the sender's GIL holding in it", same + ", its CPU"),
    ):
        v = statistics.median(r[key] for r in runs["ours" + tail])
        ref = statistics.median(r[key] for r in runs["raw" + tail])
        rows.append(row(f"log() max over {calls} calls, {what}", v, "us", ref_what, ref, v / ref, "<= 1000 us",
                        v <= 1000, detail))  # fmt: skip

    # 2. delivery while the buffer overflows vs without overflow
    small = max(frames // 10, 1000)
    say(f"overflow: {frames} frames, buffer {frames} (reference) and {small} (overflowing) ...")
    refs, over = [], []
    for _ in range(reps):
        refs.append(run_child("overflow", "--frames", str(frames), "--buffer", str(frames + 10), "--pace", str(a.pace)))
        over.append(run_child("overflow", "--frames", str(frames), "--buffer", str(small), "--pace", str(a.pace)))
    v = statistics.median(r["rate"] for r in over)
    ref = statistics.median(r["rate"] for r in refs)
    last = over[-1]
    exact = all(
        r["dropped"] + r["delivered"] == r["frames"] and r["sidecar_client_dropped"] == r["dropped"] for r in over
    )
    rows.append(
        row(
            "delivery rate, buffer overflowing",
            v,
            "frames/s",
            "delivery rate, same client/sidecar, no overflow",
            ref,
            v / ref,
            ">= 0.8",
            v / ref >= 0.8 and exact,
            {
                "overflow_runs": over,
                "reference_runs": refs,
                "dropped": last["dropped"],
                "expected_dropped": last["frames"] - last["delivered"],
                "drops_exact": exact,
                "note": "met also needs dropped == logged - delivered == the sidecar's client_dropped in every run",
            },
        )  # fmt: skip
    )

    # 3. memory per buffered frame
    say(f"memory: {calls} frames buffered, no sidecar ...")
    m = run_child("memory", "--calls", str(calls))
    ratio = m["bytes_per_frame"] / m["packed_per_frame"]
    rows.append(
        row(
            "trainer memory per buffered frame (no sidecar)",
            m["bytes_per_frame"],
            "B",
            "packed frame length",
            m["packed_per_frame"],
            ratio,
            "<= 1.5",
            ratio <= 1.5,
            m,
        )  # fmt: skip
    )

    # 4. close() vs wandb offline finish()
    say(f"close: {trials} closes, {trials} wandb offline finishes ...")
    c = run_child("close", "--trials", str(trials))
    w = run_child("wandb-finish", "--trials", str(trials))
    rows.append(
        row(
            "close() with a healthy sidecar (median)",
            c["median_ms"],
            "ms",
            "wandb offline run.finish() (median)",
            w["median_ms"],
            c["median_ms"] / w["median_ms"],
            "<= 10 ms",
            c["median_ms"] <= 10,
            {"close": c, "wandb_finish": w},
        )  # fmt: skip
    )
    write_report("client_speed", rows, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
