"""The whole pipeline with real processes, proven by reading wandb's own record back."""

from __future__ import annotations

import json

from conftest import run_trainer, wandb_file, wandb_history, wandb_summary
from trainer import KEYS, eval_metrics, train_metrics


def test_every_step_key_and_value_arrives(env, sidecar):
    sc = sidecar()
    config = {"lr": 3e-4, "model": {"dim": 256, "layers": 4}, "tags": ["a", "b"]}
    steps, eval_every = 300, 50
    out = run_trainer(
        env, "--steps", str(steps), "--eval-every", str(eval_every),
        "--name", "e2e", "--config", json.dumps(config),
    )  # fmt: skip
    assert out["raised"] is None
    assert out["closed"] is True
    run_id = out["run_id"]
    assert run_id and len(run_id) == 8
    stats = out["stats"]
    assert stats["logged"] == steps + steps // eval_every
    assert stats["dropped"] == 0 and stats["buffered"] == 0

    st = sc.wait_run(run_id, "finished")
    assert st["received"] == st["uploaded"] == stats["logged"]
    assert st["pending"] == 0 and st["last_step"] == steps

    path = wandb_file(env.wandb_dir, run_id)
    rows = wandb_history(path)
    assert sorted(rows) == list(range(1, steps + 1))
    for step, row in rows.items():
        expected = train_metrics(step)
        if step % eval_every == 0:
            expected |= eval_metrics(step)
        assert row == expected, f"step {step}"
    assert set(KEYS) <= set(rows[1])

    summary = wandb_summary(path)
    assert summary["run_id"] == run_id
    assert summary["name"] == "e2e"
    assert summary["project"] == "kempnerforge"
    assert summary["config"] == config
    assert summary["state"] == "finished" and summary["exit_code"] == 0


def test_run_id_passed_in_is_the_wandb_run_id(env, sidecar):
    sc = sidecar()
    out = run_trainer(env, "--steps", "20", "--run-id", "given-id_1")
    assert out["run_id"] == "given-id_1"
    sc.wait_run("given-id_1", "finished")
    rows = wandb_history(wandb_file(env.wandb_dir, "given-id_1"))
    assert rows == {s: train_metrics(s) for s in range(1, 21)}


def test_sidecar_started_after_the_trainer_logged(env, sidecar):
    """Frames logged while no sidecar exists wait in the client's buffer."""
    import subprocess
    import sys

    from conftest import TRAINER, stop_process

    proc = subprocess.Popen(
        [sys.executable, str(TRAINER), "--steps", "50", "--sleep", "0.02", "--close-timeout", "60"],
        env=env.vars(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sc = sidecar(start=False)
        import time

        time.sleep(1.5)  # the trainer is done logging before anyone listens
        sc.start()
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["closed"] is True and out["stats"]["dropped"] == 0
    sc.wait_run(out["run_id"], "finished")
    rows = wandb_history(wandb_file(env.wandb_dir, out["run_id"]))
    assert rows == {s: train_metrics(s) for s in range(1, 51)}
