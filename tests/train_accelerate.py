"""A tiny HF Accelerate loop logging through SidecarTracker (tests/test_accelerate.py).

A seeded few-parameter MLP regression on random CPU data, prepared by an
``Accelerator(log_with=[SidecarTracker(...)])``. Each step logs
``accelerator.log({...})`` without a step (wandb's next step), with a
non-scalar value among the scalars; an evaluation at the end logs with an explicit step.

    --record F      every (step, values) handed to accelerator.log, one JSON line a call

Prints one JSON line last: the run ID, the client's stats, how many warnings
the client gave for the non-scalar key, close().
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F

from client.integrations.accelerate import SidecarTracker

CONFIG = {"lr": 0.05, "hidden": 8, "steps": 30, "optimizer": "sgd"}


class Count(logging.Handler):
    def __init__(self, needle: str):
        super().__init__()
        self.needle, self.n = needle, 0

    def emit(self, record):
        if self.needle in record.getMessage():
            self.n += 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--record", type=Path, required=True)
    a = p.parse_args()
    warned = Count("'train/hist'")
    logging.getLogger("kforge_sidecar").addHandler(warned)

    torch.manual_seed(0)
    x = torch.randn(96, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(96, 1)
    tracker = SidecarTracker(project="fw-accelerate", name="tiny")
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("fw-accelerate", config=CONFIG)
    model = nn.Sequential(nn.Linear(4, CONFIG["hidden"]), nn.Tanh(), nn.Linear(CONFIG["hidden"], 1))
    opt = torch.optim.SGD(model.parameters(), lr=CONFIG["lr"])
    model, opt = accelerator.prepare(model, opt)

    def log(values, step=None):
        shown = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items() if k != "train/hist"}
        with open(a.record, "a") as f:
            f.write(json.dumps({"step": step, "values": shown}) + "\n")
        accelerator.log(values, step=step)

    for i in range(CONFIG["steps"]):
        xb, yb = x[(i * 8) % 80 :][:8], y[(i * 8) % 80 :][:8]
        loss = F.mse_loss(model(xb), yb)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        # no step: wandb's next one. A 0-d tensor and Python scalars are logged; a 1-d tensor is
        # dropped (one warning)
        hist = loss.detach().repeat(3)
        log({"train/loss": loss.detach(), "train/lr": CONFIG["lr"], "train/epoch": i // 10, "train/hist": hist})
    with torch.no_grad():
        log({"eval/loss": F.mse_loss(model(x[80:]), y[80:]).item()}, step=50)  # an explicit step
    stats = tracker.tracker.stats()
    accelerator.end_training()
    print(json.dumps({
        "run_id": tracker.run_id, "closed": tracker.last_close, "stats": stats.__dict__, "hist_warnings": warned.n,
        "raised": None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
