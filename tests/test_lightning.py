"""PyTorch Lightning through the sidecar (issue 11): ``SidecarLogger``, a real Lightning
Trainer in a subprocess (tests/train_lightning.py), a live sidecar, wandb offline,
wandb's record read back.
"""

from __future__ import annotations

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

require("lightning", "pytorch_lightning")

from conftest import finish_trainer, start_trainer, wandb_summary  # noqa: E402

SCRIPT = HERE / "train_lightning.py"
HPARAMS = {"lr": 0.05, "hidden": 8}


def test_lightning_kill_after_a_checkpoint_and_resume_continue_one_run(env, sidecar):
    sc = sidecar()
    root, marker = env.base / "pl", env.base / "hung.json"
    first_record, resumed_record = env.base / "first.jsonl", env.base / "resumed.jsonl"

    # a fresh fit, checkpointing every 10 steps, SIGKILLed at step 25 (after the checkpoint at 20)
    proc = start_trainer(env, "--root", str(root), "--record", str(first_record), "--hang-at", "25",
                         "--marker", str(marker), script=SCRIPT)  # fmt: skip
    hung = hang_then_kill(proc, marker)
    run_id = hung["run_id"]
    assert run_id and hung["step"] == 25
    ckpt = root / "fw-lightning" / "checkpoints" / "step=20.ckpt"  # ModelCheckpoint's default dir, by the project
    assert ckpt.exists(), sorted(str(p) for p in root.rglob("*.ckpt"))

    # resume from the checkpoint: the run ID comes back from it, through the logger's callback state
    resumed_args = ("--root", str(root), "--record", str(resumed_record), "--resume", str(ckpt), "--test-after")
    out = finish_trainer(start_trainer(env, *resumed_args, script=SCRIPT), timeout=150)
    assert out["fit_raised"] is None and out["global_step"] == 40
    assert out["run_id"] == run_id and out["version_during_fit"] == run_id  # version is the run ID
    # finalize("success") kept the run open for trainer.test(); it was finished at exit (below)
    assert out["open_after_fit"] is True and out["closed"] is None and out["version_after_fit"] == run_id

    st = sc.wait_run(run_id, "finished", timeout=90)  # closed at the trainer's exit
    assert st["exit_code"] == 0
    assert [r["run_id"] for r in sc.status()["runs"]] == [run_id]  # one run across the kill
    assert run_ids_in(env) == {run_id}

    first, resumed = rows(read_record(first_record)), rows(read_record(resumed_record))
    resumed_from = min(resumed)
    assert 19 <= resumed_from <= 21 and max(resumed) >= 39  # from the checkpoint at 20, to the end
    assert max(first) > resumed_from  # the killed attempt got past the checkpoint
    assert any("val/loss" in r for r in resumed.values())
    # trainer.test() after the fit (Lightning logs it at the step after the fit's last), same session
    assert [s for s, r in resumed.items() if "test/loss" in r] == [max(resumed)]

    files = segments(env, run_id)
    last = history(files[-1])
    # every (step, key, value) the resumed attempt logged, exactly, in the segment after the kill
    assert {s: last[s] for s in resumed} == resumed
    # and what the first attempt logged before the checkpoint, on the same run
    merged: dict[int, dict] = {}
    for f in files:
        for s, row in history(f).items():
            merged.setdefault(s, {}).update(row)
    assert_logged({s: r for s, r in first.items() if s < resumed_from}, merged)

    # the hyperparameters (save_hyperparameters) in the run's config
    assert_config(files, HPARAMS)
    assert wandb_summary(files[-1])["exit_code"] == 0


def test_lightning_failed_fit_finishes_the_run_as_failed(env, sidecar):
    sc = sidecar()
    record = env.base / "record.jsonl"
    out = finish_trainer(start_trainer(env, "--root", str(env.base / "pl"), "--record", str(record), "--fail-at", "12",
                                       script=SCRIPT), timeout=120)  # fmt: skip
    assert "failing at step 12 on purpose" in out["fit_raised"]
    run_id = out["run_id"]
    assert run_id and out["closed"] is True  # finalize("failed") closed it at once, not after the grace
    st = sc.wait_run(run_id, "finished", timeout=60)
    assert st["exit_code"] == 1
    files = segments(env, run_id)
    assert wandb_summary(files[-1])["exit_code"] == 1
    logged = rows(read_record(record))
    assert max(logged) >= 11
    assert_logged(logged, history(files[-1]))
    assert_config(files, HPARAMS)
