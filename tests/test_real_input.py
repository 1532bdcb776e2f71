"""What real trainers send (issue: real input), end to end with real processes.

Each test runs a trainer script in its own process against a real sidecar
with wandb offline, then reads wandb's own record back. Nothing the client
accepted may be lost, nothing logged earlier may be erased.
"""

from __future__ import annotations

import logging
import math
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import all_history, finish_trainer, run_files, start_trainer, wait_for, wandb_records, wandb_summary

from client import MetricsClient, protocol
from client.values import short_key

HEAD = """
import json, math, sys
from client import MetricsClient
raised = None
"""
TAIL = """
print(json.dumps({"run_id": mc.run_id, "closed": closed, "raised": raised, "stats": mc.stats().__dict__}))
"""


def run_script(env, body: str, *args: str, timeout: float = 120) -> dict:
    script = env.base / f"trainer_{time.monotonic_ns()}.py"
    script.write_text(HEAD + textwrap.dedent(body) + TAIL)
    return finish_trainer(start_trainer(env, *args, script=script), timeout=timeout)


def segments(env, run_id: str) -> list[Path]:
    return run_files(env.wandb_dir, run_id)


def record_of(env, run_id: str, kind: str) -> list[dict]:
    return [r[kind] for f in segments(env, run_id) for r in wandb_records(f) if r.get("type") == kind]


# ---------------------------------------------------------------- wide rows


def test_a_step_wider_than_a_frame_is_delivered_whole_and_the_stream_goes_on(env, sidecar):
    sc = sidecar()
    out = run_script(
        env,
        """
        mc = MetricsClient(project="moe")
        long_key = "router/" + "expert_utilisation_" * 20  # 387 characters
        try:
            for step in range(1, 4):
                wide = {f"moe/layer{l:02d}/expert{e:03d}": step + l / 100 + e / 1e5 for l in range(24) for e in range(128)}
                wide[long_key] = float(step)
                mc.log(wide, step=step)          # 3073 keys: split across frames of one step
            for step in range(4, 21):
                mc.log({"loss": 1.0 / step}, step=step)  # what comes after is not stuck behind it
        except Exception as exc:
            raised = repr(exc)
        closed = mc.close(timeout=60)
        """,
    )
    assert out["closed"] is True and out["stats"]["refused"] == 0 and out["stats"]["dropped"] == 0
    run_id = out["run_id"]
    sc.wait_run(run_id, "finished")
    rows, dups = all_history(env.wandb_dir, run_id)
    assert dups == 0
    long_key = "router/" + "expert_utilisation_" * 20
    for step in range(1, 4):
        expected = {
            f"moe/layer{layer:02d}/expert{e:03d}": step + layer / 100 + e / 1e5
            for layer in range(24)
            for e in range(128)
        }
        expected[short_key(long_key, 256)] = float(step)
        assert rows[step] == expected  # one row per step: wandb merged the frames
    assert {s: rows[s] for s in range(4, 21)} == {s: {"loss": 1.0 / s} for s in range(4, 21)}


# ---------------------------------------------------------------- steps


def test_a_lower_step_in_one_session_never_rewinds_or_erases_and_is_counted(env, sidecar):
    sc = sidecar()
    out = run_script(
        env,
        """
        mc = MetricsClient()
        try:
            for step in range(1, 101):
                mc.log({"loss": 1.0 / step}, step=step)
            mc.log_eval({"eval/loss": 9.0}, step=3)    # an eval computed late
            for step in range(101, 151):
                mc.log({"loss": 1.0 / step}, step=step)
        except Exception as exc:
            raised = repr(exc)
        closed = mc.close(timeout=30)
        """,
    )
    assert out["closed"] is True and out["stats"]["late"] == 1
    run_id = out["run_id"]
    st = sc.wait_run(run_id, "finished")
    assert st["late"] == 1 and st["pending"] == 0
    files = segments(env, run_id)
    assert len(files) == 1  # no re-init, no rewind
    assert not any(r.get("branch_point") for r in record_of(env, run_id, "run"))
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {s: {"loss": 1.0 / s} for s in range(1, 151)}  # nothing erased
    r = sc.cli("status", "--all")  # a finished and uploaded run is shown with --all
    assert "1 rows logged below the run's current step" in r.stdout


