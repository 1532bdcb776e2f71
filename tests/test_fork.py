"""Fork safety with a real torch DataLoader: workers forked from a process whose
client is live inherit an inert copy. Their log() calls are silent no-ops, nothing
deadlocks, and only the main process's frames reach wandb, each exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import all_history, stop_process

TESTS = Path(__file__).resolve().parent

ITEMS, BATCH, EPOCHS = 48, 4, 2
MAIN_FRAMES = ITEMS // BATCH * EPOCHS

SCRIPT = r"""
import json, os, sys, types
import torch
from torch.utils.data import DataLoader, Dataset
from client import MetricsClient
from client.backend import SidecarBackend

ITEMS, BATCH, EPOCHS = (int(a) for a in sys.argv[1:4])
mc = MetricsClient(project="kf", name="fork")  # global: the workers inherit it
# A backend that has not logged yet when the workers fork: it must not open a run in them.
lazy_backend = SidecarBackend(types.SimpleNamespace(wandb_project="kf", wandb_run_name="lazy", wandb_run_id=None))
assert mc.wait_run_id(10), "sidecar did not answer"
main_pid = os.getpid()

class DS(Dataset):
    def __len__(self):
        return ITEMS

    def __getitem__(self, i):
        assert os.getpid() != main_pid
        mc.log({"worker/x": float(i), "worker/pid": os.getpid()}, step=i + 1)
        mc.log_eval({"worker/eval": float(i)}, step=i + 1)
        lazy_backend.log({"worker/backend": float(i)}, step=i + 1)
        ok = mc.inert and lazy_backend.client is None
        return torch.tensor([float(i), float(ok)])

step = 0
worker_ok = True
for epoch in range(EPOCHS):  # each epoch forks two fresh workers while the sender thread runs
    dl = DataLoader(DS(), batch_size=BATCH, num_workers=2, multiprocessing_context="fork")
    for batch in dl:
        step += 1
        worker_ok &= bool(batch[:, 1].all())
        mc.log({"main/sum": float(batch[:, 0].sum()), "main/step": step}, step=step)
closed = mc.close(timeout=30)
s = mc.stats()
print(json.dumps({"run_id": mc.run_id, "closed": closed, "steps": step, "worker_ok": worker_ok,
                  "stats": s.__dict__}))
"""


def test_dataloader_fork_workers_are_inert(env, sidecar):
    sc = sidecar()
    script = env.base / "fork_train.py"
    script.write_text(SCRIPT)
    vars = env.vars()
    vars["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), vars.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ITEMS), str(BATCH), str(EPOCHS)],
        env=vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its pid leads a group: stopping it stops any worker left behind
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=90)  # a deadlock fails here
    finally:
        stop_process(proc, group=True)
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{stdout}\n{stderr}"
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["steps"] == MAIN_FRAMES
    assert out["worker_ok"] is True  # every worker saw an inert client and an unstarted backend
    assert out["closed"] is True
    s = out["stats"]
    assert (s["logged"], s["buffered"], s["dropped"], s["errors"]) == (MAIN_FRAMES, 0, 0, 0)

    run_id = out["run_id"]
    st = sc.wait_run(run_id, "finished")
    assert st["received"] == st["uploaded"] == MAIN_FRAMES  # nothing from the workers reached the sidecar
    assert [r["run_id"] for r in sc.status()["runs"]] == [run_id]  # no run opened by a worker

    rows, dups = all_history(env.wandb_dir, run_id)
    assert dups == 0
    assert sorted(rows) == list(range(1, MAIN_FRAMES + 1))
    per_epoch = ITEMS // BATCH
    for step, row in rows.items():
        b = (step - 1) % per_epoch  # batches are in order: batch b holds items 4b..4b+3
        assert row == {"main/sum": float(sum(range(BATCH * b, BATCH * b + BATCH))), "main/step": step}, step
    assert not any(k.startswith("worker/") for row in rows.values() for k in row)
