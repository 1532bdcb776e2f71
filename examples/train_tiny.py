"""A small CPU trainer that logs through kforge-sidecar, KempnerForge style.

It trains a tiny next-token MLP on a synthetic sequence task, logs the seed's
metric dict every step and an eval dict every --eval-every steps, and keeps
the wandb run ID in its checkpoint so a resumed job continues the same run:

    python examples/train_tiny.py --steps 200 --ckpt-dir ckpt            # fresh
    python examples/train_tiny.py --steps 400 --ckpt-dir ckpt --resume   # resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from client import MetricsClient

VOCAB, CONTEXT, DIM = 64, 8, 64


def batch(gen: torch.Generator, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    # next token = (token two back + 1) mod VOCAB: learnable in a few hundred steps
    x = torch.randint(0, VOCAB, (n, CONTEXT), generator=gen)
    return x, (x[:, -2] + 1) % VOCAB


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mlp = nn.Sequential(nn.Linear(CONTEXT * DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, VOCAB))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(x).flatten(1))


def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "extra": extra}, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves half a checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="train until this step")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--ckpt-dir", type=Path, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    p.add_argument("--project", default="kempnerforge")
    p.add_argument("--name", default="tiny-demo")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--step-sleep", type=float, default=0.0, help="slow each step down (tests)")
    p.add_argument("--record", type=Path, default=None, help="also write every logged dict here, as JSON lines (tests)")
    a = p.parse_args()

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    start, run_id = 1, None
    ckpt = a.ckpt_dir / "last.pt" if a.ckpt_dir else None
    if a.resume and ckpt and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"] + 1
        run_id = state["extra"].get("wandb_run_id")  # the seed's checkpoint key
        print(f"resumed from step {state['step']} (wandb run {run_id})", flush=True)

    config = {"lr": a.lr, "dim": DIM, "context": CONTEXT, "vocab": VOCAB, "steps": a.steps}
    mc = MetricsClient(project=a.project, name=a.name, run_id=run_id, config=config)
    gen = torch.Generator().manual_seed(start)
    smoothed: dict[str, float] = {}
    params = sum(p.numel() for p in model.parameters())

    record = open(a.record, "a") if a.record else None

    def log(kind: str, metrics: dict, step: int) -> None:
        (mc.log if kind == "train" else mc.log_eval)(metrics, step=step)
        if record:
            values = {k: float(v) for k, v in metrics.items()}  # what the client's .item() gives
            record.write(json.dumps({"step": step, "kind": kind, "values": values}) + "\n")
            record.flush()

    def ema(key: str, value: float) -> float:
        smoothed[key] = value if key not in smoothed else 0.9 * smoothed[key] + 0.1 * value
        return smoothed[key]

    for step in range(start, a.steps + 1):
        t0 = time.perf_counter()
        lr = a.lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0 + a.step_sleep
        tokens_per_sec = x.numel() / dt
        mfu = 6 * params * tokens_per_sec / 1e12  # against a notional 1 TFLOP/s CPU
        mem_gb = params * 4 * 4 / 1e9
        log(
            "train",
            {
                "train/loss": loss,  # a 0-d tensor: the client takes .item()
                "train/grad_norm": grad_norm,
                "train/lr": lr,
                "train/tokens_per_sec": tokens_per_sec,
                "train/mfu": mfu,
                "train/step_time_sec": dt,
                "gpu/allocated_gb": mem_gb,
                "gpu/peak_gb": mem_gb,
                "gpu/reserved_gb": mem_gb,
                "gpu/mem_utilization": 0.0,
                "smoothed/loss": ema("loss", loss.item()),
                "smoothed/tokens_per_sec": ema("tps", tokens_per_sec),
                "smoothed/mfu": ema("mfu", mfu),
                "smoothed/step_time": ema("dt", dt),
            },
            step=step,
        )
        if a.eval_every and step % a.eval_every == 0:
            with torch.no_grad():
                ex, ey = batch(torch.Generator().manual_seed(10_000 + step), 512)
                logits = model(ex)
                eval_loss = nn.functional.cross_entropy(logits, ey)
                acc = (logits.argmax(1) == ey).float().mean()
            log("eval", {"eval/loss": eval_loss, "eval/accuracy": acc}, step=step)
        if ckpt and step % a.ckpt_every == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            # the run ID is known at once (the sidecar answers hello); it never waits on wandb
            save(ckpt, model, opt, step, {"wandb_run_id": mc.wait_run_id(5.0)})
        if a.step_sleep:
            time.sleep(a.step_sleep)

    ok = mc.close(timeout=30)
    print(
        json.dumps({"run_id": mc.run_id, "last_step": a.steps, "closed": ok, "stats": mc.stats().__dict__}), flush=True
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
