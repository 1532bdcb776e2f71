"""Deployment paths, with real processes: `kforge-sidecar run`, the sidecar's own
lifetime (--parent-pid, --idle-timeout, SIGHUP), the SLURM batch script on two fake
nodes (tests/slurm_shims/ stand in for sbatch, srun and scontrol), the root
Prolog/TaskProlog/Epilog, shellcheck on every script, and the systemd unit.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TRAINER,
    Env,
    Sidecar,
    run_trainer,
    stop_process,
    wait_for,
    wandb_file,
    wandb_history,
    wandb_summary,
)
from trainer import eval_metrics, train_metrics

PY = sys.executable
SLURM = ROOT / "deploy" / "slurm"
SHIMS = Path(__file__).resolve().parent / "slurm_shims"
UNIT = ROOT / "deploy" / "systemd" / "kforge-sidecar@.service"


def pid_gone(pid: int) -> bool:
    from sidecar.proc import pid_alive

    return not pid_alive(pid)


def expected_rows(first: int, last: int, eval_every: int = 0) -> dict[int, dict]:
    rows = {}
    for s in range(first, last + 1):
        rows[s] = train_metrics(s) | (eval_metrics(s) if eval_every and s % eval_every == 0 else {})
    return rows


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def kforge_bin(env: Env) -> Path:
    """A `kforge-sidecar` executable that runs this checkout with the test's interpreter."""
    exe = env.base / "bin" / "kforge-sidecar"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(PY)} -m sidecar "$@"\n')
    exe.chmod(0o755)
    return exe


