"""Property-based tests (hypothesis): open-ended input against the client and the validator.

1. Whatever a trainer passes to ``log()``, ``update_config()`` or
   ``update_summary()``, nothing raises, and every frame the client queues is
   one the sidecar's validator accepts: the client never produces a frame the
   sidecar would refuse.
2. Mutated frames of every message type at a live sidecar, while a real
   client logs: the sidecar never exits, its memory stays bounded, and every
   value of the real client lands in wandb's record.
"""

from __future__ import annotations

import decimal
import fractions
import math
import time

import msgpack
import numpy as np
import zmq
from conftest import all_history
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import MetricsClient, protocol

# ---------------------------------------------------------------- 1. log() against the validator

keys = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=600),
    st.integers(),
    st.floats(allow_nan=False),
    st.tuples(st.integers(), st.text(max_size=5)),
    st.binary(max_size=10),
    st.none(),
)
scalars = st.one_of(
    st.integers(),  # any size: beyond 64 bits too
    st.floats(),  # NaN, inf, subnormals
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1).map(lambda i: np.uint64(i) if i >= 0 else np.int64(i)),
    st.floats(width=16).map(np.float16),
    st.floats(width=32).map(np.float32),
    st.decimals(allow_nan=True).map(decimal.Decimal),
    st.fractions().map(fractions.Fraction),
)
junk = st.one_of(
    st.none(), st.text(max_size=20), st.lists(st.floats(), max_size=3), st.complex_numbers(), st.binary(max_size=5)
)
values = st.dictionaries(keys, st.one_of(scalars, junk), max_size=40)
wide = st.integers(min_value=1000, max_value=6000).map(lambda n: {f"w/{i}": float(i) for i in range(n)})
steps = st.one_of(
    st.none(),
    st.integers(),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=3),
    st.integers(min_value=0, max_value=10**6).map(np.int64),
)
configs = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=50)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30,
)


def _accepted(mc: MetricsClient) -> list:
    """The queued frames, decoded as the sidecar does (raises ProtocolError if it would refuse
    one); a metrics frame's seq, which the sender reads in place, must be the one it carries."""
    at = protocol.metrics_seq_offset(mc._session)
    frames = []
    for entry in mc._outbox:
        if type(entry) is bytes:  # log()'s metrics frames wait bare
            frame = protocol.decode_request(entry)
            assert protocol.metrics_seq(entry, at) == frame.seq
        else:
            frame = protocol.decode_request(entry[1])
        frames.append(frame)
    mc._outbox.clear()
    return frames


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(st.tuples(st.one_of(values, wide), steps), min_size=1, max_size=4), cfg=configs)
def test_log_never_raises_and_never_makes_a_frame_the_sidecar_refuses(calls, cfg):
    mc = MetricsClient(address="ipc:///nonexistent/kforge-prop.sock", buffer_size=1_000_000, rank=0)
    mc._transport.stop(5)  # no sender: every frame log() makes stays in the outbox to be checked
    try:
        for metrics, step in calls:
            mc.log(metrics, step=step)
            mc.log_eval(metrics, step=step)
            frames = _accepted(mc)
            for f in frames:
                assert isinstance(f, protocol.Metrics)
                assert all(type(v) in (int, float, bool) for v in f.values.values())
            ok_step = step is None or (
                isinstance(step, (int, np.integer)) and not isinstance(step, bool) and 0 <= step < 2**63
            )
            if ok_step:
                # every scalar under a text key arrives (split frames of one step carry all of them)
                got = {k: v for f in frames if f.kind == "train" for k, v in f.values.items()}
                for k, v in metrics.items():
                    if type(k) is str and 0 < len(k) <= 256 and type(v) in (int, float) and -(2**63) <= v < 2**63:
                        assert got[k] == v or (math.isnan(v) and math.isnan(got[k]))
                assert len({f.step for f in frames}) <= 1
        mc.update_config({"c": cfg, "nested": {"x": cfg}})
        mc.update_summary({"s": cfg})
        for f in _accepted(mc):
            assert isinstance(f, (protocol.ConfigUpdate, protocol.SummaryUpdate))
        assert protocol.decode_request(protocol.encode(mc._make_hello(1))).run_id == mc.run_id
        assert mc.stats().errors == sum(
            2
            for _, s in calls
            if not (s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s < 2**63))
        )
    finally:
        mc.close(timeout=0)


# ---------------------------------------------------------------- 2. fuzzing a live sidecar

