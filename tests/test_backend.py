"""SidecarBackend, the drop-in for KempnerForge's WandBBackend: lazy, writes the
run ID back for the checkpoint, and a resumed job continues the same run.

Arrival is proven by reading wandb's own record back (offline), never by mocking wandb.
"""

from __future__ import annotations

import os
import threading
import time
import types
from pathlib import Path

from conftest import all_history, finish_trainer, run_files, start_trainer, wait_for, wandb_summary
from trainer import KEYS, eval_metrics, train_metrics

from client.backend import SidecarBackend

# A KempnerForge-like training script: lazy backend, run ID into ckpt_extra, close.
SCRIPT = r"""
import dataclasses, enum, json, sys, types
from client.backend import SidecarBackend
from trainer import eval_metrics, train_metrics

class Mode(enum.Enum):
    FSDP = "fsdp"

@dataclasses.dataclass
class Train:
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    mode: Mode = Mode.FSDP

@dataclasses.dataclass
class Job:
    train: Train = dataclasses.field(default_factory=Train)
    seed: int = 7

start, steps, eval_every = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
restored = sys.argv[4] or None  # ckpt_extra_loaded.get("wandb_run_id")
cfg = types.SimpleNamespace(wandb_project="kf", wandb_run_name="bk", wandb_run_id=restored)
backend = SidecarBackend(cfg, config=Job())
lazy = backend.client is None
raised = None
written_by_log = None
try:
    for step in range(start, start + steps):
        backend.log(train_metrics(step), step=step)
        if step == start:
            # let the sidecar answer; the next log() must write the ID back by itself
            backend.client.wait_run_id(10)
        elif written_by_log is None:
            written_by_log = cfg.wandb_run_id
        if eval_every and step % eval_every == 0:
            backend.log_eval(eval_metrics(step), step=step)
except Exception as exc:
    raised = repr(exc)
ckpt_extra = {}
if cfg.wandb_run_id:  # scripts/train.py
    ckpt_extra["wandb_run_id"] = cfg.wandb_run_id
closed = backend.close(timeout=30)
print(json.dumps({"lazy": lazy, "raised": raised, "written_by_log": written_by_log,
                  "ckpt_extra": ckpt_extra, "run_id": backend.run_id, "closed": closed,
                  "stats": backend.client.stats().__dict__}))
"""


def _run_script(env, script: Path, *args: str, timeout: float = 60) -> dict:
    return finish_trainer(start_trainer(env, *args, script=script), timeout=timeout)


def _expected(steps: range, eval_every: int) -> dict[int, dict]:
    return {s: train_metrics(s) | (eval_metrics(s) if s % eval_every == 0 else {}) for s in steps}


def test_backend_run_id_into_checkpoint_and_resume_continues_the_run(env, sidecar):
    sc = sidecar()
    script = env.base / "kf_train.py"
    script.write_text(SCRIPT)

    first = _run_script(env, script, "1", "50", "10", "")
    assert first["lazy"] is True
    run_id = first["run_id"]
    assert run_id and first["written_by_log"] == run_id  # written back by log(), not only by close()
    assert first["ckpt_extra"] == {"wandb_run_id": run_id}
    assert first["closed"] is True
    assert first["stats"]["logged"] == 50 + 5 and first["stats"]["dropped"] == 0
    sc.wait_run(run_id, "finished")

    # The requeued job: the ID comes back from the checkpoint into config.metrics.wandb_run_id.
    second = _run_script(env, script, "51", "30", "10", first["ckpt_extra"]["wandb_run_id"])
    assert second["run_id"] == run_id and second["ckpt_extra"] == {"wandb_run_id": run_id}
    assert second["closed"] is True

    total = 50 + 5 + 30 + 3
    st = wait_for(
        lambda: (r := sc.run(run_id)) and r["state"] == "finished" and r["uploaded"] == total and r,
        60, interval=0.2, what=f"run {run_id} finished with {total} frames uploaded",
    )  # fmt: skip
    assert st["received"] == total and st["pending"] == 0 and st["last_step"] == 80
    assert len(sc.status()["runs"]) == 1  # one run for the job, across the requeue

    rows, dups = all_history(env.wandb_dir, run_id)
    assert dups == 0
    assert rows == _expected(range(1, 81), 10)
    assert set(KEYS) <= set(rows[51])

    files = run_files(env.wandb_dir, run_id)
    summary = wandb_summary(files[0])
    assert (summary["project"], summary["name"], summary["run_id"]) == ("kf", "bk", run_id)
    assert summary["config"] == {"train": {"lr": 3e-4, "betas": [0.9, 0.95], "mode": "fsdp"}, "seed": 7}
    assert wandb_summary(files[-1])["state"] == "finished"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_backend_is_lazy_and_never_raises_without_a_sidecar(env):
    cfg = types.SimpleNamespace(wandb_project=None, wandb_run_name=None, wandb_run_id=None, sidecar_address=env.address)
    threads, fds = threading.active_count(), _fds()
    backend = SidecarBackend(cfg, config={"lr": 1.0})
    # construction: no client, no thread, no socket, nothing on disk
    assert backend.client is None and backend.run_id is None
    assert threading.active_count() == threads and _fds() == fds
    assert not (env.base / "sock").exists()

    for step in range(1, 201):  # no sidecar is listening: still never raises
        backend.log(train_metrics(step), step=step)
    backend.log_eval(eval_metrics(200), step=200)
    backend.log({"bad": object(), "ok": 1.0}, step=201)  # dropped value, not an exception
    backend.mark_preempting()
    assert backend.client is not None and backend.client.project == "kempnerforge"
    assert backend.client.address == env.address
    # the client mints the run ID at once: it is written back even with no sidecar
    assert cfg.wandb_run_id == backend.client.run_id and cfg.wandb_run_id is not None

    t0 = time.monotonic()
    assert backend.close(timeout=1.0) is False
    assert time.monotonic() - t0 < 1.0 + 3.0  # bounded (generous margin: a hang check, not a benchmark)
    backend.log(train_metrics(1), step=1)  # after close: a no-op
    t0 = time.monotonic()
    assert backend.close() is False  # a second close: the same answer, at once
    assert time.monotonic() - t0 < 1.0


def test_backend_inert_rank_and_bad_inputs_do_not_raise(env, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    cfg = types.SimpleNamespace(wandb_project="kf", wandb_run_name="r3", wandb_run_id=None)
    backend = SidecarBackend(cfg, address=env.address)
    backend.log(train_metrics(1), step=1)
    assert backend.client is not None and backend.client.inert
    t0 = time.monotonic()
    assert backend.close() is True  # inert: no run-ID wait, nothing to send
    assert time.monotonic() - t0 < 1.0
    monkeypatch.delenv("RANK")

    # A restored ID the sidecar could never accept starts a new run rather than disabling logging.
    cfg = types.SimpleNamespace(wandb_project="kf", wandb_run_name="x", wandb_run_id="not a valid id!")
    backend = SidecarBackend(cfg, address=env.address)
    backend.log({"a": 1.0}, step=1)
    assert backend.client is not None and not backend.client.inert
    assert backend.client.run_id not in (None, "not a valid id!")  # a fresh one, minted
    backend.close(timeout=0.2)

    # A config object missing every field, and a config that cannot be written: defaults, no exception.
    backend = SidecarBackend(object(), address=env.address)
    backend.log({"a": 1.0}, step=1)
    assert backend.client.project == "kempnerforge" and backend.client.name is None
    backend.close(timeout=0.2)
