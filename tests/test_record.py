"""The run record (sidecar/record.py): the one fold over a run's spooled records."""

from __future__ import annotations

from client import protocol
from client.protocol import Close, ConfigUpdate, Hello, Metrics, Refused
from sidecar.record import RunRecord, decode_record, first_pending_time, fold, messages, pending_frames
from sidecar.spool import RunLog, UploaderState, UploadState

A, B = "session-a", "session-b"


def hello(session: str) -> Hello:
    return Hello(session=session, project="p", name=None, run_id="run1", config={}, pid=1, host="h")


def metrics(session: str, seq: int, step: int | None, t: float = 0.0) -> Metrics:
    return Metrics(session=session, seq=seq, step=step, kind="train", time=t, values={"x": 1.0})


def test_metrics_count_and_late_rows_are_counted():
    run = RunRecord()
    for msg in (hello(A), metrics(A, 1, 0), metrics(A, 2, 5), metrics(A, 3, 3), ConfigUpdate(A, 4, {"lr": 1})):
        run.apply(msg)
    assert (run.received, run.late, run.last_step, run.closed) == (3, 1, 5, False)


def test_close_closes_and_a_later_hello_reopens():
    run = RunRecord()
    for msg in (hello(A), metrics(A, 1, 0), Close(A, 2, exit_code=3)):
        run.apply(msg)
    assert run.closed and run.exit_code == 3
    run.apply(hello(B))  # a resumed trainer
    assert not run.closed and run.exit_code is None
    assert run.sessions == {A, B}


def test_refused_records_count():
    run = RunRecord()
    for msg in (hello(A), Refused(A, 1, "bad_value: x"), metrics(A, 2, 0)):
        run.apply(msg)
    assert (run.refused, run.received) == (1, 1)


def test_restore_goes_back_to_the_counts_but_keeps_sessions():
    run = RunRecord()
    run.apply(hello(A))
    run.apply(metrics(A, 1, 0))
    saved = run.counts()
    run.apply(hello(B))
    run.apply(metrics(B, 1, 9))
    run.apply(Close(B, 2, exit_code=1))
    run.restore(saved)
    assert (run.received, run.closed, run.exit_code, run.last_step) == (1, False, None, 0)
    assert run.sessions == {A, B}
    run.apply(metrics(A, 2, 1))  # the restored clock is a copy, and goes on
    assert saved.last_step == 0 and run.last_step == 1


def test_needs_upload_follows_the_uploader_state():
    run = RunRecord(received=2)
    assert run.needs_upload(UploaderState(trusted=1))
    assert not run.needs_upload(UploaderState(trusted=2))
    assert not run.needs_upload(UploaderState(state=UploadState.FAILED, trusted=0))
    run.closed = True
    assert run.needs_upload(UploaderState(trusted=2, state=UploadState.LIVE))
    assert not run.needs_upload(UploaderState(trusted=2, state=UploadState.FINISHED))
    assert not run.needs_upload(UploaderState(trusted=2, state="finished"))  # as read from an old file


def _log(tmp_path, msgs) -> RunLog:
    log = RunLog(tmp_path / "frames.log")
    log.open_for_append()
    for m in msgs:
        log.append(m if isinstance(m, bytes) else protocol.encode(m))
    log.sync()
    log.close()
    return log


def test_fold_over_a_log_and_what_is_pending(tmp_path):
    msgs = [hello(A), metrics(A, 1, 0, t=10.0), metrics(A, 2, 1, t=11.0), metrics(A, 3, 2, t=12.0), Close(A, 4)]
    log = _log(tmp_path, msgs)
    run = fold(log)
    assert (run.received, run.closed, run.exit_code, run.last_step) == (3, True, 0, 2)
    recs = list(log.records())
    assert [type(decode_record(r.payload)) for r in recs] == [type(m) for m in msgs]
    assert pending_frames(log, 0) == 3 and pending_frames(log, recs[2].offset) == 2
    # the cursor after the first frame; one more frame handed to wandb, not yet trusted
    up = UploaderState(offset=recs[2].offset, trusted=1, uploaded=2)
    assert first_pending_time(log, up) == 12.0


def test_a_record_that_does_not_decode_is_skipped_or_raised(tmp_path):
    log = _log(tmp_path, [hello(A), b"\x93garbage", metrics(A, 1, 0)])
    bad = []
    assert fold(log, on_bad=lambda rec, exc: bad.append(rec.offset)).received == 1
    assert len(bad) == 1
    assert [type(m) for _r, m in messages(log)] == [Hello, Metrics]
    try:
        fold(log, on_bad=None)
    except protocol.ProtocolError:
        pass
    else:
        raise AssertionError("on_bad=None raises")


def test_the_trusted_decoder_reads_what_the_full_one_reads():
    from sidecar.record import decode_trusted

    msgs = [
        hello(A),
        metrics(A, 1, 0, t=10.0),
        Metrics(session=A, seq=2, step=None, kind="eval", time=11, values={"x": 1, "y": True}, commit=False),
        ConfigUpdate(A, 3, {"lr": 1}),
        protocol.SummaryUpdate(A, 4, {"best": 0.5}),
        Refused(A, 5, "bad_value: x"),
        Close(A, 6, exit_code=3),
    ]
    for m in msgs:
        raw = protocol.encode(m)
        assert decode_trusted(raw) == decode_record(raw) == m
    raw = protocol.encode_metrics(A, 7, 3, "train", 1.5, {"a": 1.0}, commit=True)
    assert decode_trusted(raw) == decode_record(raw)


def test_the_trusted_decoder_never_passes_garbage_on():
    from sidecar.record import decode_trusted

    good = {"v": 1, "t": "metrics", "session": A, "seq": 1, "step": 0, "kind": "train", "time": 0.0, "values": {}}
    bad = [
        b"\x93garbage",
        b"\xc1",
        protocol.msgpack.packb([1, 2]),
        protocol.msgpack.packb({**good, "v": 2}),
        protocol.msgpack.packb({**good, "seq": "1"}),
        protocol.msgpack.packb({**good, "step": 1.5}),
        protocol.msgpack.packb({**good, "step": True}),
        protocol.msgpack.packb({**good, "time": "now"}),
        protocol.msgpack.packb({**good, "values": [1]}),
        protocol.msgpack.packb({**good, "session": 7}),
        protocol.msgpack.packb({k: v for k, v in good.items() if k != "kind"}),
        protocol.msgpack.packb({**good, "t": "nonsense"}),
    ]
    for raw in bad:
        try:
            decode_trusted(raw)
        except protocol.ProtocolError:
            pass
        else:
            raise AssertionError(f"{raw!r} decoded")
