"""A trainer stand-in for the tests: logs KempnerForge's metric dict with values
that are a pure function of the step, so a test can recompute every value.

Prints one JSON line last: run_id, the client's stats, whether log() raised,
the last step logged, and whether a SIGTERM ended it (--handle-sigterm: stop
logging, close the client, exit 143, as a trainer that checkpoints on SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

# KempnerForge's MetricsTracker._log_step dict (../shared/seed-wandb-backend.md)
KEYS = (
    "train/loss", "train/grad_norm", "train/lr", "train/tokens_per_sec", "train/mfu",
    "train/step_time_sec", "gpu/allocated_gb", "gpu/peak_gb", "gpu/reserved_gb",
    "gpu/mem_utilization", "smoothed/loss", "smoothed/tokens_per_sec", "smoothed/mfu",
    "smoothed/step_time",
)  # fmt: skip


def train_metrics(step: int) -> dict[str, float]:
    loss = 11.0 / (1.0 + 0.01 * step)
    return {
        "train/loss": loss,
        "train/grad_norm": 1.0 + (step % 7) * 0.125,
        "train/lr": 3e-4 * min(1.0, step / 100),
        "train/tokens_per_sec": 100_000.0 + step,
        "train/mfu": 0.4 + (step % 10) / 100,
        "train/step_time_sec": 0.5 + step * 1e-3,
        "gpu/allocated_gb": 10.5 + (step % 3),
        "gpu/peak_gb": 12.25,
        "gpu/reserved_gb": 14.0,
        "gpu/mem_utilization": 0.75,
        "smoothed/loss": loss * 1.01,
        "smoothed/tokens_per_sec": 99_000.0 + step,
        "smoothed/mfu": 0.41,
        "smoothed/step_time": 0.51 + step * 1e-3,
    }


def eval_metrics(step: int) -> dict[str, float]:
    return {"eval/loss": 2.0 + 1.0 / step, "eval/perplexity": 7.5 + step / 1000}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--project", default="kempnerforge")
    p.add_argument("--name", default=None)
    p.add_argument("--run-id", default=None)
    p.add_argument("--config", default="{}")
    p.add_argument("--wandb-init", default="{}", help="per-run wandb.init options, JSON")
    p.add_argument("--close-timeout", type=float, default=30.0)
    p.add_argument("--no-close", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--handle-sigterm", action="store_true")
    a = p.parse_args()
    sigterm: list[int] = []
    if a.handle_sigterm:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sigterm.append(signum))

    from client import MetricsClient

    mc = MetricsClient(
        project=a.project,
        name=a.name,
        run_id=a.run_id,
        config=json.loads(a.config),
        wandb_init=json.loads(a.wandb_init),
    )
    raised = None
    last_step = None
    try:
        for step in range(a.start, a.start + a.steps):
            if sigterm:
                break
            mc.log(train_metrics(step), step=step)
            last_step = step
            if a.eval_every and step % a.eval_every == 0:
                mc.log_eval(eval_metrics(step), step=step)
            if a.sleep:
                time.sleep(a.sleep)
    except Exception as exc:  # the contract: log() never raises
        raised = repr(exc)
    # --no-close: the trainer "dies" after its frames are durable, without finishing the run
    code = 128 + int(signal.SIGTERM) if sigterm else a.exit_code
    closed = mc.flush(a.close_timeout) and None if a.no_close else mc.close(timeout=a.close_timeout, exit_code=code)
    s = mc.stats()
    line = json.dumps({
        "run_id": mc.run_id, "closed": closed, "raised": raised, "stats": s.__dict__,
        "last_step": last_step, "sigterm": bool(sigterm),
    }) + "\n"  # fmt: skip
    # One write: trainers on several (fake) nodes share one stdout pipe, and an unbuffered
    # print writes the line and its newline apart, so two lines could interleave.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
    return code


if __name__ == "__main__":
    sys.exit(main())
