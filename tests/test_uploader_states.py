"""The uploader's state changes (sidecar/consumer.py), with a stand-in for wandb."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from client import protocol
from client.protocol import Close, Hello, Metrics
from sidecar.config import UploaderConfig
from sidecar.consumer import Uploader
from sidecar.exits import EXIT_DONE, EXIT_RETRY
from sidecar.spool import RunMeta, Spool, UploaderState, UploadState
from sidecar.wandb_errors import Permanent, Transient

S = "session-a"


class FakeSession:
    """WandbSession's surface: ``start`` does what ``init`` says; ``finish`` what ``finish`` says."""

    init = "ok"
    finish_with = "ok"
    sessions: list[FakeSession] = []

    def __init__(self, cfg: UploaderConfig, meta: RunMeta):
        self.run = None
        self.offline = True
        self.txlog = None
        self.logged: list[tuple[dict, int]] = []
        self.finished: list[int] = []
        self.rewinds: list[int | None] = []
        FakeSession.sessions.append(self)

    @property
    def active(self) -> bool:
        return self.run is not None

    wandb_dir = "/nowhere/wandb"

    def start(self, state: UploaderState, trainer: Hello | None, rewind_to: int | None) -> None:
        self.rewinds.append(rewind_to)
        if self.init == "permanent":
            raise Permanent("WandB init failed: AuthenticationError: 401 not logged in")
        if self.init == "transient":
            raise Transient("WandB init failed: CommError: 503")
        self.run = object()

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))

    def update_config(self, values: dict) -> None:
        pass

    def update_summary(self, values: dict) -> None:
        pass

    def written_step(self) -> int | None:
        return None

    def finish(self, exit_code: int) -> None:
        if self.finish_with == "transient":
            raise Transient("wandb finish failed: TimeoutError")
        self.finished.append(exit_code)
        self.run = None


@pytest.fixture(autouse=True)
def _reset():
    FakeSession.init, FakeSession.finish_with, FakeSession.sessions = "ok", "ok", []


def _run(tmp_path: Path, *msgs) -> Path:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    rs = spool.create_run(RunMeta(run_id="r1", project="p", name=None, config={}, host="h"))
    rs.log.open_for_append()
    for m in msgs:
        rs.log.append(m if isinstance(m, bytes) else protocol.encode(m))
    rs.log.close()
    return rs.dir


def _first_end(run_dir: Path) -> int:
    """Where the first record (the hello: nothing for wandb) ends."""
    return next(Spool(run_dir.parent.parent).run(run_dir.name).log.records()).end


def _hello():
    return Hello(session=S, project="p", name=None, run_id="r1", config={}, pid=os.getpid(), host="h")


def _metrics(seq: int, step: int):
    return Metrics(session=S, seq=seq, step=step, kind="train", time=0.0, values={"x": float(step)})


def _upload(run_dir: Path, sync: bool = False) -> tuple[int, UploaderState]:
    cfg = UploaderConfig(run_dir=run_dir, init_timeout=5, finish_timeout=5, flush_interval=1, drain_timeout=5,
                         log_level="INFO", system_metrics=False, sync=sync, poll_interval=0.01)  # fmt: skip
    code = Uploader(cfg, session=FakeSession).serve()
    return code, Uploader(cfg).spool.read_uploader()


def test_a_closed_run_goes_live_then_finished_and_the_cursor_reaches_the_end(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0), _metrics(2, 1), _metrics(3, 2), Close(S, 4, exit_code=0))
    code, st = _upload(run_dir)
    assert code == EXIT_DONE and st.state == UploadState.FINISHED
    (s,) = FakeSession.sessions
    assert [step for _v, step in s.logged] == [0, 1, 2] and s.finished == [0]
    assert (st.uploaded, st.trusted, st.last_step, st.error) == (3, 3, 2, None)
    assert st.offset == (run_dir / "frames.log").stat().st_size
    hb = Spool(tmp_path / "spool").run("r1").read_heartbeat()
    assert hb.pid == os.getpid() and hb.busy_until is None and hb.at > 0


