"""HF Transformers through the sidecar (issue 11): ``SidecarCallback`` with
``report_to="none"``, a real Trainer in a subprocess (tests/train_transformers.py),
a live sidecar, wandb offline, wandb's record read back.
"""

from __future__ import annotations

import json

from frameworks import (
    HERE,
    assert_config,
    assert_logged,
    hang_then_kill,
    history,
    read_record,
    require,
    rows,
    run_ids_in,
    segments,
)

require("transformers")

from conftest import finish_trainer, start_trainer, wandb_summary  # noqa: E402

SCRIPT = HERE / "train_transformers.py"
SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}
ARGS = {"learning_rate": 0.05, "max_steps": 40, "per_device_train_batch_size": 8, "seed": 0, "report_to": []}


def test_transformers_kill_after_a_checkpoint_and_resume_continue_one_run(env, sidecar):
    sc = sidecar()
    out_dir, marker = env.base / "hf", env.base / "hung.json"
    first_record, resumed_record = env.base / "first.jsonl", env.base / "resumed.jsonl"

    # a fresh run, a checkpoint every 10 steps, SIGKILLed at step 25 (after checkpoint-20)
    proc = start_trainer(env, "--out", str(out_dir), "--record", str(first_record), "--hang-at", "25",
                         "--marker", str(marker), script=SCRIPT)  # fmt: skip
    hung = hang_then_kill(proc, marker)
    run_id = hung["run_id"]
    assert run_id and hung["step"] == 25
    ckpt = out_dir / "checkpoint-20"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # the run ID is in the checkpoint's trainer state
    assert state["stateful_callbacks"]["SidecarCallback"]["attributes"]["run_id"] == run_id

    resumed_args = ("--out", str(out_dir), "--record", str(resumed_record), "--resume", str(ckpt), "--evaluate-after")
    out = finish_trainer(start_trainer(env, *resumed_args, script=SCRIPT), timeout=150)
    assert out["global_step"] == 40
    assert out["run_id"] == run_id  # taken back from trainer_state.json
    assert out["open"] is True  # open for evaluate() after train(); finished at the trainer's exit

    st = sc.wait_run(run_id, "finished", timeout=90)
    assert st["exit_code"] == 0
    assert [r["run_id"] for r in sc.status()["runs"]] == [run_id]  # one run across the kill
    assert run_ids_in(env) == {run_id}

    first_calls, resumed_calls = read_record(first_record), read_record(resumed_record)
    totals = [c["values"] for c in resumed_calls if SUMMARY_KEYS & set(c["values"])]
    assert len(totals) == 1  # the end-of-training totals: summary values, not history
    history_calls = [
        {"step": c["step"], "values": {k: v for k, v in c["values"].items() if k not in SUMMARY_KEYS}}
        for c in resumed_calls
    ]
    first, resumed = rows(first_calls), rows(history_calls)
    assert sorted(resumed) == list(range(21, 41)) and max(first) >= 24
    assert "eval_loss" in resumed[40] and "loss" in resumed[40] and "grad_norm" in resumed[21]
    assert "final_loss" in resumed[40]  # evaluate() after train(): the last step's row, same session

    files = segments(env, run_id)
    last = history(files[-1])
    # every (step, key, value) the resumed attempt logged, exactly, in the segment after the kill
    assert {s: last[s] for s in resumed} == resumed
    # and what the first attempt logged up to the checkpoint, on the same run
    merged: dict[int, dict] = {}
    for f in files:
        for s, row in history(f).items():
            merged.setdefault(s, {}).update(row)
    assert_logged({s: r for s, r in first.items() if s <= 20}, merged)
    assert "eval_loss" in merged[20]

    summary = wandb_summary(files[-1])
    assert {k: summary["summary"].get(k) for k in SUMMARY_KEYS} == {k: totals[0][k] for k in SUMMARY_KEYS}
    assert summary["exit_code"] == 0
    # the TrainingArguments are the run's config
    assert_config(files, ARGS)
