"""Spool retention with real processes: finished-and-uploaded runs leave the disk, a run
with anything pending never does (across a sidecar restart, under a size cap, and by
`kforge-sidecar gc`), and `status` shows live and pending runs unless told --all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import Env, finish_trainer, run_trainer, start_trainer, wait_for

from devtools.fakewandb import FakeWandb
from sidecar.retention import finished_at, parse_duration, parse_size
from sidecar.spool import dir_bytes


@pytest.fixture
def denied():
    srv = FakeWandb("401").start()
    yield srv
    srv.stop()


def run_dirs(env: Env) -> set[str]:
    return {p.name for p in (env.spool / "runs").iterdir()}


def cli(env: Env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], env=env.vars(), capture_output=True, text=True, timeout=60
    )


def test_retention_removes_exactly_the_finished_and_uploaded_runs_across_a_restart(env, sidecar, denied):
    sc = sidecar("--retain", "1h", "--gc-interval", "0.5")
    env.extra["WANDB_API_KEY"] = "k" * 40
    trainers = [
        start_trainer(env, "--steps", "10", "--name", "done"),
        start_trainer(
            env,
            "--steps",
            "10",
            "--name",
            "refused",
            "--wandb-init",
            json.dumps({"mode": "online", "base_url": denied.url}),
        ),
        start_trainer(env, "--steps", "10", "--no-close", "--name", "open"),  # uploaded, never closed
    ]
    done, refused, open_ = [finish_trainer(t)["run_id"] for t in trainers]
    sc.wait_run(done, "finished")
    sc.wait_run(refused, "failed")
    wait_for(
        lambda: (r := sc.run(open_)) and r["state"] == "live" and r["pending"] == 0, 60, 0.2, "the open run uploaded"
    )

    # status: live and pending runs by default, every run with --all
    r = cli(env, "status")
    assert r.returncode == 0 and refused in r.stdout and open_ in r.stdout and done not in r.stdout
    assert "1 finished and uploaded run not shown (--all shows them)" in r.stdout
    r = cli(env, "status", "--all")
    assert done in r.stdout and refused in r.stdout and open_ in r.stdout
    assert run_dirs(env) == {done, refused, open_}  # within --retain 1h: nothing removed yet
    assert sc.stop() == 0

    # the restarted sidecar applies --retain 0 at once: the finished run goes, the others stay
    sc = sidecar("--retain", "0", "--gc-interval", "0.5")
    wait_for(lambda: done not in run_dirs(env), 20, 0.1, "the finished run to be removed")
    assert run_dirs(env) == {refused, open_}
    assert f"run {done}: finished and uploaded" in sc.log() and "removed from the spool" in sc.log()
    st = sc.status()
    assert {r["run_id"] for r in st["runs"]} == {refused, open_}
    assert st["sidecar"]["retention"]["removed_runs"] == 1 and st["sidecar"]["retention"]["removed_bytes"] > 0

    # a run that finishes under this sidecar goes too; resuming it later starts a fresh spool
    # directory for the same run ID (its old sessions were forgotten with it)
    again = run_trainer(env, "--steps", "5", "--name", "again")["run_id"]
    wait_for(lambda: again not in run_dirs(env), 30, 0.1, "the new finished run to be removed")
    resumed = run_trainer(env, "--steps", "5", "--start", "6", "--run-id", again)
    assert resumed["run_id"] == again and resumed["stats"]["acked"] == 6
    wait_for(
        lambda: again not in run_dirs(env) and sc.log().count(f"run {again}: finished (exit code") == 2,
        30, 0.1, "the resumed run to finish and be removed",
    )  # fmt: skip
    assert run_dirs(env) == {refused, open_}  # never the pending or the open one
    assert sc.proc.poll() is None


def test_gc_command_and_the_size_cap_remove_oldest_finished_first_never_pending(env, sidecar, denied):
    sc = sidecar("--retain", "never")
    env.extra["WANDB_API_KEY"] = "k" * 40
    trainers = [start_trainer(env, "--steps", str(20 * (i + 1)), "--name", f"f{i}") for i in range(3)]
    trainers.append(start_trainer(env, "--steps", "200", "--name", "refused",
                                  "--wandb-init", json.dumps({"mode": "online", "base_url": denied.url})))  # fmt: skip
    *finished, refused = [finish_trainer(t)["run_id"] for t in trainers]
    for f in finished:
        sc.wait_run(f, "finished")
    sc.wait_run(refused, "failed")
    finished.sort(key=lambda f: finished_at(env.spool / "runs" / f))  # the oldest finished first

    # a spool that a sidecar serves is left to it
    r = cli(env, "gc", "--retain", "0")
    assert r.returncode == 1 and f"served by a running kforge-sidecar (pid {sc.proc.pid})" in r.stderr
    assert sc.stop() == 0

    r = cli(env, "gc", "--retain", "0", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert all(f"would remove run {f}" in r.stdout for f in finished) and refused not in r.stdout
    assert run_dirs(env) == {*finished, refused}  # a dry run removes nothing

    # the cap: the two oldest finished runs bring the spool down to it; the third stays
    runs = env.spool / "runs"
    cap = dir_bytes(env.spool) - dir_bytes(runs / finished[0]) - dir_bytes(runs / finished[1])
    r = cli(env, "gc", "--retain", "never", "--spool-max-bytes", str(cap))
    assert r.returncode == 0, r.stderr
    assert run_dirs(env) == {finished[2], refused}
    assert "removed 2 runs" in r.stdout and "kept 1 with frames pending" in r.stdout

    # a cap nothing can meet: every finished run goes, the pending one never
    r = cli(env, "gc", "--retain", "never", "--spool-max-bytes", "1")
    assert r.returncode == 0, r.stderr
    assert run_dirs(env) == {refused}
    assert "still over --spool-max-bytes" in r.stderr

    # the sidecar itself, over its cap with nothing removable: says so, deletes nothing, serves
    sc = sidecar("--spool-max-bytes", "1", "--gc-interval", "0.5")
    wait_for(lambda: "no more runs can be removed" in sc.log(), 20, 0.1, "the over-cap warning")
    assert run_dirs(env) == {refused} and sc.status()["sidecar"]["retention"]["over_cap"] is True
    assert sc.stop() == 0


def test_durations_and_sizes():
    assert [parse_duration(x) for x in ("7d", "12h", "30m", "90s", "3600", "1w", "0", "never")] == [
        604800,
        43200,
        1800,
        90,
        3600,
        604800,
        0,
        None,
    ]
    assert [parse_size(x) for x in ("500M", "20G", "1.5k", "4096", "2GiB")] == [
        500 << 20,
        20 << 30,
        1536,
        4096,
        2 << 30,
    ]
    for bad in ("-5", "5x", "", "7 days"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("0", "-1G", "lots"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_removal_interrupted_by_a_crash_is_finished_on_start(env, sidecar):
    trash = env.spool / "runs" / ".removed-abc12345-1-0"
    trash.mkdir(parents=True)
    (trash / "frames.log").write_bytes(b"x" * 100)
    sc = sidecar()
    assert not trash.exists()
    assert sc.status()["runs"] == []  # never taken for a run
    assert os.listdir(env.spool / "runs") == []
