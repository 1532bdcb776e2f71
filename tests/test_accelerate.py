"""HF Accelerate through the sidecar (issue 11): ``SidecarTracker`` in
``Accelerator(log_with=[...])``, a real training loop in a subprocess
(tests/train_accelerate.py), a live sidecar, wandb offline, wandb's record read back.
"""

from __future__ import annotations

import json
import subprocess
import sys

from frameworks import HERE, assert_config, history, read_record, require, run_ids_in, segments

require("accelerate")

from conftest import ROOT, finish_trainer, start_trainer, wandb_summary  # noqa: E402

SCRIPT = HERE / "train_accelerate.py"
CONFIG = {"lr": 0.05, "hidden": 8, "steps": 30, "optimizer": "sgd"}


def test_accelerate_tracker_logs_every_value_config_and_finishes_the_run(env, sidecar):
    sc = sidecar()
    record = env.base / "record.jsonl"
    out = finish_trainer(start_trainer(env, "--record", str(record), script=SCRIPT), timeout=120)
    run_id = out["run_id"]
    assert run_id and out["closed"] is True  # end_training() finished the run, confirmed by the sidecar
    # 31 accelerator.log calls; the 1-d tensor dropped from each, with one warning for the key
    assert out["stats"]["logged"] == 31 and out["stats"]["dropped_values"] == 30 and out["stats"]["dropped"] == 0
    assert out["hist_warnings"] == 1

    st = sc.wait_run(run_id, "finished", timeout=60)
    assert st["exit_code"] == 0
    assert run_ids_in(env) == {run_id}

    # accelerator.log without a step goes to wandb's next step (0, 1, ...), with a step to that step
    calls = read_record(record)
    expected: dict[int, dict] = {}
    for i, call in enumerate(calls):
        expected.setdefault(i if call["step"] is None else call["step"], {}).update(call["values"])
    assert len(expected) == 31 and set(expected[50]) == {"eval/loss"}

    files = segments(env, run_id)
    assert len(files) == 1
    assert history(files[0]) == expected  # every (step, key, value), exactly; no train/hist
    summary = wandb_summary(files[0])
    assert summary["exit_code"] == 0 and summary["state"] == "finished"
    assert_config(files, CONFIG)  # init_trackers(config=...) is the run's config


RESUME = r"""
import json, sys
import torch
from accelerate import Accelerator
from client.integrations.accelerate import SidecarTracker

state_dir, resume = sys.argv[1], sys.argv[2] == "resume"
tracker = SidecarTracker(project="fw-accelerate", close_timeout=0.2)
accelerator = Accelerator(cpu=True, log_with=[tracker])
accelerator.register_for_checkpointing(tracker)
model = accelerator.prepare(torch.nn.Linear(2, 1))
if resume:
    accelerator.load_state(state_dir)
accelerator.init_trackers("fw-accelerate", config={"lr": 0.1})
accelerator.log({"loss": model.weight.detach().sum()}, step=1)
if not resume:
    accelerator.save_state(state_dir)
run_id = tracker.run_id
accelerator.end_training()
print(json.dumps({"run_id": run_id}))
"""


def test_accelerate_run_id_travels_in_save_state(env):
    # The README's resume recipe: the tracker registered for checkpointing, load_state
    # before init_trackers. No sidecar needed: the client mints the run ID itself.
    script = env.base / "resume.py"
    script.write_text(RESUME)
    ids = []
    for mode in ("fresh", "resume"):
        r = subprocess.run(
            [sys.executable, str(script), str(env.base / "state"), mode],
            env=env.vars(), cwd=ROOT, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        ids.append(json.loads(r.stdout.strip().splitlines()[-1])["run_id"])
    assert ids[0] and ids[1] == ids[0]


CRASH = r"""
import json
from accelerate import Accelerator
from client.integrations.accelerate import SidecarTracker

tracker = SidecarTracker(project="fw-accelerate")
accelerator = Accelerator(cpu=True, log_with=[tracker])
accelerator.init_trackers("fw-accelerate", config={"lr": 0.1})
for step in range(1, 4):
    accelerator.log({"loss": 1.0 / step}, step=step)
print(json.dumps({"run_id": tracker.run_id}), flush=True)
raise RuntimeError("the training loop crashed")  # no end_training()
"""


def test_accelerate_crash_without_end_training_finishes_the_run_as_failed_at_exit(env, sidecar):
    # An uncaught exception: the adapter finishes the run at exit with exit code 1, at
    # once, rather than leaving it to the sidecar's resume grace (300 s here).
    sc = sidecar()
    script = env.base / "crash.py"
    script.write_text(CRASH)
    r = subprocess.run([sys.executable, str(script)], env=env.vars(), capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and "the training loop crashed" in r.stderr
    run_id = json.loads(r.stdout.strip().splitlines()[-1])["run_id"]
    st = sc.wait_run(run_id, "finished", timeout=30)
    assert st["exit_code"] == 1
    files = segments(env, run_id)
    assert history(files[-1]) == {1: {"loss": 1.0}, 2: {"loss": 0.5}, 3: {"loss": 1.0 / 3}}
    assert wandb_summary(files[-1])["exit_code"] == 1