def test_step_none_follows_wandb_and_continues_across_a_resume(env, sidecar):
    sc = sidecar()
    body = """
        mc = MetricsClient(run_id=(sys.argv[1] or None))
        try:
            if not sys.argv[1]:
                for i in range(5):
                    mc.log({"a": float(i)})                # steps 0..4
                mc.log({"b": 1.0}, step=10)
                mc.log({"c": 2.0})                         # merges into 10, then 11
                mc.log({"d": 3.0}, commit=False)           # 11 stays open...
                mc.log({"e": 4.0})                         # ...and gets this too; then 12
            else:
                mc.log({"a": 100.0})                       # a resumed session: after the run's last step
                mc.log({"a": 101.0})
        except Exception as exc:
            raised = repr(exc)
        closed = mc.close(timeout=30)
    """
    first = run_script(env, body, "")
    run_id = first["run_id"]
    sc.wait_run(run_id, "finished")
    second = run_script(env, body, run_id)
    assert second["run_id"] == run_id and second["closed"] is True
    wait_for(
        lambda: (r := sc.run(run_id)) and r["state"] == "finished" and r["pending"] == 0,
        60,
        what="resumed run finished",
    )
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {
        0: {"a": 0.0}, 1: {"a": 1.0}, 2: {"a": 2.0}, 3: {"a": 3.0}, 4: {"a": 4.0},
        10: {"b": 1.0, "c": 2.0}, 11: {"d": 3.0, "e": 4.0},
        12: {"a": 100.0}, 13: {"a": 101.0},
    }  # fmt: skip


# ---------------------------------------------------------------- config and summary


def test_a_config_over_the_limit_is_trimmed_not_the_run_and_updates_reach_it(env, sidecar):
    sc = sidecar()
    out = run_script(
        env,
        """
        vocab = [f"token-{i:07d}" for i in range(200_000)]   # about 3 MB
        mc = MetricsClient(config={"model": {"dim": 4096, "vocab": vocab}, "lr": 3e-4, "big": 2**80})
        try:
            for step in range(1, 11):
                mc.log({"loss": 1.0 / step}, step=step)
            mc.update_config({"lr": 1e-4, "schedule": {"warmup": 100}})
            mc.update_summary({"best/loss": 0.1, "best/step": 10})
        except Exception as exc:
            raised = repr(exc)
        closed = mc.close(timeout=30)
        """,
    )
    assert out["closed"] is True
    run_id = out["run_id"]
    sc.wait_run(run_id, "finished")
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {s: {"loss": 1.0 / s} for s in range(1, 11)}
    summary = wandb_summary(segments(env, run_id)[-1])
    config = summary["config"]
    assert config["model"]["dim"] == 4096 and config["model"]["vocab"].startswith("<trimmed by kforge-sidecar")
    assert config["lr"] == 1e-4 and config["schedule"] == {"warmup": 100} and config["big"] == str(2**80)
    assert summary["summary"]["best/loss"] == 0.1 and summary["summary"]["best/step"] == 10


# ---------------------------------------------------------------- the trainer's record


def test_the_run_records_the_trainer_program_args_git_and_its_process(env, sidecar):
    sc = sidecar()
    out = run_script(
        env,
        """
        import time
        ballast = bytearray(300 * 1024 * 1024)     # the trainer's memory, not the uploader's
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        mc = MetricsClient()
        for step in range(1, 31):
            mc.log({"loss": 1.0 / step}, step=step)
            time.sleep(0.1)
        closed = mc.close(timeout=30)
        """,
        "--lr",
        "3e-4",
    )
    run_id = out["run_id"]
    sc.wait_run(run_id, "finished")
    env_rec = [e for e in record_of(env, run_id, "environment") if "program" in e][0]
    assert env_rec["program"].endswith(".py") and Path(env_rec["program"]).name.startswith("trainer_")
    assert env_rec["args"] == ["--lr", "3e-4"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=env.base, capture_output=True, text=True)
    if commit.returncode == 0:  # the script lives in a temp dir: no git there
        assert env_rec["git"]["commit"] == commit.stdout.strip()
    else:
        assert "git" not in env_rec or not env_rec["git"].get("commit")
    stats = [s["item"] for s in record_of(env, run_id, "stats") if "proc.memory.rssMB" in s["item"]]
    assert stats, "no system metrics recorded"
    assert max(s["proc.memory.rssMB"] for s in stats) > 250  # the trainer's process, sampled


