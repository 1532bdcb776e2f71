"""Batches against a live sidecar: several seq'd frames in one ZeroMQ part (protocol.py),
each validated, stored and acknowledged as if it had come alone."""

from __future__ import annotations

import os

import msgpack
import pytest
from conftest import wandb_file, wandb_history

from client import protocol

SESSION = "batchbatch000001"


def metrics(seq: int, step: int | None = None, **over) -> bytes:
    body = {"v": 1, "t": "metrics", "session": SESSION, "seq": seq, "step": seq if step is None else step,
            "kind": "train", "time": 0.0, "values": {"loss": 1.0 / seq, "seq": seq}}  # fmt: skip
    return msgpack.packb(body | over)


def batch(seqs) -> bytes:
    return b"".join(metrics(s) for s in seqs)


def hello(sock) -> protocol.Welcome:
    h = protocol.Hello(SESSION, "p", None, None, {}, os.getpid(), "elsewhere")
    sock.send(protocol.encode(h))
    assert sock.poll(10_000), "no welcome"
    welcome = protocol.decode_response(sock.recv())
    assert isinstance(welcome, protocol.Welcome), welcome
    return welcome


def replies_until_ack(sock, seq: int) -> list:
    """Every reply up to and including the ack of ``seq``."""
    got = []
    while True:
        assert sock.poll(10_000), f"no ack of {seq}; got {got}"
        reply = protocol.decode_response(sock.recv())
        got.append(reply)
        if isinstance(reply, protocol.Ack) and reply.seq >= seq:
            return got


def test_a_batch_lands_durable_acked_and_in_wandb(env, sidecar, raw):
    sc = sidecar()
    welcome = hello(raw)
    assert welcome.batch == protocol.DEFAULT_LIMITS.max_batch_bytes  # the sidecar offers batches
    raw.send(batch(range(1, 101)))
    assert [r for r in replies_until_ack(raw, 100) if not isinstance(r, protocol.Ack)] == []
    raw.send(batch(range(101, 201)) + protocol.encode(protocol.Close(SESSION, 201, exit_code=0)))
    replies_until_ack(raw, 201)
    run = sc.wait_run(welcome.run_id, "finished")
    assert run["received"] == 200 and run["refused"] == 0
    assert sc.status()["sidecar"]["rejected"] == {}
    rows = wandb_history(wandb_file(env.wandb_dir, welcome.run_id))
    assert rows == {s: {"loss": 1.0 / s, "seq": s} for s in range(1, 201)}


def test_duplicates_and_gaps_inside_batches(env, sidecar, raw):
    sc = sidecar()
    welcome = hello(raw)
    raw.send(batch(range(1, 11)))
    replies_until_ack(raw, 10)
    raw.send(batch(range(6, 16)))  # 6..10 again: acked, not stored twice
    replies_until_ack(raw, 15)
    raw.send(batch(range(18, 21)))  # 16, 17 lost on the way: one nack for the burst
    assert raw.poll(10_000)
    nack = protocol.decode_response(raw.recv())
    assert nack == protocol.Nack(SESSION, 15)
    raw.send(batch(range(16, 21)))
    replies_until_ack(raw, 20)
    st = sc.status()
    assert st["sidecar"]["duplicates"] == 5
    assert next(r for r in st["runs"] if r["run_id"] == welcome.run_id)["received"] == 20


def test_a_bad_frame_inside_a_batch_is_refused_alone(env, sidecar, raw):
    sc = sidecar()
    welcome = hello(raw)
    bad = metrics(4, values={"loss": "text"})
    raw.send(batch(range(1, 4)) + bad + batch(range(5, 8)))
    got = replies_until_ack(raw, 7)
    errors = [r for r in got if isinstance(r, protocol.Error)]
    assert len(errors) == 1 and errors[0].code == protocol.E_REFUSED and errors[0].seq == 4
    run = sc.run(welcome.run_id)
    assert run["received"] == 6 and run["refused"] == 1
    assert sc.status()["sidecar"]["rejected"] == {"bad_value": 1}


@pytest.mark.parametrize(
    "tail, what",
    [(b"\xc1\xc1\xc1", "not msgpack"), (metrics(4)[:9], "a torn frame"), (msgpack.packb([1, 2]), "not a map")],
)
def test_a_batch_with_garbage_after_its_frames_keeps_them_and_rejects_the_rest_once(env, sidecar, raw, tail, what):
    sc = sidecar()
    welcome = hello(raw)
    raw.send(batch(range(1, 4)) + tail)
    got = replies_until_ack(raw, 3)
    while raw.poll(500):
        got.append(protocol.decode_response(raw.recv()))
    errors = [r for r in got if isinstance(r, protocol.Error)]
    assert len(errors) == 1 and errors[0].fatal is False and what in errors[0].reason, got
    assert sc.status()["sidecar"]["rejected"] == {"malformed": 1}
    raw.send(batch(range(4, 6)))  # and the stream goes on
    replies_until_ack(raw, 5)
    assert sc.run(welcome.run_id)["received"] == 5


def test_an_oversize_batch_is_rejected_once_and_a_hello_never_travels_in_one(env, sidecar, raw):
    sc = sidecar()
    welcome = hello(raw)
    big = [metrics(s, values={f"k{i}": float(i) for i in range(300)}) for s in range(1, 400)]
    part = b"".join(big)
    assert len(part) > welcome.batch
    raw.send(part)
    assert raw.poll(10_000)
    err = protocol.decode_response(raw.recv())
    assert isinstance(err, protocol.Error) and err.reason.startswith("oversize") and not err.fatal
    assert not raw.poll(300)  # one error for the whole part
    assert sc.run(welcome.run_id)["received"] == 0
    # a hello inside a batch: rejected; the frames beside it are taken
    second = protocol.Hello("batchbatch000002", "p", None, None, {}, os.getpid(), "elsewhere")
    raw.send(metrics(1) + protocol.encode(second) + metrics(2))
    got = replies_until_ack(raw, 2)
    while raw.poll(500):
        got.append(protocol.decode_response(raw.recv()))
    errors = [r for r in got if isinstance(r, protocol.Error)]
    assert len(errors) == 1 and "inside a batch" in errors[0].reason
    st = sc.status()
    assert st["sidecar"]["rejected"] == {"oversize": 1, "malformed": 1}
    assert [r["run_id"] for r in st["runs"]] == [welcome.run_id]  # no run for the smuggled hello
    assert st["runs"][0]["received"] == 2
