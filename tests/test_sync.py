"""kforge-sidecar sync: the offline-cluster workflow and recovery of failed runs."""

from __future__ import annotations

import pytest
from conftest import run_trainer
from trainer import eval_metrics, train_metrics

from devtools.fakewandb import FakeWandb


@pytest.fixture
def backend():
    srv = FakeWandb("401").start()
    yield srv
    srv.stop()


def rows_at(backend: FakeWandb, run_id: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in backend.history_rows(run_id):
        out.setdefault(r["_step"], {}).update({k: v for k, v in r.items() if not k.startswith("_")})
    return out


def test_sync_uploads_failed_runs_once_and_is_idempotent(env, sidecar, backend):
    env.extra.update(backend.env(WANDB_DIR=str(env.wandb_dir)))
    sc = sidecar("--init-timeout", "10")
    a = run_trainer(env, "--steps", "60", "--eval-every", "20", "--name", "a")
    b = run_trainer(env, "--steps", "25", "--name", "b")
    for out in (a, b):
        st = sc.wait_run(out["run_id"], "failed", timeout=60)
        assert st["pending"] == st["received"]
    assert sc.stop() == 0

    # still rejected: sync says so and fails
    r = sc.cli("sync", timeout=120)
    assert r.returncode == 1
    assert "not uploaded: WandB init failed" in r.stderr

    backend.mode = "ok"  # credentials fixed, or now on a login node with network
    r = sc.cli("sync", "--finish-timeout", "60", timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"run {a['run_id']}: 63 frames uploaded, finished" in r.stderr
    assert f"run {b['run_id']}: 25 frames uploaded, finished" in r.stderr
    expect_a = {s: train_metrics(s) | (eval_metrics(s) if s % 20 == 0 else {}) for s in range(1, 61)}
    assert rows_at(backend, a["run_id"]) == expect_a
    assert rows_at(backend, b["run_id"]) == {s: train_metrics(s) for s in range(1, 26)}
    sent = len(backend.history_rows())

    # a second sync uploads nothing twice
    r = sc.cli("sync", timeout=120)
    assert r.returncode == 0
    assert "nothing to upload" in r.stderr
    assert len(backend.history_rows()) == sent
    r = sc.cli("sync", a["run_id"], timeout=120)
    assert r.returncode == 0 and f"run {a['run_id']}: nothing to upload" in r.stderr

    st = sc.cli("status", "--json")
    runs = {x["run_id"]: x for x in __import__("json").loads(st.stdout)["runs"]}
    assert runs[a["run_id"]]["state"] == "finished" and runs[a["run_id"]]["pending"] == 0


def test_sync_of_an_unknown_run_fails_clearly(env):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "sync", "nosuchrun"],
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"kforge-sidecar sync: no spool at {env.spool} (no such directory)" in r.stderr  # not "nothing to upload"
    (env.spool / "runs").mkdir(parents=True)
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "sync", "nosuchrun"],
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "run nosuchrun: not in spool" in r.stderr


def test_sync_finds_per_job_spools_below_a_root(env, sidecar, backend):
    """The SLURM scripts spool per job (and node): sync from their common root finds them."""
    env.extra.update(backend.env(WANDB_DIR=str(env.wandb_dir)))
    job_spool = env.spool / "job-7" / "node1"
    sc = sidecar("--spool-dir", str(job_spool), "--init-timeout", "10")
    out = run_trainer(env, "--steps", "15", "--name", "per-job")
    sc.wait_run(out["run_id"], "failed", timeout=60)
    assert sc.stop() == 0
    backend.mode = "ok"
    r = sc.cli("sync", "--spool-dir", str(env.spool), timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"run {out['run_id']}: 15 frames uploaded, finished" in r.stderr
    assert rows_at(backend, out["run_id"]) == {s: train_metrics(s) for s in range(1, 16)}


def test_run_inside_a_slurm_job_gets_a_spool_of_its_own():
    from sidecar.launcher import job_spool_dir
    from sidecar.spool import default_spool_dir

    assert job_spool_dir({"SLURM_JOB_ID": "42"}) == default_spool_dir() / "job-42"
    assert job_spool_dir({"SLURM_JOB_ID": "42", "KFORGE_SPOOL_DIR": "/x"}) is None
    assert job_spool_dir({}) is None
