"""The command as a new user meets it: the plain install, --version, every mistake
answered in one line with a non-zero exit, and `status --watch`."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT, Env, stop_process


def _mistakes(env: Env) -> list[tuple[list[str], dict[str, str], int, str]]:
    """(argv, extra environment, exit code, what the one line must say)."""
    a_file = env.base / "a-file"
    a_file.write_text("")
    empty = env.base / "empty"
    empty.mkdir()
    missing = env.base / "missing"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that was just reaped: no such process
    return [
        (
            ["serve", "--spool-dir", str(a_file)],
            {},
            2,
            f"spool directory {a_file} is a file, not a directory; choose another with --spool-dir",
        ),
        (["serve", "--spool-dir", "/proc/kfs/spool"], {}, 2, "cannot create spool directory /proc/kfs/spool"),
        (["serve", "--log-level", "bogus"], {}, 2, "'bogus' is not a log level; use one of DEBUG, INFO"),
        (["serve", "--drain-timeout", "-5"], {}, 2, "'--drain-timeout': must be >= 0 (got -5)"),
        (["serve", "--init-timeout", "0"], {}, 2, "'--init-timeout': must be > 0 (got 0)"),
        (
            ["serve", "--retry-backoff", "5", "--retry-backoff-max", "1"],
            {},
            2,
            "'--retry-backoff-max': must be >= --retry-backoff (5)",
        ),
        (
            ["serve", "--address", "/tmp/kfs.sock"],
            {},
            2,
            "'/tmp/kfs.sock' is not a ZeroMQ address; for a socket file write ipc:///tmp/kfs.sock",
        ),
        (["serve", "--address", "localhost:5555"], {}, 2, "write tcp://localhost:5555"),
        (
            ["status"],
            {"KFORGE_SIDECAR_ADDR": "/tmp/kfs.sock"},
            2,
            "$KFORGE_SIDECAR_ADDR: '/tmp/kfs.sock' is not a ZeroMQ address",
        ),
        (["serve", "--retain", "-1d"], {}, 2, "'-1d' is not a duration (e.g. 7d, 12h, 30m, 90s, 3600, or never)"),
        (["serve", "--spool-max-bytes", "0"], {}, 2, "'--spool-max-bytes': '0': the size must be more than 0"),
        (["serve", "--metrics-port", "70000"], {}, 2, "70000 is not a TCP port"),
        (["serve", "--metrics-textfile", str(env.base / "kfs.txt")], {}, 2, "does not end in .prom"),
        (["serve", "--parent-pid", str(gone.pid)], {}, 2, f"no process {gone.pid} is running"),
        (["status", "--interval", "0"], {}, 2, "'--interval': must be > 0"),
        (["stop", "--timeout", "-1"], {}, 2, "'--timeout': must be > 0"),
        (["stop"], {}, 1, f"no sidecar answers on {env.address}"),
        (["sync", "--spool-dir", str(missing)], {}, 1, f"no spool at {missing} (no such directory)"),
        (["sync", "--spool-dir", str(empty)], {}, 1, f"no spool in {empty}"),
        (["gc", "--spool-dir", str(missing)], {}, 1, f"no spool at {missing}"),
        (["run", "nosuchcmd", "--flag"], {}, 127, "kforge-sidecar run: nosuchcmd: command not found"),
        (["serv"], {}, 2, "No such command 'serv'"),
    ]


def test_every_mistake_is_one_line_and_a_non_zero_exit(env):
    cases = _mistakes(env)
    procs = []
    for argv, extra, _code, _msg in cases:  # all at once: each is a short-lived process
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sidecar", *argv], env={**env.vars(), **extra},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        ))  # fmt: skip
    try:
        for (argv, _extra, code, msg), p in zip(cases, procs):
            stdout, stderr = p.communicate(timeout=60)
            lines = stderr.strip().splitlines()
            assert p.returncode == code, (argv, p.returncode, stderr)
            assert len(lines) == 1 and msg in lines[0], (argv, stderr)
            assert "Traceback" not in stderr and stdout == "", argv
    finally:
        for p in procs:
            stop_process(p, group=True)
    # `run` with a command that does not exist started no sidecar
    assert not (env.base / "sock").exists()
    assert not env.spool.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run serve as another user")
def test_spool_directory_of_another_user_or_unwritable_is_one_line(env):
    os.chmod(env.base, 0o755)  # root's: the other user may enter it, not write in it
    theirs = env.base / "theirs"
    theirs.mkdir(mode=0o700)
    cases = {
        theirs: f"spool directory {theirs} belongs to uid 0, not to you (uid 65534)",
        env.base / "new": f"cannot create spool directory {env.base / 'new'}: Permission denied",
    }
    for spool, message in cases.items():
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "sidecar", "serve",
             "--spool-dir", str(spool), "--address", f"ipc://{env.base}/nobody.sock"],
            env={**env.vars(), "HOME": "/nonexistent"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert list(theirs.iterdir()) == []  # not touched


def test_version(env):
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"], env=env.vars(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    assert re.fullmatch(
        r"kforge-sidecar \d+\.\d+\.\d+\S* \(wandb \d+\.\d+\.\d+\S*, Python 3\.\d+\.\d+\)\n", r.stdout
    ), r.stdout


def _plain_install(base: Path) -> Path:
    """A fresh venv holding exactly what `pip install kforge-sidecar` (no extras) installs:
    the two packages, their two dependencies (pyzmq, msgpack) and the console script that
    pip writes for [project.scripts]. Returns the venv."""
    venv = base / "plain"
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=60,
    )
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip())  # fmt: skip
    for pkg in ("client", "sidecar"):
        shutil.copytree(ROOT / pkg, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    ours = Path(sysconfig.get_paths()["purelib"])
    deps = [p for p in ours.iterdir() if p.name.split("-")[0].split(".")[0] in ("zmq", "pyzmq", "msgpack")]
    assert {"zmq", "msgpack"} <= {p.name for p in deps}
    for p in deps:
        (site / p.name).symlink_to(p)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["pyzmq>=25", "msgpack>=1.0"]  # this venv holds exactly these
    module, func = project["scripts"]["kforge-sidecar"].split(":")
    script = venv / "bin" / "kforge-sidecar"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport re\nimport sys\nfrom {module} import {func}\n"
        f"if __name__ == '__main__':\n    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit({func}())\n"
    )
    script.chmod(0o755)
    return venv


def test_plain_install_says_in_one_line_what_to_install_and_the_client_works(env):
    venv = _plain_install(env.base)
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(env.base)}
    for args in (["serve"], ["--version"], []):
        r = subprocess.run(
            [str(venv / "bin" / "kforge-sidecar"), *args], env=clean, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "the daemon's dependencies are not installed (typer, rich, wandb, prometheus-client)" in r.stderr
        assert "pipx install 'kforge-sidecar[sidecar]'" in r.stderr
    # the trainer's side of a plain install: the client logs and closes within its timeout, no sidecar
    code = (
        "from client import MetricsClient\n"
        f"mc = MetricsClient(project='p', address='ipc://{env.base}/none.sock')\n"
        "mc.log({'loss': 1.0}, step=1)\n"
        "print(mc.close(timeout=0.5), mc.stats().logged)\n"
        "import sys; assert not {'wandb', 'typer', 'rich', 'torch'} & set(sys.modules)\n"
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], env=clean, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "1"]


def _watch(env: Env, stdout) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "status", "--watch", "--interval", "0.2", "--timeout", "0.2"],
        env={**env.vars(), "TERM": "xterm"}, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def test_status_watch_refreshes_until_ctrl_c(env):
    # not a terminal: one view per refresh
    p = _watch(env, subprocess.PIPE)
    try:
        time.sleep(2.5)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
    finally:
        stop_process(p, group=True)
    assert p.returncode == 0
    assert out.decode().count(f"no sidecar running; spool {env.spool}") >= 2

    # a terminal: redrawn in place (cursor up, erase line), Ctrl-C exits 0
    master, slave = pty.openpty()
    p = _watch(env, slave)
    os.close(slave)
    chunks = []
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunks.append(os.read(master, 65536))
                except OSError:
                    break
        p.send_signal(signal.SIGINT)
        p.wait(30)
    finally:
        stop_process(p, group=True)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0
    assert screen.count("no sidecar running") >= 2
    assert "\x1b[1A" in screen and "\x1b[2K" in screen  # moved up and erased: refreshed in place


def test_default_spool_is_node_local_and_network_filesystems_are_recognised(monkeypatch):
    from sidecar.spool import default_spool_dir, network_filesystem

    monkeypatch.delenv("KFORGE_SPOOL_DIR", raising=False)
    assert default_spool_dir() == Path(f"/var/tmp/kforge-sidecar-{os.getuid()}/spool")
    monkeypatch.setenv("KFORGE_SPOOL_DIR", "/scratch/me/spool")
    assert default_spool_dir() == Path("/scratch/me/spool")
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "srv:/export/home /home nfs4 rw,vers=4.2 0 0\n"
        "/dev/nvme0n1 /home/alice/local\\040disk xfs rw 0 0\n"
        "10.0.0.1@o2ib:/lfs /n/lustre lustre rw 0 0\n"
        "gpfs0 /gpfs gpfs rw 0 0\n"
        "tmpfs /var/tmp tmpfs rw 0 0\n"
    )
    assert network_filesystem(Path("/home/alice/.local/state/kforge-sidecar"), mounts) == "nfs4 at /home"
    assert network_filesystem(Path("/home/alice/local disk/spool"), mounts) is None  # a local mount inside NFS
    assert network_filesystem(Path("/n/lustre/me/spool"), mounts) == "lustre at /n/lustre"
    assert network_filesystem(Path("/gpfs/x"), mounts) == "gpfs at /gpfs"
    assert network_filesystem(Path("/gpfsx/y"), mounts) is None  # a prefix of the name is not the mount
    assert network_filesystem(Path("/var/tmp/kforge-sidecar-0/spool"), mounts) is None