def test_a_record_no_receiver_should_have_stored_is_skipped_not_handed_to_wandb(tmp_path, caplog):
    """A metrics record with a binary metric name, as a receiver before the check stored
    it: wandb.log raises on such a key, and the uploader crashed and restarted at that
    record forever. The drain validates it in full, logs it and goes on."""
    import msgpack

    poison = msgpack.packb({"v": 1, "t": "metrics", "session": S, "seq": 2, "step": 1, "kind": "train",
                            "time": 0.0, "values": {b"x": 1.0}}, use_bin_type=True)  # fmt: skip
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0), poison, _metrics(3, 2), Close(S, 4, exit_code=0))
    code, st = _upload(run_dir)
    assert code == EXIT_DONE and st.state == UploadState.FINISHED
    (s,) = FakeSession.sessions
    assert s.logged == [({"x": 0.0}, 0), ({"x": 2.0}, 2)] and s.finished == [0]
    assert "unreadable spool record" in caplog.text and "not text" in caplog.text


def test_a_permanent_init_failure_is_the_sentinel_and_only_sync_retries_it(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0), Close(S, 2))
    FakeSession.init = "permanent"
    code, st = _upload(run_dir)
    assert code == EXIT_DONE and st.state == UploadState.FAILED and "401" in st.error
    assert (st.offset, st.trusted) == (_first_end(run_dir), 0)  # past the hello only: the frames stay
    FakeSession.init = "ok"
    code, st = _upload(run_dir)  # a restarted uploader leaves a failed run alone
    assert code == EXIT_DONE and st.state == UploadState.FAILED and len(FakeSession.sessions) == 1
    code, st = _upload(run_dir, sync=True)  # kforge-sidecar sync retries it
    assert code == EXIT_DONE and st.state == UploadState.FINISHED and st.uploaded == 1


def test_a_transient_init_failure_is_retrying(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0))
    FakeSession.init = "transient"
    code, st = _upload(run_dir)
    assert code == EXIT_RETRY and st.state == UploadState.RETRYING and "503" in st.error
    FakeSession.init = "ok"
    code, st = _upload(run_dir, sync=True)  # the next uploader starts from waiting, and drains
    assert code == EXIT_DONE and st.state == UploadState.WAITING and st.error is None
    assert st.trusted == 1


def test_a_failed_finish_keeps_the_cursor_before_what_wandb_did_not_confirm(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0), _metrics(2, 1), Close(S, 3))
    FakeSession.finish_with = "transient"
    code, st = _upload(run_dir)
    assert code == EXIT_RETRY and st.state == UploadState.RETRYING
    assert (st.trusted, st.offset) == (0, _first_end(run_dir))  # nothing wandb did not confirm


def test_a_drain_finishes_the_segment_and_waits(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0), _metrics(2, 1))
    code, st = _upload(run_dir, sync=True)
    assert code == EXIT_DONE and st.state == UploadState.WAITING
    assert FakeSession.sessions[0].finished == [0] and st.trusted == 2


def test_a_finished_run_that_a_resumed_trainer_reopened_starts_again_from_waiting(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0), Close(S, 2, exit_code=0))
    code, st = _upload(run_dir)
    assert st.state == UploadState.FINISHED
    rs = Spool(tmp_path / "spool").run("r1")
    rs.log.open_for_append()
    resumed = "session-b"
    rs.log.append(
        protocol.encode(Hello(session=resumed, project="p", name=None, run_id="r1", config={}, pid=1, host="h"))
    )
    rs.log.append(protocol.encode(Metrics(session=resumed, seq=1, step=1, kind="train", time=0.0, values={"x": 1.0})))
    rs.log.append(protocol.encode(Close(resumed, 2, exit_code=0)))
    rs.log.close()
    code, st = _upload(run_dir)
    assert code == EXIT_DONE and st.state == UploadState.FINISHED and st.uploaded == 2
    assert [step for _v, step in FakeSession.sessions[-1].logged] == [1]


