"""The wire protocol: every validation rule, both directions."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client import protocol
from client.protocol import Close, Hello, Limits, Metrics, ProtocolError, decode_request

SESSION = "0123456789abcdef"


def frame(**fields) -> bytes:
    body = {"v": protocol.PROTOCOL_VERSION, "t": "metrics", "session": SESSION, "seq": 1,
            "step": 3, "kind": "train", "time": 1.5, "values": {"loss": 2.0}}  # fmt: skip
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...})


def test_round_trips():
    hello = Hello(SESSION, "proj", "name", None, {"a": [1, 2.5, {"b": None}]}, 42, "host", first=7)
    assert decode_request(protocol.encode(hello)) == hello
    m = Metrics(SESSION, 5, 10, "eval", 123.25, {"x": 1, "y": 2.5, "ok": True, "nan": float("inf")})
    assert decode_request(protocol.encode(m)) == m
    assert decode_request(protocol.encode_metrics(SESSION, 5, 10, "eval", 123.25, m.values)) == m
    c = Close(SESSION, 9, exit_code=3)
    assert decode_request(protocol.encode(c)) == c
    assert decode_request(protocol.encode(protocol.Control("status"))) == protocol.Control("status")
    for reply in (
        protocol.Welcome(SESSION, "abc", 4),
        protocol.Ack(SESSION, 9),
        protocol.Nack(SESSION, 2),
        protocol.Error(None, "nope", fatal=True),
        protocol.Reply({"k": [1]}),
    ):
        assert protocol.decode_response(protocol.encode(reply)) == reply


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xc1garbage", "malformed"),
        (b"", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({"t": "metrics"}), "malformed"),
        (frame(v=2), "version"),
        (frame(v="1"), "malformed"),
        (frame(t="launch_missiles"), "unknown_type"),
        (frame(seq=0), "bad_field"),
        (frame(seq="1"), "bad_field"),
        (frame(seq=True), "bad_field"),
        (frame(step=-1), "bad_field"),
        (frame(step=1.5), "bad_field"),
        (frame(kind="test"), "bad_field"),
        (frame(session="short"), "bad_field"),
        (frame(session="../../etc/passwd"), "bad_field"),
        (frame(time="now"), "bad_field"),
        (frame(values=[1.0]), "bad_value"),
        (frame(values={"loss": "low"}), "bad_value"),
        (frame(values={"loss": None}), "bad_value"),
        (frame(values={"loss": [1.0]}), "bad_value"),
        (frame(values={"": 1.0}), "bad_value"),
        (frame(values={"k" * 300: 1.0}), "bad_value"),
        (frame(values={f"k{i}": 1.0 for i in range(2000)}), "too_many"),
        (frame(values={"x": b"\x00" * 70_000}), "oversize"),
        (msgpack.packb({1: 2}), "malformed"),
    ],
)
def test_rejects(raw, reason):
    with pytest.raises(ProtocolError) as e:
        decode_request(raw)
    assert e.value.reason == reason


def test_hello_rules():
    ok = {"v": 1, "t": "hello", "session": SESSION, "project": "p", "name": None, "run_id": None,
          "config": {}, "pid": 1, "host": "h", "first": 1}  # fmt: skip
    assert isinstance(decode_request(msgpack.packb(ok)), Hello)
    for bad in ({"run_id": "../x"}, {"run_id": "a" * 65}, {"config": [1]}, {"config": {"x": float("nan")}},
                {"pid": "1"}, {"first": 0}, {"project": "p" * 5000}):  # fmt: skip
        with pytest.raises(ProtocolError) as e:
            decode_request(msgpack.packb(ok | bad))
        assert e.value.reason == "bad_field", bad
    # a hello may carry a large config, up to its own limit
    big = ok | {"config": {"blob": "x" * 200_000}}
    assert isinstance(decode_request(msgpack.packb(big)), Hello)
    with pytest.raises(ProtocolError) as e:
        decode_request(msgpack.packb(big), Limits(max_hello_bytes=100_000))
    assert e.value.reason == "oversize"


def test_known_keys_do_not_pass_a_stricter_limit():
    """Keys that passed once are remembered (metrics_fields' key cache) per max_key_len:
    a key good under one limit is still refused under a stricter one, and a new key is
    still checked in full."""
    frame = protocol.encode_metrics("sess0001", 1, 0, "train", 1.0, {"k" * 10: 1.0, "a": 2})
    assert decode_request(frame, Limits(max_key_len=10)).values == {"k" * 10: 1.0, "a": 2}
    with pytest.raises(ProtocolError) as err:
        decode_request(frame, Limits(max_key_len=9))
    assert err.value.reason == "bad_value"
    fresh = protocol.encode_metrics("sess0001", 2, 0, "train", 1.0, {"k" * 10: 1.0, "": 2})
    with pytest.raises(ProtocolError):
        decode_request(fresh, Limits(max_key_len=10))
    fields = protocol.metrics_fields(msgpack.unpackb(frame), len(frame), Limits(max_key_len=10))
    assert fields == ("sess0001", 1, 0, "train", 1.0, {"k" * 10: 1.0, "a": 2}, True)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    session=st.from_regex(protocol.SESSION_RE, fullmatch=True),
    seq=st.one_of(st.integers(1, 300), st.integers(1, protocol.INT64_MAX)),
    step=st.one_of(st.none(), st.integers(0, protocol.INT64_MAX)),
    commit=st.booleans(),
)
def test_the_sender_reads_a_metrics_frames_seq_in_place(session, seq, step, commit):
    """log() queues metrics frames bare; the sender reads each one's seq at a fixed offset.
    Every integer width msgpack picks (fixint, uint8 .. uint64) must read back exactly."""
    frame = protocol.encode_metrics(session, seq, step, "train", 1.5, {"loss": 1.0}, commit)
    assert protocol.metrics_seq(frame, protocol.metrics_seq_offset(session)) == seq
    assert decode_request(frame).seq == seq


def test_the_uploader_loads_no_sender():
    """An uploader starts per run (and after every retry): it reads the wire format
    (client.protocol) and must not pay for the trainer's sender and pyzmq to do so."""
    import subprocess
    import sys

    code = (
        "import sys, sidecar.uploader, client; "
        "print(sorted(m for m in ('zmq', 'client.transport', 'client.metrics_client') if m in sys.modules)); "
        "from client import MetricsClient; print(MetricsClient.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "client.metrics_client"], out


def test_a_msgspec_that_takes_what_it_should_not_is_not_used(monkeypatch):
    """The receiver stores what the msgspec schema takes. A msgspec whose checks fail (0.18.0
    let an empty metric name through) is caught when the decoder is built: the Python path,
    which checks everything, is used instead."""
    import sys
    import types

    class Meta:
        def __init__(self, **_):
            pass

    class Decoder:  # decodes anything, checks nothing
        def __init__(self, _type):
            pass

        def decode(self, raw):
            return types.SimpleNamespace(**msgpack.unpackb(raw))

    lax = types.ModuleType("msgspec")
    lax.Meta = Meta
    lax.defstruct = lambda *a, **k: object
    lax.msgpack = types.SimpleNamespace(Decoder=Decoder)
    monkeypatch.setitem(sys.modules, "msgspec", lax)
    assert protocol._fast_metrics_decoder(protocol.Limits()) is None
    monkeypatch.undo()
    assert protocol._fast_metrics_decoder(protocol.Limits()) is not None  # the installed one passes
