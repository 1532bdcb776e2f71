"""The sidecar as an operator meets it: refusing unsafe starts, status, stop, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import Sidecar, all_history, run_trainer, wait_for, wandb_file, wandb_history
from trainer import train_metrics

from sidecar.spool import RunSpool


def test_second_sidecar_on_the_same_address_is_refused(env, sidecar):
    first = sidecar()
    second = sidecar(start=False)
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"], env=env.vars(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1
    assert f"already serves {env.address}" in r.stderr
    assert f"pid {first.proc.pid}" in r.stderr
    del second
    # the first one still owns the socket and serves
    out = run_trainer(env, "--steps", "5")
    first.wait_run(out["run_id"], "finished")


def test_unsafe_socket_directory_is_refused(env):
    sock_dir = env.base / "sock"
    sock_dir.mkdir(mode=0o755)
    os.chmod(sock_dir, 0o755)
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"], env=env.vars(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "has mode 0755" in r.stderr and "chmod 700" in r.stderr
    os.chmod(sock_dir, 0o700)
    os.chown(sock_dir, 65534, 65534)  # someone else's directory (tests run as root here)
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"], env=env.vars(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "belongs to uid 65534" in r.stderr


def test_stale_socket_from_a_killed_sidecar_is_taken_over(env, sidecar):
    sc = sidecar()
    os.kill(sc.proc.pid, signal.SIGKILL)
    sc.proc.wait(10)
    assert (env.base / "sock" / "sidecar.sock").exists()
    again = sidecar()
    out = run_trainer(env, "--steps", "5")
    again.wait_run(out["run_id"], "finished")


def test_status_without_a_sidecar_reads_the_spool(env, sidecar):
    sc = sidecar()
    out = run_trainer(env, "--steps", "12", "--name", "offline-view")
    sc.wait_run(out["run_id"], "finished")
    assert sc.stop() == 0
    r = sc.cli("status")
    assert r.returncode == 1
    assert "no sidecar running" in r.stdout
    # finished and uploaded: not shown by default, only with --all
    assert out["run_id"] not in r.stdout and "1 finished and uploaded run not shown (--all shows them)" in r.stdout
    r = sc.cli("status", "--all")
    assert r.returncode == 1
    assert out["run_id"] in r.stdout and "offline-view" in r.stdout and "finished" in r.stdout
    r = sc.cli("status", "--json")
    run = r_json = __import__("json").loads(r.stdout)["runs"][0]
    assert (run["received"], run["uploaded"], run["pending"], run["last_step"]) == (12, 12, 0, 12)
    del r_json


def test_stop_command_drains_and_exits(env, sidecar):
    sc = sidecar()
    out = run_trainer(env, "--steps", "30")
    r = sc.cli("stop", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert "drained and stopped" in r.stdout
    assert sc.proc.wait(5) == 0
    # everything the trainer sent was uploaded before the sidecar left
    rows = wandb_history(wandb_file(env.wandb_dir, out["run_id"]))
    assert rows == {s: train_metrics(s) for s in range(1, 31)}
    assert sc.cli("stop").returncode == 1  # nothing to stop now


def test_sigterm_exits_zero_and_socket_is_removed(env, sidecar):
    sc = sidecar()
    assert sc.stop() == 0
    assert not (env.base / "sock" / "sidecar.sock").exists()
    assert "stopped" in sc.log()


def test_torn_tail_is_cut_on_start_and_the_rest_uploaded(env, sidecar):
    """A sidecar that crashed mid-write: the next one cuts the torn record and uploads the rest."""
    sc = sidecar()
    out = run_trainer(env, "--steps", "25", "--no-close")
    run_id = out["run_id"]
    os.killpg(sc.proc.pid, signal.SIGKILL)
    sc.proc.wait(10)
    log = env.spool / "runs" / run_id / "frames.log"
    size = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")  # half a header: a write cut short
    (env.spool / "runs" / run_id / "uploader.json").unlink(missing_ok=True)  # upload from scratch
    again: Sidecar = sidecar()
    assert "cut a torn tail of 6 bytes" in again.log()
    assert log.stat().st_size >= size
    # live while an uploader hands wandb the frames; waiting once the killed sidecar's own
    # uploader (see below) has handed them all and finished its segment
    st = wait_for(lambda: (r := again.run(run_id)) and r["state"] in ("live", "waiting") and r, 60, 0.2, "the run")
    assert st["received"] == 25
    import time

    deadline = time.monotonic() + 30
    while (again.run(run_id) or {}).get("uploaded") != 25 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert again.stop() == 0  # drain: wandb gets what is spooled
    # The killed sidecar's uploader runs in its own session, so the SIGKILL spared it: it
    # drains what it read and finishes (its last row goes to wandb then), and until it
    # exits it holds the run's lock and the new uploader waits. Read the record once every
    # uploader of the run is gone, across the .wandb files they wrote.
    run = RunSpool(env.spool / "runs" / run_id)
    wait_for(lambda: not run.uploader_running(), 60, 0.2, "every uploader of the run to exit")
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {s: train_metrics(s) for s in range(1, 26)}


def test_second_sidecar_on_the_same_spool_is_refused(env, sidecar):
    """Two sidecars on one spool would both recover and upload the same runs."""
    first = sidecar()
    other = env.base / "sock2"
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--address", f"ipc://{other}/s.sock"],
        env=env.vars(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert f"spool {env.spool} is in use by another kforge-sidecar (pid {first.proc.pid})" in r.stderr
    assert first.stop() == 0
    assert not list((env.base / "sock").iterdir())  # socket and lock file gone after a clean stop


def test_a_run_held_by_a_leftover_uploader_waits_for_it_and_the_stop_says_what_stays(env, sidecar):
    """An uploader the sidecar did not start (a killed sidecar's, still draining) holds the
    run's lock: the supervisor waits for it instead of starting uploaders that exit at
    once; a stop meanwhile says what stays in the spool; the next sidecar uploads it."""
    import time

    sc = sidecar()
    run_id = "heldbyanother1"
    run = RunSpool(env.spool / "runs" / run_id)
    run.dir.mkdir(mode=0o700)
    held = run.lock()
    assert held is not None
    try:
        run_trainer(env, "--steps", "10", "--run-id", run_id)
        time.sleep(1.5)  # several supervisor ticks
        assert sc.run(run_id)["uploaded"] == 0
        assert sc.stop() == 0
    finally:
        os.close(held)
    log = sc.log()
    assert "another uploader" not in log.replace("(another uploader holds the run)", ""), log
    assert f"run {run_id}: 10 frames are not in wandb yet and stay in the spool (another uploader holds the run)" in log
    again: Sidecar = sidecar()
    again.wait_run(run_id, "finished")
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {s: train_metrics(s) for s in range(1, 11)}