def test_an_unreadable_record_is_skipped_not_a_crash(tmp_path):
    run_dir = _run(tmp_path, _hello(), _metrics(1, 0))
    rs = Spool(tmp_path / "spool").run("r1")
    rs.log.open_for_append()
    rs.log.append(b"\x93garbage")  # CRC-sound, but no message (never written by a receiver)
    for m in (_metrics(2, 1), Close(S, 3)):
        rs.log.append(protocol.encode(m))
    rs.log.close()
    code, st = _upload(run_dir)
    assert code == EXIT_DONE and st.state == UploadState.FINISHED
    assert [step for _v, step in FakeSession.sessions[0].logged] == [0, 1]
    assert st.offset == (run_dir / "frames.log").stat().st_size and st.trusted == 2


def test_a_drain_that_begins_during_init_still_hands_wandb_everything_stored_before_it(tmp_path):
    """Records are read ahead of wandb, the first block before wandb.init. A trainer that got
    SIGTERM meanwhile stores its last frames and its close, and the sidecar drains: the
    uploader must read on to that close before it finishes, not stop after the block it had."""
    run_dir = _run(tmp_path, _hello(), _metrics(1, 1), _metrics(2, 2), _metrics(3, 3))
    cfg = UploaderConfig(run_dir=run_dir, init_timeout=5, finish_timeout=5, flush_interval=1, drain_timeout=5,
                         log_level="INFO", system_metrics=False, sync=False, poll_interval=0.01)  # fmt: skip
    up = Uploader(cfg, session=FakeSession)

    class DrainDuringInit(FakeSession):
        def start(self, state, trainer, rewind_to):
            super().start(state, trainer, rewind_to)
            log = Spool(run_dir.parent.parent).run(run_dir.name).log
            log.open_for_append()
            for seq in range(4, 11):
                log.append(protocol.encode(_metrics(seq, seq)))
            log.append(protocol.encode(Close(S, 11, exit_code=143)))
            log.sync()
            log.close()
            up.draining, up._stop_at = True, time.monotonic()  # what the SIGTERM handler sets (without its alarm)

    up._new_session = DrainDuringInit
    assert up.serve() == EXIT_DONE
    session = FakeSession.sessions[0]
    assert [step for _, step in session.logged] == list(range(1, 11))
    assert session.finished == [143]
    st = up.spool.read_uploader()
    assert st.state == UploadState.FINISHED and st.trusted == 10


def test_an_uploader_whose_sidecar_died_before_it_started_drains_and_exits(tmp_path):
    """The sidecar is SIGKILLed while its new uploader is still importing: no death signal
    comes (it was asked for too late), and getppid() already names the adopter. The
    uploader still drains what is spooled and exits, instead of holding the run's lock
    (and a wandb-core) forever, which kept the next sidecar's uploader out."""
    import subprocess
    import threading

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is nobody's parent now
    run_dir = _run(tmp_path, _hello(), _metrics(1, 1), _metrics(2, 2))
    cfg = UploaderConfig(run_dir=run_dir, init_timeout=5, finish_timeout=5, flush_interval=1, drain_timeout=5,
                         log_level="INFO", system_metrics=False, poll_interval=0.01, parent_pid=gone.pid)  # fmt: skip
    up = Uploader(cfg, session=FakeSession)
    result: list[int] = []
    serving = threading.Thread(target=lambda: result.append(up.serve()), daemon=True)
    serving.start()
    serving.join(20)
    assert result == [EXIT_DONE], "the uploader kept waiting for frames from a sidecar that is gone"
    session = FakeSession.sessions[0]
    assert [step for _, step in session.logged] == [1, 2]
    assert len(session.finished) == 1  # the wandb run was finished, not left open
    st = up.spool.read_uploader()
    assert st.trusted == 2 and st.state == UploadState.WAITING  # a later trainer may resume the run