def test_the_trainer_git_commit_is_the_trainer_checkouts(env, sidecar, tmp_path):
    repo = tmp_path / "proj"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "remote", "add", "origin", "https://example.com/proj.git"], check=True)
    (repo / "train.py").write_text(
        HEAD + "mc = MetricsClient()\nmc.log({'x': 1.0}, step=1)\nclosed = mc.close(timeout=30)\n" + TAIL
    )
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    sc = sidecar("--no-system-metrics")
    out = finish_trainer(start_trainer(env, script=repo / "train.py"))
    sc.wait_run(out["run_id"], "finished")
    env_rec = [e for e in record_of(env, out["run_id"], "environment") if "program" in e][0]
    assert env_rec["program"] == str(repo / "train.py")
    assert env_rec["git"] == {"commit": head, "remote_url": "https://example.com/proj.git"}
    assert not record_of(env, out["run_id"], "stats")  # --no-system-metrics


# ---------------------------------------------------------------- visibility


def test_no_sidecar_is_said_once_naming_the_address_and_close_says_what_happened(env, caplog):
    with caplog.at_level(logging.WARNING, logger="kforge_sidecar.client"):
        mc = MetricsClient(address=env.address)
        mc.log({"loss": 1.0}, step=1)
        wait_for(lambda: any("no kforge-sidecar has answered" in r.getMessage() for r in caplog.records), 15)
        t0 = time.monotonic()
        assert mc.close(timeout=0.5) is False
        assert time.monotonic() - t0 < 2
    said = [r.getMessage() for r in caplog.records]
    assert sum("no kforge-sidecar has answered" in m for m in said) == 1
    assert any(env.address in m and "no kforge-sidecar has answered" in m for m in said)
    assert any("close(): no kforge-sidecar answered at" in m and "2 frames were not delivered" in m for m in said), said


def test_a_refused_client_hears_why_and_close_says_so(env, sidecar, caplog):
    sidecar("--max-runs", "1")
    first = MetricsClient(address=env.address)
    first.log({"x": 1.0}, step=1)
    assert first.flush(10)
    with caplog.at_level(logging.WARNING, logger="kforge_sidecar.client"):
        second = MetricsClient(address=env.address)
        second.log({"x": 1.0}, step=1)
        t0 = time.monotonic()
        assert second.close(timeout=10) is False
        assert time.monotonic() - t0 < 5  # refused: no waiting out the timeout
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "refused this client" in said and "--max-runs 1" in said
    assert first.close(timeout=10) is True


# ---------------------------------------------------------------- hostile frames


def test_crafted_integers_do_not_crash_the_sidecar(env, sidecar):
    import msgpack
    import zmq

    sc = sidecar()
    ctx = zmq.Context()
    try:
        for i in range(2):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(env.address)
            hello = {"v": 1, "t": "hello", "session": f"feedface{i:08d}", "project": "p", "name": None, "run_id": None,
                     "config": {}, "pid": 1, "host": "h", "first": 2**64 - 1}  # fmt: skip
            sock.send(msgpack.packb(hello))
            assert sock.poll(10_000)
            reply = protocol.decode_response(sock.recv())
            assert isinstance(reply, protocol.Error) and "'first' must be in" in reply.reason
            sock.close()
    finally:
        ctx.term()
    st = sc.status()
    assert st is not None and sc.proc.poll() is None
    assert st["sidecar"]["rejected"]["bad_field"] == 2
    # and a real client still gets through
    mc = MetricsClient(address=env.address)
    mc.log({"x": 1.0}, step=1)
    assert mc.close(timeout=20) is True