SESSION = "f0zzf0zzf0zz0001"
TEMPLATES = {
    "hello": {"t": "hello", "session": SESSION, "project": "fuzz", "name": None, "run_id": None, "config": {},
              "pid": 1, "host": "elsewhere", "first": 1, "wandb": {}, "process": {}},
    "metrics": {"t": "metrics", "session": SESSION, "seq": 1, "step": 1, "kind": "train", "time": 0.0, "values": {"x": 1.0}},
    "config": {"t": "config", "session": SESSION, "seq": 1, "values": {"a": 1}},
    "summary": {"t": "summary", "session": SESSION, "seq": 1, "values": {"a": 1}},
    "close": {"t": "close", "session": SESSION, "seq": 1, "exit_code": 0},
    "ping": {"t": "ping", "session": SESSION},
    "status": {"t": "status"},
    "refused": {"t": "refused", "session": SESSION, "seq": 1, "reason": "x"},
}  # fmt: skip
packable = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(),
        st.text(max_size=40), st.binary(max_size=40), st.sampled_from([SESSION, "hello", "metrics", 2**63, 2**64 - 1, -1, 0]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip


@st.composite
def mutated(draw) -> list[bytes]:
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    body = dict(TEMPLATES[kind], v=1)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "delete", "add"])) if body else "add"
        field = draw(st.sampled_from(sorted(body))) if body else ""
        if op == "set":
            body[field] = draw(packable)
        elif op == "delete":
            body.pop(field, None)
        else:
            body[draw(st.text(max_size=6))] = draw(packable)
    if body.get("t") == "stop":  # a control request a local user may send on purpose
        body["t"] = "status"
    raw = msgpack.packb(body, use_bin_type=True)
    tail = draw(st.sampled_from(["whole", "cut", "flip", "garbage", "parts"]))
    if tail == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif tail == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
    elif tail == "garbage":
        raw = draw(st.binary(max_size=200))
    return [raw, b"extra"] if tail == "parts" else [raw]


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(parts=mutated())
def test_the_receivers_fast_decoder_agrees_with_decode_request(parts):
    """``decode_part`` (the receiver's path for a frame alone) accepts and refuses exactly
    what ``decode_request`` does, with the same error; a metrics frame as its fields."""
    raw = parts[0]

    def outcome(decode):
        try:
            return decode(raw)
        except protocol.ProtocolError as exc:
            return (type(exc).__name__, exc.reason, str(exc))

    full, fast = outcome(protocol.decode_request), outcome(protocol.decode_part)
    if isinstance(full, protocol.Metrics):
        full = tuple(getattr(full, name) for name in protocol._METRICS_FIELDS)  # MetricsFields' order
    assert repr(fast) == repr(full)  # repr: a NaN in a config equals itself


# Metrics frames at the edges of the receiver's msgspec schema (protocol._fast_metrics_decoder),
# written as raw msgpack maps: duplicate keys, binary keys, a bool where an int goes, an int
# where a float goes, NaN, the 64-bit edges, fields beyond the protocol's, and tight limits.
EDGE_LIMITS = protocol.Limits(max_scalars=3, max_key_len=4)


class RawMap(bytes):
    """A msgpack map already encoded (it may hold a key twice, which no dict can)."""


def _pack_map(pairs: list[tuple]) -> RawMap:
    head = bytes([0x80 | len(pairs)]) if len(pairs) < 16 else b"\xde" + len(pairs).to_bytes(2, "big")
    return RawMap(head + b"".join(_pack(k) + _pack(v) for k, v in pairs))


class RawStr(bytes):
    """A msgpack str of any bytes, valid UTF-8 or not."""


def _raw_str(data: bytes) -> RawStr:
    return RawStr(bytes([0xA0 | len(data)]) + data)  # fixstr: under 32 bytes


edge_scalar = st.one_of(
    st.booleans(), st.floats(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.5, float("nan"), float("inf")]),
)  # fmt: skip
odd_scalar = st.one_of(st.none(), st.text(max_size=3), st.binary(max_size=2), st.binary(max_size=3).map(_raw_str))
edge_key = st.one_of(
    st.text(min_size=1, max_size=4), st.text(max_size=6), st.binary(max_size=3), st.just(_raw_str(b"\xff"))
)
edge_values = st.one_of(
    st.dictionaries(st.text(min_size=1, max_size=4), edge_scalar, max_size=5),  # sound but for their number
    st.lists(st.tuples(edge_key, st.one_of(edge_scalar, odd_scalar)), max_size=5).map(_pack_map),
)
EDGES = {
    "t": st.sampled_from(["metrics", "hello", b"metrics", None]),
    "v": st.sampled_from([1, 2, True, 1.0, None]),
    "session": st.sampled_from([SESSION, "unknownsession1", "bad id!", SESSION.encode(), None, 1]),
    "seq": st.sampled_from([1, 0, -1, 2**63 - 1, 2**63, 2**64 - 1, True, 1.0, None]),
    "step": st.sampled_from([None, 0, -1, 2**63 - 1, 2**63, True, 1.0, "1"]),
    "kind": st.sampled_from(["train", "eval", "metrics", "", None, b"train"]),
    "time": st.sampled_from([0, 0.0, 1e300, 2**64 - 1, float("nan"), float("inf"), True, None, "0"]),
    "commit": st.sampled_from([None, True, False, 0, 1, "yes"]),
    "values": edge_values,
}


def _pack(value) -> bytes:
    return value if isinstance(value, (RawMap, RawStr)) else msgpack.packb(value, use_bin_type=True)


