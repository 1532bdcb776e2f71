"""A tiny HF Transformers Trainer logging through SidecarCallback (tests/test_transformers.py).

A seeded few-parameter MLP regression (a plain torch module: forward returns the
loss) on random CPU data, ``report_to="none"``, a log every step, an evaluation
every 20 steps and a checkpoint every 10.

    --record F      every (step, logs) the Trainer hands its callbacks in on_log, one JSON line a call
    --hang-at N     at global step N: flush, write --marker (the run ID), then hang (to be killed)
    --resume DIR    trainer.train(resume_from_checkpoint=DIR)
    --evaluate-after  trainer.evaluate(metric_key_prefix="final") after train()

Prints one JSON line last: the run ID, whether the run is still open (it is
finished at exit).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from client.integrations.transformers import SidecarCallback  # noqa: E402

warnings.filterwarnings("ignore")


class Regression(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Record(TrainerCallback):
    """Writes what the Trainer handed on_log (after SidecarCallback has taken it)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "values": dict(logs)}) + "\n")


class Hang(TrainerCallback):
    def __init__(self, at: int, marker: Path, sidecar: SidecarCallback):
        self.at, self.marker, self.sidecar = at, marker, sidecar

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            self.sidecar.client.flush(10)
            tmp = self.marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_id": self.sidecar.run_id, "step": state.global_step}))
            os.replace(tmp, self.marker)
            time.sleep(600)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--hang-at", type=int, default=-1)
    p.add_argument("--marker", type=Path, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument(
        "--evaluate-after", action="store_true", help="trainer.evaluate() after train(), same process and run"
    )
    a = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(96, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(96)
    args = TrainingArguments(
        output_dir=str(a.out), max_steps=a.max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=0.05, lr_scheduler_type="constant", optim="sgd", seed=0, logging_steps=1,
        save_strategy="steps", save_steps=10, eval_strategy="steps", eval_steps=20,
        report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    sidecar = SidecarCallback(project="fw-transformers", name="tiny")
    callbacks = [sidecar, Record(a.record)]
    if a.hang_at >= 0:
        callbacks.append(Hang(a.hang_at, a.marker, sidecar))
    train, test = Data(x[:80], y[:80]), Data(x[80:], y[80:])
    trainer = Trainer(model=Regression(), args=args, train_dataset=train, eval_dataset=test, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=a.resume)
    if a.evaluate_after:
        trainer.evaluate(metric_key_prefix="final")
    # the run is finished at exit (MetricsClient's finish_at_exit)
    print(json.dumps({
        "run_id": sidecar.run_id, "open": sidecar.client is not None, "global_step": trainer.state.global_step,
        "raised": None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