def test_a_frame_the_sidecar_refuses_is_dropped_alone_and_the_stream_goes_on(env, sidecar):
    """A client whose frame the sidecar still refuses (here: a value type the sidecar's
    validator does not take, slipped past the client) loses exactly that frame."""
    sc = sidecar()
    mc = MetricsClient(address=env.address)
    mc.log({"loss": 1.0}, step=1)
    seq = next(mc._seq)  # a frame log() would never make, queued in its place
    mc._outbox.append((seq, protocol.encode_metrics(mc._session, seq, 2, "train", 0.0, {"loss": "text"})))
    mc._last_seq = seq
    for step in range(3, 11):
        mc.log({"loss": 1.0 / step}, step=step)
    assert mc.close(timeout=20) is True
    assert mc.stats().refused == 1
    st = sc.wait_run(mc.run_id, "finished")
    assert st["refused"] == 1 and st["received"] == 9
    rows, _ = all_history(env.wandb_dir, mc.run_id)
    assert rows == {s: {"loss": 1.0 / s} for s in [1, *range(3, 11)]}


# ---------------------------------------------------------------- values


def test_every_value_kind_lands_as_wandb_stores_it(env, sidecar):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    sc = sidecar()
    mc = MetricsClient(address=env.address)
    values = {
        "nan": float("nan"), "inf": float("inf"), "ninf": -float("inf"), "sub": 5e-324, "bool": True,
        "i64": 2**63 - 1, "big": 2**70, "np_f16": np.float16(0.1), "np_f32": np.float32(0.1),
        "np_i8": np.int8(-7), "np_u64": np.uint64(2**64 - 1), "np_bool": np.bool_(False),
        "t_bf16": torch.tensor(0.1, dtype=torch.bfloat16), "t_f16": torch.tensor(0.1, dtype=torch.float16),
        "t_f64": torch.tensor(0.1, dtype=torch.float64), "t_i64": torch.tensor(2**40),
        "t_bool": torch.tensor(True), "t_nan": torch.tensor(float("nan")),
        "text": "nope", "vec": torch.ones(2), "none": None, "cplx": 1j,
    }  # fmt: skip
    mc.log(values, step=1)
    assert mc.close(timeout=20) is True
    assert mc.stats().dropped_values == 4
    sc.wait_run(mc.run_id, "finished")
    rows, _ = all_history(env.wandb_dir, mc.run_id)
    got = rows[1]
    assert got.pop("nan") == "NaN" and got.pop("inf") == "Infinity" and got.pop("ninf") == "-Infinity"
    assert got.pop("t_nan") == "NaN"
    # beyond int64, wandb keeps a float64 (and prints it without an exponent)
    assert math.isclose(got.pop("big"), 2**70) and math.isclose(got.pop("np_u64"), 2**64)
    assert got == {
        "sub": 5e-324, "bool": True, "i64": 2**63 - 1,
        "np_f16": float(np.float16(0.1)), "np_f32": float(np.float32(0.1)), "np_i8": -7, "np_bool": False,
        "t_bf16": float(torch.tensor(0.1, dtype=torch.bfloat16)), "t_f16": float(torch.tensor(0.1, dtype=torch.float16)),
        "t_f64": 0.1, "t_i64": 2**40, "t_bool": True,
    }  # fmt: skip
    assert math.isclose(got["t_bf16"], 0.10009765625)


def test_config_updates_reach_every_later_segment_of_the_run(env, sidecar):
    """A resume re-initialises wandb: the new segment starts with the first config, every
    update since, and the resumed trainer's own config."""
    sc = sidecar()
    body = """
        first = not sys.argv[1]
        mc = MetricsClient(run_id=(sys.argv[1] or None), config={"lr": 1.0} if first else {"phase": "resume"})
        start = 1 if first else 6
        for step in range(start, start + 5):
            mc.log({"loss": 1.0 / step}, step=step)
        if first:
            mc.update_config({"lr": 2.0, "extra": 3})
        closed = mc.close(timeout=30)
    """
    run_id = run_script(env, body, "")["run_id"]
    sc.wait_run(run_id, "finished")
    assert run_script(env, body, run_id)["run_id"] == run_id
    wait_for(
        lambda: (r := sc.run(run_id)) and r["state"] == "finished" and r["pending"] == 0,
        60,
        what="resumed run finished",
    )
    files = segments(env, run_id)
    assert len(files) == 2
    assert wandb_summary(files[-1])["config"] == {"lr": 2.0, "extra": 3, "phase": "resume"}
    rows, _ = all_history(env.wandb_dir, run_id)
    assert rows == {s: {"loss": 1.0 / s} for s in range(1, 11)}