@pytest.fixture
def procs():
    """Processes a test started; each stopped (with its group) at the end, by its own pid."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        stop_process(p, group=True)


def spawn(procs: list, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    p = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    procs.append(p)
    return p


def started_sidecar_pid(run_stderr: str) -> int:
    m = re.search(r"started a sidecar on \S+ \(pid (\d+)\)", run_stderr)
    assert m, run_stderr
    return int(m[1])


# ------------------------------------------------------------------ kforge-sidecar run


def test_run_starts_a_sidecar_exports_its_address_and_drains_it(env):
    vars_ = env.vars()
    del vars_["KFORGE_SIDECAR_ADDR"]  # the trainer learns the address from `run` alone
    r = subprocess.run(
        [PY, "-m", "sidecar", "run", "--address", env.address, "--drain-timeout", "30", "--",
         PY, str(TRAINER), "--steps", "40", "--eval-every", "10", "--name", "under-run", "--exit-code", "3"],
        env=vars_, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr  # the command's exit status passes through
    out = json_lines(r.stdout)[-1]
    assert out["closed"] is True and out["stats"]["dropped"] == 0
    pid = started_sidecar_pid(r.stderr)
    assert "sidecar drained and stopped" in r.stderr
    assert pid_gone(pid)
    assert not (env.base / "sock" / "sidecar.sock").exists()
    path = wandb_file(env.wandb_dir, out["run_id"])
    assert wandb_history(path) == expected_rows(1, 40, eval_every=10)
    summary = wandb_summary(path)
    assert summary["exit_code"] == 3  # (wandb calls a run with a non-zero exit code "failed")


def test_run_uses_the_sidecar_already_serving_and_leaves_it_running(env, sidecar):
    sc = sidecar()
    r = subprocess.run(
        [PY, "-m", "sidecar", "run", "--", PY, str(TRAINER), "--steps", "15"],
        env=env.vars(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"using the sidecar already serving {env.address} (pid {sc.proc.pid})" in r.stderr
    assert "started a sidecar" not in r.stderr
    out = json_lines(r.stdout)[-1]
    sc.wait_run(out["run_id"], "finished")
    assert sc.proc.poll() is None  # not stopped by `run`
    assert wandb_history(wandb_file(env.wandb_dir, out["run_id"])) == expected_rows(1, 15)


def test_run_does_not_start_the_command_when_no_sidecar_can_start(env):
    sock_dir = env.base / "sock"
    sock_dir.mkdir(mode=0o755)
    os.chmod(sock_dir, 0o755)  # the sidecar refuses a socket directory others can enter
    marker = env.base / "ran"
    r = subprocess.run(
        [PY, "-m", "sidecar", "run", "--", "sh", "-c", f"touch {marker}"],
        env=env.vars(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 125, r.stderr
    assert "has mode 0755" in r.stderr and "the sidecar exited with code 2" in r.stderr
    assert not marker.exists()


def test_sigterm_to_run_reaches_the_trainer_and_the_sidecar_drains(env, procs):
    run = spawn(
        procs,
        [PY, "-m", "sidecar", "run", "--drain-timeout", "30", "--",
         PY, str(TRAINER), "--steps", "100000", "--sleep", "0.01", "--handle-sigterm", "--name", "sigterm"],
        env.vars(),
    )  # fmt: skip
    probe = Sidecar(env)  # only for `status`
    wait_for(
        lambda: any(r["received"] >= 20 for r in (probe.status() or {}).get("runs", [])), 60, 0.2, "frames to arrive"
    )
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=90)
    assert run.returncode == 143, stderr  # the trainer's exit status (128 + SIGTERM)
    assert "SIGTERM: forwarding to" in stderr
    out = json_lines(stdout)[-1]
    assert out["sigterm"] is True and out["closed"] is True  # it got SIGTERM, then closed its client
    assert "sidecar drained and stopped" in stderr
    assert pid_gone(started_sidecar_pid(stderr))
    # everything the trainer logged (and so everything acknowledged) reached wandb
    path = wandb_file(env.wandb_dir, out["run_id"])
    assert wandb_history(path) == expected_rows(1, out["last_step"])
    assert wandb_summary(path)["exit_code"] == 143


# ------------------------------------------------------------------ serve's own lifetime


def test_parent_pid_gone_drains_and_exits_zero(env, sidecar, procs):
    parent = subprocess.Popen(["sleep", "120"])
    procs.append(parent)
    sc = sidecar("--parent-pid", str(parent.pid))
    out = run_trainer(env, "--steps", "20", "--no-close")  # an open run: only the parent's end stops it
    assert sc.proc.poll() is None
    parent.kill()
    parent.wait(10)
    assert sc.proc.wait(60) == 0
    log = sc.log()
    assert f"parent process {parent.pid} is gone: draining" in log and "stopped" in log
    assert wandb_history(wandb_file(env.wandb_dir, out["run_id"])) == expected_rows(1, 20)


def test_idle_timeout_waits_for_open_runs_then_drains_and_exits_zero(env, sidecar, procs):
    # The trainer first (its client waits for the sidecar), so the sidecar hears from it at once.
    # Its pauses are longer than the idle timeout, with nothing on the wire: the open run holds the sidecar.
    trainer = spawn(procs, [PY, str(TRAINER), "--steps", "2", "--sleep", "2.5", "--close-timeout", "10"], env.vars())
    sc = sidecar("--idle-timeout", "1.5")
    stdout, stderr = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, stderr
    out = json_lines(stdout)[-1]
    assert out["closed"] is True  # the sidecar was still there for the close
    assert sc.proc.wait(60) == 0
    log = sc.log()
    assert "idle for 1.5s" in log and "stopped" in log
    assert wandb_history(wandb_file(env.wandb_dir, out["run_id"])) == expected_rows(1, 2)


def test_log_file_is_reopened_on_sighup(env, sidecar):
    log = env.base / "logs" / "sidecar.log"
    sc = sidecar("--log-file", str(log))
    assert "serving on" in log.read_text()
    assert log.stat().st_mode & 0o777 == 0o600
    rotated = log.with_name("sidecar.log.1")
    log.rename(rotated)  # what logrotate does, before it sends SIGHUP
    os.kill(sc.proc.pid, signal.SIGHUP)
    wait_for(lambda: log.exists() and "SIGHUP: reopened" in log.read_text(), 10, what="a new log file")
    out = run_trainer(env, "--steps", "5")
    sc.wait_run(out["run_id"], "finished")
    assert sc.stop() == 0
    new = log.read_text()
    assert "uploader[" in new and "stopped" in new  # the uploaders write there too
    assert "SIGHUP" not in rotated.read_text() and "stopped" not in rotated.read_text()


# ------------------------------------------------------------------ SLURM batch script


def sbatch_env(env: Env, job: int, train_cmd: str) -> dict[str, str]:
    v = env.vars()
    del v["KFORGE_SIDECAR_ADDR"]  # the script sets it per node
    kforge_bin(env)
    v.update(
        PATH=f"{SHIMS}:{env.base / 'bin'}:{v['PATH']}",
        SLURM_JOB_ID=str(job),
        TRAIN_CMD=train_cmd,
        KFORGE_SOCKET_ROOT=str(env.base),
        KFORGE_LOG_DIR=str(env.base),
        KFORGE_DRAIN_TIMEOUT="30",
    )
    return v


def node_sidecars(env: Env, job: int) -> dict[str, tuple[int, str]]:
    """node -> (sidecar pid, its log) from the per-node logs the script asked for."""
    found = {}
    for node in ("fakenode0", "fakenode1"):
        log = (env.base / f"kforge-sidecar-{job}-{node}.log").read_text()
        m = re.search(
            rf"serving on ipc://{re.escape(str(env.base))}/kforge-{job}-{node}/sidecar\.sock .*pid (\d+)\)", log
        )
        assert m, log
        found[node] = (int(m[1]), log)
    return found


def test_sbatch_script_runs_one_sidecar_per_node_and_drains_them(env):
    job = 4242
    train = f"{shlex.quote(PY)} {shlex.quote(str(TRAINER))} --steps 30 --name $SLURMD_NODENAME"
    r = subprocess.run(
        ["bash", str(SHIMS / "sbatch"), str(SLURM / "train.sbatch")],
        env=sbatch_env(env, job, train), cwd=env.base, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sidecar up on fakenode0" in r.stdout and "sidecar up on fakenode1" in r.stdout
    sidecars = node_sidecars(env, job)
    assert len({pid for pid, _ in sidecars.values()}) == 2
    runs = {o["run_id"] for o in json_lines(r.stdout)}
    assert len(runs) == 2
    for node, (pid, log) in sidecars.items():
        assert pid_gone(pid)
        assert "SIGTERM" not in log and "stop requested: draining" in log and "stopped" in log
        assert f"name={node} " in log  # the node's trainer reached its own node's sidecar
        assert f"(spool {env.spool}/job-{job}/{node}, pid {pid})" in log  # a spool per job and node
        assert not (env.base / f"kforge-{job}-{node}").exists()  # socket directory removed
    for run_id in runs:
        assert wandb_history(wandb_file(env.wandb_dir, run_id)) == expected_rows(1, 30)


def test_sbatch_script_sigterm_stops_training_then_drains(env, procs):
    """--signal=B:TERM@120: SIGTERM to the batch shell, ahead of the time limit."""
    job = 4243
    train = f"{shlex.quote(PY)} {shlex.quote(str(TRAINER))} --steps 100000 --sleep 0.01 --handle-sigterm"
    batch = spawn(procs, ["bash", str(SHIMS / "sbatch"), str(SLURM / "train.sbatch")], sbatch_env(env, job, train))
    addrs = [f"ipc://{env.base}/kforge-{job}-fakenode{i}/sidecar.sock" for i in (0, 1)]
    probe = Sidecar(env)

    def logging_on_both() -> bool:
        for a in addrs:
            r = probe.cli("status", "--json", "--timeout", "1", "--address", a)
            if r.returncode != 0 or not any(run["received"] >= 10 for run in json.loads(r.stdout)["runs"]):
                return False
        return True

    wait_for(logging_on_both, 60, 0.2, "both nodes' trainers to log")
    batch.send_signal(signal.SIGTERM)
    stdout, stderr = batch.communicate(timeout=90)
    assert batch.returncode == 143, stdout + stderr
    outs = json_lines(stdout)
    assert len(outs) == 2 and all(o["sigterm"] and o["closed"] for o in outs)
    for pid, log in node_sidecars(env, job).values():
        assert pid_gone(pid) and "stopped" in log
    for o in outs:
        assert wandb_history(wandb_file(env.wandb_dir, o["run_id"])) == expected_rows(1, o["last_step"])


# ------------------------------------------------------------------ Prolog / TaskProlog / Epilog


def slurm_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a Prolog/Epilog/TaskProlog as slurmd does: in its own process group, which is
    SIGKILLed once the script has exited (what it leaves there behind dies)."""
    p = subprocess.Popen(
        ["bash", str(SLURM / name)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = p.communicate(timeout=120)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def prolog_env(env: Env, **extra: str) -> dict[str, str]:
    v = env.vars()
    del v["KFORGE_SIDECAR_ADDR"]
    v.update(
        KFORGE_SLURM_CONF=str(env.base / "no-such.conf"),
        KFORGE_RUN_ROOT=str(env.base / "run"),
        KFORGE_STATE_ROOT=str(env.base / "state"),
        KFORGE_DRAIN_TIMEOUT="30",
        SLURM_JOB_ID="77",
        SLURM_JOB_USER=pwd.getpwuid(os.getuid()).pw_name,
    )
    v.update(extra)
    return v


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="the Prolog runs as root and needs setpriv"
)
def test_prolog_starts_a_sidecar_taskprolog_exports_it_epilog_drains_it(env):
    v = prolog_env(env, KFORGE_SIDECAR=str(kforge_bin(env)))
    run_dir = env.base / "run" / "job-77"
    lock = run_dir / "sidecar.sock.lock"
    pid = None
    try:
        assert slurm_script("prolog.sh", v).returncode == 0
        assert (run_dir.stat().st_mode & 0o777) == 0o700
        t = slurm_script("taskprolog.sh", v)
        assert t.returncode == 0
        assert t.stdout == f"export KFORGE_SIDECAR_ADDR=ipc://{run_dir}/sidecar.sock\n"
        task_env = Env(env.base, f"ipc://{run_dir}/sidecar.sock", env.spool, env.wandb_dir)
        out = run_trainer(task_env, "--steps", "25", "--no-close", "--close-timeout", "30")
        assert out["stats"]["acked"] == 25  # the sidecar the Prolog started has them
        pid = int(lock.read_text())
        e = slurm_script("epilog.sh", v)
        assert e.returncode == 0, e.stderr
        wait_for(lambda: pid_gone(pid), 30, what="the sidecar to exit")
        assert not run_dir.exists()
        log = (env.base / "state" / v["SLURM_JOB_USER"] / "logs" / "77.log").read_text()
        assert "SIGTERM: draining" in log and "stopped" in log
        assert wandb_history(wandb_file(env.wandb_dir, out["run_id"])) == expected_rows(1, 25)
    finally:
        if pid is None and lock.exists() and lock.read_text().strip():
            pid = int(lock.read_text())
        if pid is not None and not pid_gone(pid):
            os.killpg(pid, signal.SIGKILL)  # the sidecar leads its own session


def test_prolog_epilog_taskprolog_exit_zero_whatever_fails(env):
    run_dir = env.base / "run" / "job-77"
    bare_path = "/usr/bin:/bin"  # no kforge-sidecar here
    cases = {
        "no kforge-sidecar": prolog_env(env, PATH=bare_path),
        "not executable": prolog_env(env, KFORGE_SIDECAR=str(env.base / "missing")),
        "no job": {k: v for k, v in prolog_env(env).items() if k != "SLURM_JOB_ID"},
        "unknown user": prolog_env(env, KFORGE_SIDECAR=str(kforge_bin(env)), SLURM_JOB_USER="no-such-user-kfs"),
        "unwritable root": prolog_env(env, KFORGE_SIDECAR=str(kforge_bin(env)), KFORGE_RUN_ROOT="/proc/kfs"),
    }
    for what, v in cases.items():
        r = slurm_script("prolog.sh", v)
        assert r.returncode == 0, (what, r.stderr)
        assert not run_dir.exists(), what
    v = prolog_env(env)
    t = slurm_script("taskprolog.sh", v)
    assert (t.returncode, t.stdout) == (0, "")  # no sidecar directory for this job: nothing exported
    run_dir.mkdir(parents=True, mode=0o700)
    t = slurm_script("taskprolog.sh", prolog_env(env, KFORGE_SIDECAR_ADDR="ipc:///elsewhere"))
    assert (t.returncode, t.stdout) == (0, "")  # the user's own address wins
    (run_dir / "sidecar.sock.lock").write_text("garbage\n")  # left by a sidecar long gone
    assert slurm_script("epilog.sh", prolog_env(env, KFORGE_DRAIN_TIMEOUT="not-a-number")).returncode == 0
    assert slurm_script("epilog.sh", v).returncode == 0
    assert not run_dir.exists()
    assert slurm_script("epilog.sh", v).returncode == 0  # nothing left to do


# ------------------------------------------------------------------ static checks


def shell_scripts() -> list[Path]:
    bench = list((ROOT / "bench").glob("*.sh"))  # the GPU check scripts
    return sorted([p for d in (SLURM, SHIMS) for p in d.iterdir() if p.is_file()] + bench)


def test_shellcheck_is_clean_on_every_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    scripts = shell_scripts()
    assert {"train.sbatch", "prolog.sh", "epilog.sh", "taskprolog.sh", "srun", "gpu_check.sh"} <= {
        p.name for p in scripts
    }
    r = subprocess.run(
        ["shellcheck", "--severity=style", *map(str, scripts)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_unit_verifies_and_its_stop_timeout_covers_the_drain(env):
    text = UNIT.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    drain = float(re.search(r"--drain-timeout (\d+)", settings["ExecStart"])[1])
    assert float(settings["TimeoutStopSec"]) > drain
    assert settings["KillSignal"] == "SIGTERM" and settings["KillMode"] == "mixed"
    assert settings["Restart"] == "on-failure" and settings["RuntimeDirectoryMode"] == "0700"
    assert settings["User"] == "%i" and settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert "\nRuntimeDirectory=kforge-sidecar/%i\n" in text  # the socket lives there:
    assert "\nEnvironment=KFORGE_SIDECAR_ADDR=ipc:///run/kforge-sidecar/%i/sidecar.sock\n" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # verify wants ExecStart to exist: render a copy that runs this checkout's interpreter
    exe = settings["ExecStart"].split()[0]
    rendered = text.replace(f"ExecStart={exe} ", f"ExecStart={PY} -m sidecar ")
    assert rendered != text
    unit_dir = env.base / "units"
    unit_dir.mkdir()
    (unit_dir / UNIT.name).write_text(rendered)
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "kforge-sidecar@root.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
