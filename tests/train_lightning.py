"""A tiny Lightning trainer logging through SidecarLogger (tests/test_lightning.py).

A seeded few-parameter MLP regression on random CPU data: 10 batches an epoch,
``train/loss`` every step, ``val/loss`` every epoch, a checkpoint every 10 steps.

    --record F      every (step, metrics) Lightning hands the logger, one JSON line a call
    --hang-at N     at global step N: flush, write --marker (the run ID), then hang (to be killed)
    --resume CKPT   Trainer.fit(ckpt_path=CKPT)
    --fail-at N     raise in training_step at global step N (Lightning finalizes "failed")
    --test-after    trainer.test() after the fit, in the same process and run

Prints one JSON line last: the run ID, the logger's version during and after the
fit, whether the run is still open after the fit (finished at exit).
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
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # type: ignore[no-redef]

from client.integrations.lightning import SidecarLogger

warnings.filterwarnings("ignore")  # keep the pipe to the test small


class Recording(SidecarLogger):
    """SidecarLogger that also writes what Lightning handed it, before passing it on."""

    record: Path | None = None

    def log_metrics(self, metrics, step=None):
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(json.dumps({"step": step, "values": dict(metrics)}) + "\n")
        super().log_metrics(metrics, step)


class Regression(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8, fail_at: int = -1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.hparams.fail_at:
            raise RuntimeError(f"failing at step {self.hparams.fail_at} on purpose")
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Hang(Callback):
    """At global step N, with everything before it logged: flush, tell the test, hang."""

    def __init__(self, at: int, marker: Path, logger: SidecarLogger):
        self.at, self.marker, self.logger = at, marker, logger

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.at:
            self.logger.experiment.flush(10)
            tmp = self.marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_id": self.logger.version, "step": trainer.global_step}))
            os.replace(tmp, self.marker)
            time.sleep(600)


class SeeVersion(Callback):
    seen: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        SeeVersion.seen = trainer.logger.version


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--hang-at", type=int, default=-1)
    p.add_argument("--marker", type=Path, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--test-after", action="store_true", help="trainer.test() after the fit, in the same process")
    a = p.parse_args()

    pl.seed_everything(0, verbose=False)
    x = torch.randn(96, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(96, 1)
    train = DataLoader(TensorDataset(x[:80], y[:80]), batch_size=8)  # 10 batches an epoch
    val = DataLoader(TensorDataset(x[80:], y[80:]), batch_size=16)

    logger = Recording(project="fw-lightning", name="tiny")
    logger.record = a.record
    # no dirpath: <root>/<project>/checkpoints, the same directory for the fresh and the resumed fit
    ckpt = ModelCheckpoint(every_n_train_steps=10, save_top_k=-1, filename="{step}")
    callbacks = [logger, ckpt, SeeVersion()]
    if a.hang_at >= 0:
        callbacks.append(Hang(a.hang_at, a.marker, logger))
    trainer = pl.Trainer(
        max_steps=a.max_steps, logger=logger, callbacks=callbacks, log_every_n_steps=1, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=a.root,
    )  # fmt: skip
    fit_raised = None
    model = Regression(fail_at=a.fail_at)
    try:
        trainer.fit(model, train, val, ckpt_path=a.resume)
    except Exception as exc:
        fit_raised = repr(exc)
    open_after_fit = logger.client is not None
    if a.test_after:
        trainer.test(model, val, verbose=False)
    # the run is finished at exit (MetricsClient's finish_at_exit), unless finalize("failed") did it already
    print(json.dumps({
        "run_id": logger.run_id, "version_during_fit": SeeVersion.seen, "version_after_fit": logger.version,
        "open_after_fit": open_after_fit, "closed": logger.last_close,
        "global_step": trainer.global_step, "fit_raised": fit_raised, "raised": None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