@st.composite
def metrics_edges(draw) -> bytes:
    pairs: list[tuple] = [("t", "metrics"), ("v", 1), ("session", SESSION), ("seq", 1), ("step", 1),
                          ("kind", "train"), ("time", 0.0), ("values", draw(edge_values))]  # fmt: skip
    if draw(st.booleans()):
        pairs.append(("commit", draw(EDGES["commit"])))
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["set", "set", "drop", "twice", "extra"]))
        name = draw(st.sampled_from(sorted(EDGES)))
        at = [i for i, (k, _) in enumerate(pairs) if k == name]
        if op == "extra":
            pairs.append((draw(st.one_of(st.text(max_size=6), st.binary(max_size=2), st.just(_raw_str(b"\xc3")))),
                          draw(st.one_of(edge_scalar, odd_scalar))))  # fmt: skip
        elif op == "set" and at:
            pairs[at[0]] = (name, draw(EDGES[name]))
        elif op == "drop" and at:
            pairs.pop(at[0])
        else:
            pairs.append((name, draw(EDGES[name])))
    return bytes(_pack_map(pairs))


@settings(max_examples=1500, deadline=None, derandomize=True, database=None)
@given(raw=metrics_edges())
def test_the_receivers_msgspec_schema_takes_exactly_what_metrics_fields_takes(raw):
    """Where msgspec accepts a frame alone, ``decode_request`` accepts it with the same
    fields; and ``decode_part`` (which tries msgspec first) agrees with ``decode_request``
    on every frame, errors included."""

    def outcome(decode):
        try:
            return decode(raw, EDGE_LIMITS)
        except protocol.ProtocolError as exc:
            return (type(exc).__name__, exc.reason, str(exc))

    full = outcome(protocol.decode_request)  # first: it remembers a sound session id, as a hello would
    if isinstance(full, protocol.Metrics):
        full = tuple(getattr(full, name) for name in protocol._METRICS_FIELDS)
    assert repr(outcome(protocol.decode_part)) == repr(full)
    fast = EDGE_LIMITS.fast_metrics
    assert fast is not None, "msgspec is a dependency of the sidecar"
    try:
        m = fast(raw)
    except Exception:
        return
    if m.session in protocol._SESSIONS_OK and math.isfinite(m.time):
        assert isinstance(full, tuple) and full[0] == m.session and full[1] == m.seq
        assert repr(full[5]) == repr(m.values) and full[2] == m.step and full[3] == m.kind


def test_a_sound_metrics_frame_takes_the_msgspec_path():
    raw = bytes(_pack_map([("t", "metrics"), ("v", 1), ("session", SESSION), ("seq", 7), ("step", None),
                           ("kind", "eval"), ("time", 3), ("values", {"a": 1, "b": 0.5, "c": True})]))  # fmt: skip
    protocol.decode_request(raw, EDGE_LIMITS)
    m = EDGE_LIMITS.fast_metrics(raw)
    assert (m.session, m.seq, m.step, m.kind, m.time, m.values) == (
        SESSION,
        7,
        None,
        "eval",
        3.0,
        {"a": 1, "b": 0.5, "c": True},
    )
    assert protocol.decode_part(raw, EDGE_LIMITS) == (
        SESSION,
        7,
        None,
        "eval",
        3.0,
        {"a": 1, "b": 0.5, "c": True},
        True,
    )


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_fuzzed_frames_never_crash_the_sidecar_and_the_real_client_loses_nothing(env, sidecar):
    sc = sidecar("--max-runs", "6")
    mc = MetricsClient(address=env.address)  # the real trainer, attached first
    mc.log({"loss": 1.0}, step=1)
    assert mc.flush(20)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(env.address)
    rss_start = _rss_kb(sc.proc.pid)
    sent = {"frames": 0, "step": 1}
    deadline = time.monotonic() + 40  # the time bound, whatever hypothesis has left to try

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(batch=st.lists(mutated(), min_size=1, max_size=25))
    def fuzz(batch):
        if time.monotonic() > deadline:
            return
        for parts in batch:
            sock.send_multipart(parts)
            sent["frames"] += 1
        while sock.poll(0):  # replies: read and thrown away, so nothing piles up
            sock.recv()
        sent["step"] += 1
        mc.log({"loss": 1.0 / sent["step"], "step_seen": sent["step"]}, step=sent["step"])  # the real client, meanwhile
        assert sc.proc.poll() is None, f"sidecar exited: {sc.log()[-3000:]}"

    try:
        fuzz()
    finally:
        sock.close()
        ctx.term()
    assert sent["frames"] > 1000
    assert sc.proc.poll() is None
    st_ = sc.status()
    assert st_ is not None, "sidecar no longer answers status"
    assert sum(st_["sidecar"]["rejected"].values()) > 0
    assert st_["sidecar"]["rejected"].get("internal", 0) == 0, sc.log()[-5000:]
    growth_mb = (_rss_kb(sc.proc.pid) - rss_start) / 1024
    assert growth_mb < 64, f"sidecar RSS grew {growth_mb:.0f} MiB"
    last = sent["step"]
    assert mc.close(timeout=60) is True
    sc.wait_run(mc.run_id, "finished", timeout=120)
    rows, _ = all_history(env.wandb_dir, mc.run_id)
    expected = {1: {"loss": 1.0}} | {s: {"loss": 1.0 / s, "step_seen": s} for s in range(2, last + 1)}
    assert rows == expected
