"""A GPU step loop that logs KempnerForge's 14 keys as CUDA tensors every step.

One run, three scenarios, interleaved (a b c a b c ...) so that a drifting
machine hits them alike:
  (a) no logging: the step loop alone (the reference);
  (b) the seed's pattern: ``.item()`` per value, then in-process ``wandb.log`` (offline);
  (c) this client: ``MetricsClient.log`` with the CUDA tensors, a real sidecar beside it.
Each step is a fixed stack of bf16 matmuls (``--dim``, ``--matmuls``: a few ms
on an H100/H200). Reports steps/s of each, the ratios b/a and c/a, and the host
synchronisations per step, counted with ``torch.cuda.set_sync_debug_mode("warn")``.
Goal: c/a >= 0.99 with 0 syncs per step.

    python bench/gpu_step_loop.py [--steps 500] [--rounds 3] [--out bench-out/gpu_step_loop.json]

``--device cpu`` runs the same code on the CPU (tiny sizes) to check the script
itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = (
    "train/loss", "train/grad_norm", "train/lr", "train/tokens_per_sec", "train/mfu",
    "train/step_time_sec", "gpu/allocated_gb", "gpu/peak_gb", "gpu/reserved_gb",
    "gpu/mem_utilization", "smoothed/loss", "smoothed/tokens_per_sec", "smoothed/mfu",
    "smoothed/step_time",
)  # fmt: skip


def step_fn(torch, x, w, matmuls: int):
    for _ in range(matmuls):
        x = torch.tanh(x @ w)
    return x


def metrics(torch, x) -> dict:
    """14 device scalars derived from the step's output, as a trainer's would be."""
    m = x.float().mean()
    s = x.float().abs().amax()
    base = [
        m,
        s,
        m * 0 + 3e-4,
        s * 1e5,
        m.abs(),
        s * 1e-3,
        m + 10,
        s + 12,
        m + 14,
        s * 0.1,
        m * 1.01,
        s * 99,
        m * 0.4,
        s * 0.5,
    ]
    return dict(zip(KEYS, base))


def run(scenario: str, torch, x, w, a, steps: int, sink, first: int) -> tuple[float, float]:
    """Steps/s of one scenario, and host syncs per step (counted over the whole stretch).
    Steps are numbered from ``first``: each sink's steps keep increasing across rounds."""
    torch.cuda.synchronize() if a.device == "cuda" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if a.device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        for step in range(first, first + steps):
            x = step_fn(torch, x, w, a.matmuls)
            if scenario == "b":
                d = {k: v.item() for k, v in metrics(torch, x).items()}
                sink.log(d, step=step)
            elif scenario == "c":
                sink.log(metrics(torch, x), step=step)
        if a.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        sync_count = sum("synchroniz" in str(c.message) for c in caught)
    return steps / elapsed, sync_count / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--matmuls", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "gpu_step_loop.json")
    a = p.parse_args()

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_step_loop.py: no CUDA device here; run it on a GPU machine (README, Benchmarks)")
        return 0
    if a.device == "cpu":
        a.dim, a.matmuls, a.steps = min(a.dim, 64), min(a.matmuls, 2), min(a.steps, 200)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    g = torch.Generator(device=a.device).manual_seed(0)
    w = torch.randn(a.dim, a.dim, device=a.device, dtype=dtype, generator=g) / a.dim**0.5
    x = torch.randn(a.dim, a.dim, device=a.device, dtype=dtype, generator=g)

    base = Path(tempfile.mkdtemp(prefix="kfs-gpu-", dir="/tmp"))
    os.chmod(base, 0o700)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(base), WANDB_SILENT="true")
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(base), WANDB_SILENT="true")
    address = f"ipc://{base}/sidecar.sock"
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--address", address, "--spool-dir", str(base / "spool")],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(base / "sidecar.log", "wb"), start_new_session=True,
    )  # fmt: skip
    try:
        import wandb

        from client import MetricsClient, device

        if a.device == "cpu":
            device.STAGE_CPU = True
        run_b = wandb.init(project="gpu-bench", settings=wandb.Settings(silent=True, console="off"))
        mc = MetricsClient(address=address, project="gpu-bench")
        sinks = {"a": None, "b": run_b, "c": mc}
        warm = min(50, a.steps)
        for scenario in "abc":  # warm-up: kernels, allocator, wandb, the sidecar's first run
            run(scenario, torch, x, w, a, warm, sinks[scenario], 1)
        results: dict[str, list] = {s: [] for s in "abc"}
        for r in range(a.rounds):
            for scenario in "abc":
                results[scenario].append(
                    run(scenario, torch, x, w, a, a.steps, sinks[scenario], 1 + warm + r * a.steps)
                )
        closed = mc.close(timeout=60)
        run_b.finish()
        stats = mc.stats()
    finally:
        try:
            os.killpg(sidecar.pid, signal.SIGTERM)
            sidecar.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(sidecar.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    rate = {s: median([r[0] for r in results[s]]) for s in "abc"}
    syncs = {s: median([r[1] for r in results[s]]) for s in "abc"}
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu (script check only)"
    report = {
        "device": card, "dim": a.dim, "matmuls": a.matmuls, "steps": a.steps, "rounds": a.rounds,
        "steps_per_s": rate, "syncs_per_step": syncs,
        "ratio_b_over_a": rate["b"] / rate["a"], "ratio_c_over_a": rate["c"] / rate["a"],
        "client_closed": closed, "client_stats": stats.__dict__, "rounds_raw": results,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(
        f"device: {card}; {a.matmuls} bf16 matmuls of {a.dim}^2 per step; median of {a.rounds} rounds of {a.steps} steps"
    )
    print(f"{'scenario':<44}{'steps/s':>10}{'ratio to (a)':>14}{'syncs/step':>12}")
    names = {"a": "(a) no logging", "b": "(b) seed: .item() + in-process wandb.log", "c": "(c) kforge-sidecar client"}
    for s in "abc":
        print(f"{names[s]:<44}{rate[s]:>10.1f}{rate[s] / rate['a']:>14.3f}{syncs[s]:>12.2f}")
    print(f"client: closed={closed} dropped={stats.dropped} device_dropped={stats.device_dropped}; JSON in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
