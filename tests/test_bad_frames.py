"""Bad input against a live sidecar: each frame rejected with a reason, counted, nothing lost."""

from __future__ import annotations

from collections import Counter

import msgpack
from conftest import run_trainer, wandb_file, wandb_history
from trainer import train_metrics

from client import protocol

SESSION = "feedfacecafebeef"


def metrics(**over) -> bytes:
    body = {"v": 1, "t": "metrics", "session": SESSION, "seq": 1, "step": 1, "kind": "train",
            "time": 0.0, "values": {"loss": 1.0}}  # fmt: skip
    return msgpack.packb(body | over)


BAD = [
    ([b"\x00\xff garbage \xc1"], "malformed"),
    ([msgpack.packb("a string")], "malformed"),
    ([metrics(v=99)], "version"),
    ([metrics(t="exec")], "unknown_type"),
    ([metrics(step="one")], "bad_field"),
    ([metrics(kind="debug")], "bad_field"),
    ([metrics(values={"loss": "nan"})], "bad_value"),
    ([metrics(values={"loss": {"nested": 1}})], "bad_value"),
    ([metrics(values={b"loss": 1.0})], "bad_value"),  # a binary metric name: wandb.log raises on it
    ([metrics(values={f"k{i}": 0.0 for i in range(1500)})], "too_many"),
    ([metrics(values={"loss": 1.0, "pad": "x" * 100_000})], "oversize"),
    ([metrics(), b"extra part"], "malformed"),
]


def test_bad_frames_are_rejected_counted_and_the_sidecar_keeps_serving(env, sidecar, raw):
    sc = sidecar()
    sock = raw
    for parts, reason in BAD:
        sock.send_multipart(parts)
        assert sock.poll(10_000), f"no reply to a {reason} frame"
        reply = protocol.decode_response(sock.recv())
        assert isinstance(reply, protocol.Error), reply
        assert reply.reason.startswith(reason), (reason, reply.reason)
        # only a version mismatch tells the client to give up
        assert reply.fatal is (reason == "version")
    # metrics from a session that never said hello: refused, not stored
    sock.send(metrics())
    assert sock.poll(10_000)
    reply = protocol.decode_response(sock.recv())
    assert isinstance(reply, protocol.Error) and reply.reason.startswith("unknown session")

    status = sc.status()
    assert status["sidecar"]["rejected"] == dict(Counter(reason for _, reason in BAD))
    assert status["runs"] == []
    assert "rejected frame" in sc.log()

    # the same sidecar still takes a real client's frames, all of them
    out = run_trainer(env, "--steps", "40")
    sc.wait_run(out["run_id"], "finished")
    assert wandb_history(wandb_file(env.wandb_dir, out["run_id"])) == {s: train_metrics(s) for s in range(1, 41)}


def test_client_of_another_protocol_version_is_told_clearly(env, sidecar, raw):
    """A future client speaking v2 gets a fatal error it can read, and the sidecar lives on."""
    sc = sidecar()
    sock = raw
    hello = {"v": 2, "t": "hello", "session": SESSION, "project": "p", "pid": 1, "host": "h", "first": 1}
    sock.send(msgpack.packb(hello))
    assert sock.poll(10_000)
    reply = msgpack.unpackb(sock.recv())
    assert reply["t"] == "error" and reply["fatal"] is True
    assert "protocol version 2" in reply["reason"]
    assert sc.status()["sidecar"]["rejected"] == {"version": 1}


def test_a_rejected_hello_is_fatal_so_the_client_does_not_repeat_it_forever(env, sidecar, raw):
    sc = sidecar()
    sock = raw
    hello = {"v": 1, "t": "hello", "session": SESSION, "project": "p", "name": None, "run_id": None,
             "config": {"lr": float("nan")}, "pid": 1, "host": "h", "first": 1}  # fmt: skip
    sock.send(msgpack.packb(hello))
    assert sock.poll(10_000)
    reply = protocol.decode_response(sock.recv())
    assert isinstance(reply, protocol.Error) and reply.fatal is True
    assert "non-finite" in reply.reason
    assert sc.status()["sidecar"]["rejected"] == {"bad_field": 1}


def test_a_binary_metric_name_is_refused_alone_and_the_run_goes_on_to_wandb(env, sidecar, raw):
    """msgpack has binary map keys too. One stored frame with one once wedged the run:
    wandb.log raised on it in the uploader, which crashed, restarted at that frame and
    crashed again, so no later step ever reached wandb."""
    import os

    sc = sidecar()
    raw.send(protocol.encode(protocol.Hello(SESSION, "p", None, None, {}, os.getpid(), "elsewhere")))
    assert raw.poll(10_000)
    welcome = protocol.decode_response(raw.recv())
    assert isinstance(welcome, protocol.Welcome), welcome
    for seq, values in ((1, {"loss": 1.0}), (2, {b"loss": 2.0, "lr": 0.1}), (3, {"loss": 3.0})):
        raw.send(metrics(seq=seq, step=seq, values=values))
    raw.send(protocol.encode(protocol.Close(SESSION, 4, exit_code=0)))
    got = []
    while not any(isinstance(r, protocol.Ack) and r.seq == 4 for r in got):
        assert raw.poll(10_000), f"no ack of the close; got {got}"
        got.append(protocol.decode_response(raw.recv()))
    errors = [r for r in got if isinstance(r, protocol.Error)]
    assert len(errors) == 1 and errors[0].code == protocol.E_REFUSED and errors[0].seq == 2, got
    run = sc.wait_run(welcome.run_id, "finished")
    assert run["received"] == 2 and run["refused"] == 1
    assert sc.status()["sidecar"]["rejected"] == {"bad_value": 1}
    assert wandb_history(wandb_file(env.wandb_dir, welcome.run_id)) == {1: {"loss": 1.0}, 3: {"loss": 3.0}}
