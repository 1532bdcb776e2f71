"""Run lifecycle (issue #4): resume on the same chart, dead trainers, many trainers per sidecar.

Real processes throughout: a sidecar, trainer processes (the tiny torch demo
trainer for the checkpoint flow), wandb offline, read back from wandb's own
record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import (
    ROOT,
    all_history,
    chart,
    finish_trainer,
    run_files,
    start_trainer,
    stop_process,
    wait_for,
    wandb_records,
    wandb_summary,
)
from trainer import train_metrics

from devtools.fakewandb import FakeWandb

TINY = ROOT / "examples" / "train_tiny.py"


def segments(env, run_id: str) -> list:
    """The run's .wandb files in the order wandb wrote them (one per wandb.init)."""
    return run_files(env.wandb_dir, run_id)


def history_by_step(path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for rec in wandb_records(path):
        if rec.get("type") == "history":
            item = rec["history"]["item"]
            rows[item["_step"]] = {k: v for k, v in item.items() if not k.startswith("_")}
    return rows


def branch_point(path) -> dict | None:
    for rec in wandb_records(path):
        if rec.get("type") == "run":
            return rec["run"].get("branch_point")
    return None


def kill_trainer_mid_run(env, sc, after_frames: int) -> str:
    """A trainer logging for ever, SIGKILLed once the sidecar has more than ``after_frames``
    of its frames: a crash without close(). Returns the run ID."""
    trainer = start_trainer(env, "--steps", "100000", "--sleep", "0.005")
    try:
        run = wait_for(
            lambda: (s := sc.status()) and s["runs"] and s["runs"][0]["received"] > after_frames and s["runs"][0], 60
        )
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
    finally:
        stop_process(trainer)
    return run["run_id"]


def test_resume_from_an_earlier_checkpoint_keeps_every_resumed_step_on_the_same_run(env, sidecar, tmp_path):
    sc = sidecar("--session-timeout", "5", "--resume-grace", "120")
    ckpt = tmp_path / "ckpt"
    first_record = tmp_path / "first.jsonl"
    first = subprocess.Popen(
        [sys.executable, str(TINY), "--steps", "300", "--ckpt-every", "100", "--ckpt-dir", str(ckpt),
         "--step-sleep", "0.03", "--eval-every", "50", "--record", str(first_record)],
        env=env.vars(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        run = wait_for(
            lambda: (s := sc.status()) and s["runs"] and (s["runs"][0]["last_step"] or 0) >= 250 and s["runs"][0], 120
        )
        first.send_signal(signal.SIGKILL)  # a crash at about step 250, after the checkpoint at 200
        first.wait(10)
    finally:
        stop_process(first)
    run_id = run["run_id"]

    record = tmp_path / "resumed.jsonl"
    r = subprocess.run(
        [sys.executable, str(TINY), "--steps", "400", "--ckpt-every", "100", "--ckpt-dir", str(ckpt), "--resume",
         "--eval-every", "50", "--record", str(record)],
        env=env.vars(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"resumed from step 200 (wandb run {run_id})" in r.stdout
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["run_id"] == run_id and out["closed"] is True  # one run ID throughout

    st = sc.wait_run(run_id, "finished", timeout=120)
    assert st["exit_code"] == 0
    assert [x["run_id"] for x in sc.status()["runs"]] == [run_id]

    # what the resumed attempt logged, step by step (train and eval rows merge per step)
    resumed: dict[int, dict] = {}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        resumed.setdefault(entry["step"], {}).update(entry["values"])
    assert sorted(resumed) == list(range(201, 401))

    files = segments(env, run_id)
    assert len(files) >= 2
    # the segment after the crash was rewound to the checkpoint, and holds the resumed
    # trajectory exactly: every (step, key, value) the resumed attempt logged
    assert branch_point(files[-1]) == {"metric": "_step", "run": run_id, "value": 200}
    assert history_by_step(files[-1]) == resumed
    assert wandb_summary(files[-1])["exit_code"] == 0
    assert wandb_summary(files[0])["exit_code"] == 1  # the crashed attempt is not reported as a success
    # and the first attempt's record reaches past the crash point on the same run
    assert max(history_by_step(files[0])) >= 249
    # what the run's chart holds once the branch point is applied: the first attempt up
    # to the checkpoint, then the resumed trajectory; the abandoned 201..250 are gone
    before: dict[int, dict] = {}
    for line in first_record.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] <= 200:
            before.setdefault(entry["step"], {}).update(entry["values"])
    assert sorted(before) == list(range(1, 201))
    assert chart(env.wandb_dir, run_id) == before | resumed


def test_trainer_killed_without_close_is_finished_as_failed_after_the_grace(env, sidecar):
    sc = sidecar("--session-timeout", "5", "--resume-grace", "2")
    run_id = kill_trainer_mid_run(env, sc, after_frames=150)
    st = sc.wait_run(run_id, "finished", timeout=60)
    assert st["exit_code"] == 1
    assert "its trainer is gone without close()" in sc.log()
    assert "finishing it as failed (exit code 1)" in sc.log()
    # every frame that arrived is in wandb's record, and the run ended failed
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {s: train_metrics(s) for s in range(1, st["received"] + 1)}
    summary = wandb_summary(segments(env, run_id)[-1])
    assert summary["exit_code"] == 1


def test_resume_within_the_grace_reattaches_without_a_new_init(env, sidecar):
    sc = sidecar("--session-timeout", "5", "--resume-grace", "60")
    run_id = kill_trainer_mid_run(env, sc, after_frames=100)
    last = wait_for(lambda: (r := sc.run(run_id)) and r["uploaded"] == r["received"] and r, 30)["received"]
    wait_for(lambda: "its trainer is gone" in sc.log(), 30)
    pid = sc.run(run_id)["uploader_pid"]
    # the job is requeued onto the same node and continues after its last step
    out = finish_trainer(start_trainer(env, "--steps", "50", "--start", str(last + 1), "--run-id", run_id))
    assert out["run_id"] == run_id and out["closed"] is True
    st = sc.wait_run(run_id, "finished", timeout=60)
    assert st["exit_code"] == 0 and st["uploader_restarts"] == 0
    assert "a trainer is back within the grace; not finishing it" in sc.log()
    assert "finishing it as failed (exit code 1)" not in sc.log()
    assert f"uploader started (pid {pid})" in sc.log() and sc.log().count("uploader started") == 1
    files = segments(env, run_id)
    assert len(files) == 1  # one wandb.init: re-attached, not re-initialised
    assert history_by_step(files[0]) == {s: train_metrics(s) for s in range(1, last + 51)}


def test_eight_trainers_share_a_sidecar_and_a_hung_backend_delays_none_of_the_others(env, sidecar):
    hang = FakeWandb("hang").start()
    try:
        env.extra["WANDB_API_KEY"] = "k" * 40  # offline runs ignore it; the online one needs one
        sc = sidecar("--init-timeout", "600")
        hung = start_trainer(
            env, "--steps", "100", "--name", "hung",
            "--wandb-init", json.dumps({"mode": "online", "base_url": hang.url}),
        )  # fmt: skip
        others = [start_trainer(env, "--steps", "150", "--eval-every", "0", "--name", f"t{i}") for i in range(7)]
        outs = [finish_trainer(t, timeout=180) for t in others]
        hung_out = finish_trainer(hung, timeout=180)
        assert hung_out["closed"] is True  # durable in the spool; the trainer is done
        for out in outs:
            st = sc.wait_run(out["run_id"], "finished", timeout=120)
            assert st["uploader_restarts"] == 0
            rows, dups = all_history(env.wandb_dir, out["run_id"])
            assert rows == {s: train_metrics(s) for s in range(1, 151)} and dups == 0
        assert len({o["run_id"] for o in outs} | {hung_out["run_id"]}) == 8  # a run, spool and uploader each
        stuck = sc.run(hung_out["run_id"])
        assert stuck["state"] == "initializing" and stuck["pending"] == 100
        assert hang.requests(), "the hung run never reached its backend"
        assert sorted(os.listdir(env.spool / "runs")) == sorted([o["run_id"] for o in outs] + [hung_out["run_id"]])
    finally:
        hang.stop()


def test_resume_on_a_backend_without_rewind_lands_every_resumed_value_under_the_same_run(env, sidecar):
    """Online, against the fake backend answering RewindRun as a server without the
    feature does: the crashed attempt logged 1..264, the resume restarts at 201. Nothing
    is retried forever, nothing is lost: the resumed rows follow the run's last step,
    each with the trainer's own step in trainer/step."""
    fake = FakeWandb("ok").start()
    try:
        env.extra.update(fake.env())
        sc = sidecar("--session-timeout", "5", "--resume-grace", "120")
        first = finish_trainer(start_trainer(env, "--steps", "264", "--no-close", "--eval-every", "0"))
        run_id = first["run_id"]
        wait_for(lambda: (r := sc.run(run_id)) and r["state"] == "live" and r["pending"] == 0, 60)
        second = finish_trainer(
            start_trainer(env, "--run-id", run_id, "--start", "201", "--steps", "200", "--eval-every", "0")
        )
        assert second["run_id"] == run_id and second["closed"] is True
        try:
            st = sc.wait_run(run_id, "finished", timeout=120)
        except AssertionError:
            print(sc.log()[-6000:])
            raise
        assert st["exit_code"] == 0 and st["pending"] == 0 and st["late"] == 0
        assert "refused the rewind" in sc.log(), sc.log()
        print(sc.log())
        assert "failed to rewind run" not in (st["last_error"] or "")
        assert fake.exitcode(run_id) == 0 and list(fake.runs()) == [run_id]  # one run on the server
        rows = fake.history_rows(run_id)
        steps = [r["_step"] for r in rows]
        assert steps == sorted(set(steps))  # wandb's own steps only ever go up
        crashed = {
            r["_step"]: {k: v for k, v in r.items() if not k.startswith("_")} for r in rows if "trainer/step" not in r
        }
        assert crashed == {s: train_metrics(s) for s in range(1, 265)}  # nothing of the crashed attempt erased
        resumed = {r["trainer/step"]: {k: v for k, v in r.items() if not k.startswith("_") and k != "trainer/step"}
                   for r in rows if "trainer/step" in r}  # fmt: skip
        assert resumed == {s: train_metrics(s) for s in range(201, 401)}  # every resumed value, exactly
        assert min(r["_step"] for r in rows if "trainer/step" in r) == 265  # after the run's last step
    finally:
        fake.stop()
