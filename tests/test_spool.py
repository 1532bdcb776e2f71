"""The spool's log: framing, torn tails, permissions."""

from __future__ import annotations

import os
import stat

from sidecar.spool import HEADER, RunLog, RunMeta, Spool, UploaderState


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_append_read_and_permissions(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    run = spool.create_run(RunMeta("r1", "p", None, {"a": 1}, "h"))
    run.log.open_for_append()
    payloads = [f"frame {i}".encode() * (i + 1) for i in range(50)]
    for p in payloads:
        run.log.append(p)
    run.log.sync()
    assert [r.payload for r in run.log.records()] == payloads
    # reading from a record's end continues exactly there
    recs = list(run.log.records())
    assert [r.payload for r in run.log.records(recs[10].end)] == payloads[11:]
    assert mode(spool.root) == mode(spool.runs_dir) == mode(run.dir) == 0o700
    assert mode(run.log.path) == mode(run.meta_path) == 0o600
    run.write_uploader(UploaderState(state="live", offset=recs[3].end, uploaded=4))
    assert mode(run.uploader_path) == 0o600
    assert run.read_uploader().offset == recs[3].end
    assert run.read_meta().config == {"a": 1}
    assert spool.run_ids() == ["r1"]


def _log_with(tmp_path, tail: bytes) -> tuple[RunLog, int]:
    log = RunLog(tmp_path / "frames.log")
    log.open_for_append()
    for i in range(3):
        log.append(b"good %d" % i)
    log.close()
    good = log.size()
    with open(log.path, "ab") as f:
        f.write(tail)
    return log, good


def test_torn_tails_are_cut(tmp_path):
    import zlib

    payload = b"x" * 100
    cases = {
        "half header": HEADER.pack(100, zlib.crc32(payload))[:5],
        "half payload": HEADER.pack(100, zlib.crc32(payload)) + payload[:40],
        "bad crc": HEADER.pack(100, zlib.crc32(payload) ^ 1) + payload,
        "absurd length": HEADER.pack(0xFFFFFFF0, 0) + b"junk",
    }
    for name, tail in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        log, good = _log_with(d, tail)
        # a reader stops quietly before the tail and never yields it
        assert [r.payload for r in log.records()] == [b"good 0", b"good 1", b"good 2"], name
        assert log.repair() == len(tail), name
        assert log.size() == good, name
        # and appending after the repair keeps the log framed
        log.open_for_append()
        log.append(b"after")
        log.close()
        assert [r.payload for r in log.records()][-1] == b"after", name


def test_intact_log_is_not_touched(tmp_path):
    log, good = _log_with(tmp_path, b"")
    assert log.repair() == 0 and log.size() == good


def test_records_are_cut_from_blocks_across_their_edges_and_a_growing_tail(tmp_path, monkeypatch):
    from sidecar import spool as spool_mod

    monkeypatch.setattr(spool_mod, "READ_BLOCK", 64)  # records straddle every block edge; some exceed a block
    log = RunLog(tmp_path / "frames.log")
    log.open_for_append()
    payloads = [bytes([65 + i % 26]) * (i * 7 % 150) for i in range(200)]
    for p in payloads:
        log.append(p)
    log.close()
    recs = list(log.records())
    assert [r.payload for r in recs] == payloads
    assert [r.offset for r in recs[1:]] == [r.end for r in recs[:-1]] and recs[-1].end == log.size()
    assert [r.payload for r in log.records(recs[77].offset)] == payloads[77:]

    # a reader that meets a half-written record stops there, and reads on as the writer goes on
    data = log.path.read_bytes()
    log.path.write_bytes(data[: recs[5].offset + 11])
    assert [r.payload for r in log.records()] == payloads[:5]
    reader = log.records()
    assert [next(reader).payload for _ in range(5)] == payloads[:5]
    with open(log.path, "ab") as f:
        f.write(data[recs[5].offset + 11 :])
    assert [r.payload for r in reader] == payloads[5:]


def test_a_lock_held_elsewhere_is_none_and_a_filesystem_without_flock_is_an_error(tmp_path, monkeypatch):
    """Only EWOULDBLOCK means "another process holds it". A filesystem without flock (an
    NFS or Lustre mount answering ENOLCK) raises: the server says so at start instead of
    naming an owner that does not exist, and the supervisor does not wait forever."""
    import errno

    import pytest

    from sidecar import proc as proc_mod
    from sidecar.server import EXIT_UNSAFE, StartupError, _lock_file
    from sidecar.spool import RunSpool

    run = RunSpool(tmp_path / "run")
    run.dir.mkdir()
    held = run.lock()
    assert held is not None
    try:
        assert run.lock() is None and run.uploader_running()
    finally:
        os.close(held)
    assert not run.uploader_running()

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(proc_mod.fcntl, "flock", no_flock)
    with pytest.raises(OSError) as exc:
        run.lock()
    assert exc.value.errno == errno.ENOLCK
    assert not run.uploader_running()  # cannot tell: the uploader started says why
    with pytest.raises(StartupError) as startup:
        _lock_file(tmp_path / "sidecar.lock", "in use by pid {owner}")
    assert startup.value.code == EXIT_UNSAFE
    assert "cannot lock" in str(startup.value) and "flock" in str(startup.value)
    assert "in use by" not in str(startup.value)
