"""wandb failing under the uploader: the failure sentinel, with every frame kept in the spool.

The backend is a real HTTP server on 127.0.0.1 (devtools/fakewandb.py) that the
real wandb-core talks to; nothing of wandb is mocked.
"""

from __future__ import annotations

import pytest
from conftest import run_trainer, wait_for
from trainer import train_metrics

from client import protocol
from devtools.fakewandb import FakeWandb
from sidecar.record import decode_record
from sidecar.spool import Spool


@pytest.fixture
def fake_wandb():
    srv = FakeWandb("ok").start()
    yield srv
    srv.stop()


def spooled_steps(env, run_id: str) -> dict[int, dict]:
    run = Spool(env.spool).run(run_id)
    out = {}
    for rec in run.log.records():
        msg = decode_record(rec.payload)
        if isinstance(msg, protocol.Metrics):
            out[msg.step] = msg.values
    return out


def test_rejected_credentials_enter_the_sentinel_and_keep_every_frame(env, sidecar, fake_wandb):
    fake_wandb.mode = "401"
    env.extra.update(fake_wandb.env(WANDB_DIR=str(env.wandb_dir)))
    sc = sidecar("--init-timeout", "20")
    out = run_trainer(env, "--steps", "30", "--name", "denied")
    run_id = out["run_id"]
    assert out["closed"] is True  # the trainer never noticed
    st = sc.wait_run(run_id, "failed", timeout=60)
    assert st["last_error"].startswith("WandB init failed")
    assert "not logged in" in st["last_error"]
    assert (st["received"], st["uploaded"], st["pending"]) == (30, 0, 30)
    # frames stay in the spool, exactly as logged
    assert spooled_steps(env, run_id) == {s: train_metrics(s) for s in range(1, 31)}
    assert "WandB init failed" in sc.log()
    # the sentinel means no retry loop: one uploader start, and it stays down
    import time

    time.sleep(2.0)
    assert sc.log().count(f"run {run_id}: uploader started") == 1
    assert sc.run(run_id)["state"] == "failed"
    # and the `status` table says why in one line
    r = sc.cli("status")
    assert f"{run_id}: WandB init failed" in r.stdout


def test_wandb_not_installed_is_a_clear_sentinel(env, sidecar, tmp_path):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named wandb (test shadow)")\n')
    import os

    env.extra["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])
    sc = sidecar()
    out = run_trainer(env, "--steps", "5")
    st = sc.wait_run(out["run_id"], "failed", timeout=60)
    assert "wandb not installed" in st["last_error"]
    assert st["pending"] == 5


def test_online_backend_receives_every_row(env, sidecar, fake_wandb):
    """The healthy online path, against the local backend: the rows wandb uploaded are exact."""
    env.extra.update(fake_wandb.env(WANDB_DIR=str(env.wandb_dir)))
    sc = sidecar("--init-timeout", "20", "--finish-timeout", "30")
    out = run_trainer(env, "--steps", "40", "--name", "online")
    run_id = out["run_id"]
    sc.wait_run(run_id, "finished", timeout=90)
    rows = wait_for(lambda: len(fake_wandb.history_rows(run_id)) >= 40 and fake_wandb.history_rows(run_id), 30)
    got = {r["_step"]: {k: v for k, v in r.items() if not k.startswith("_")} for r in rows}
    assert got == {s: train_metrics(s) for s in range(1, 41)}
