"""MetricsClient's contract: never blocks, never raises, bounded, inert where it must be."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import wait_for

from client import MetricsClient, protocol


@pytest.fixture
def nowhere(env):
    """An address where no sidecar will ever listen."""
    return env.address


def test_no_sidecar_log_never_raises_and_close_is_bounded(nowhere):
    mc = MetricsClient(address=nowhere, buffer_size=1000)
    for step in range(5000):
        mc.log({"loss": 1.0 / (step + 1)}, step=step)
    s = wait_for(lambda: (s := mc.stats()).dropped == 4000 and s, 10, what="oldest frames dropped")
    assert s.logged == 5000 and s.buffered == 1000 and s.acked == 0
    # the run ID is real from the start, sidecar or not (minted in the client)
    assert mc.run_id is not None and protocol.RUN_ID_RE.match(mc.run_id) and mc.wait_run_id(0) == mc.run_id
    assert mc.close(timeout=0.5) is False  # returns within its timeout, says it did not get out
    mc.log({"loss": 1.0}, step=1)  # after close: a no-op, not an error


def test_value_coercion_and_dropping(nowhere, caplog):
    mc = MetricsClient(address=nowhere, rank=0)
    with caplog.at_level(logging.WARNING, logger="kforge_sidecar.client"):
        for step in range(3):
            mc.log(
                {
                    "py": 1.5, "int": 3, "bool": True,
                    "np64": np.float64(0.25), "np32": np.float32(0.5), "npint": np.int64(7),
                    "np0d": np.array(2.5), "t0d": torch.tensor(0.125), "tint": torch.tensor(4),
                    "vector": torch.ones(3), "array": np.zeros(2), "text": "hi", "none": None,
                },
                step=np.int64(step),
            )  # fmt: skip
    assert mc._outbox, "frames were queued"
    raw = mc._outbox[0]  # a metrics frame waits bare: the sender reads its seq in place
    frame = protocol.decode_request(raw)  # what the sidecar will see
    seq = protocol.metrics_seq(raw, protocol.metrics_seq_offset(mc._session))
    assert (seq, frame.seq, frame.kind, frame.step) == (1, 1, "train", 0)
    values = frame.values
    assert values == {"py": 1.5, "int": 3, "bool": True, "np64": 0.25, "np32": 0.5, "npint": 7,
                      "np0d": 2.5, "t0d": 0.125, "tint": 4}  # fmt: skip
    assert all(type(v) in (int, float, bool) for v in values.values())
    dropped = [r.getMessage() for r in caplog.records if "warned once per key" in r.getMessage()]
    assert len(dropped) == 4, dropped  # one warning per key, not per call
    assert mc.stats().dropped_values == 12
    mc.log({"huge": 2**70, "ok": 1.0}, step=5)  # beyond 64 bits: the float wandb itself stores
    assert protocol.decode_request(mc._outbox[-1]).values == {"huge": float(2**70), "ok": 1.0}
    mc.close(timeout=0.2)


def test_bad_calls_are_swallowed_and_counted(nowhere, caplog):
    mc = MetricsClient(address=nowhere)
    with caplog.at_level(logging.WARNING, logger="kforge_sidecar.client"):
        mc.log(None, step=1)  # type: ignore[arg-type]
        mc.log({"x": 1.0}, step="ten")  # type: ignore[arg-type]
        mc.log({"x": 1.0}, step=-1)
    assert mc.stats().errors == 3
    assert sum("log() failed" in r.getMessage() for r in caplog.records) == 1  # said once
    mc.close(timeout=0.2)


def test_non_zero_rank_is_inert(nowhere, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    mc = MetricsClient(address=nowhere)
    assert mc.inert
    mc.log({"loss": 1.0}, step=1)
    assert mc.stats().logged == 0
    assert mc.close(timeout=0.1) is True
    assert MetricsClient(address=nowhere, rank=0).inert is False


def test_given_run_id_is_known_at_once_and_checked(nowhere):
    mc = MetricsClient(address=nowhere, run_id="abc123")
    assert mc.run_id == "abc123" and mc.wait_run_id(0) == "abc123"
    mc.close(timeout=0.1)
    with pytest.raises(ValueError):
        MetricsClient(address=nowhere, run_id="../../etc")


def test_client_imports_nothing_heavy():
    code = (
        "import sys, json; from client import MetricsClient; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'wandb', 'typer', 'torch', 'numpy', 'sidecar', 'click', 'rich', 'msgspec'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_interpreter_exit_is_not_held_by_an_unclosed_client(env):
    code = (
        f"from client import MetricsClient; mc = MetricsClient(address={env.address!r}); "
        "[mc.log({'x': float(i)}, step=i) for i in range(100)]"
    )
    # no sidecar, never closed: the process must still exit promptly by itself
    subprocess.run([sys.executable, "-c", code], timeout=30, check=True)


def test_live_sidecar_flush_and_stats(env, sidecar, monkeypatch):
    sidecar()
    mc = MetricsClient(address=env.address, name="inproc")
    run_id = mc.wait_run_id(10)
    assert run_id
    for step in range(1, 101):
        mc.log({"loss": float(step)}, step=step)
    assert mc.flush(10)
    s = mc.stats()
    assert (s.logged, s.sent, s.acked, s.buffered, s.dropped) == (100, 100, 100, 0, 0)
    assert mc.close(10)


def test_config_of_any_shape_is_made_json_shaped(nowhere):
    """KempnerForge's JobConfig holds dataclasses, enums, torch dtypes and tuples: the
    hello must still be sendable (a config msgpack cannot hold used to kill the sender)."""
    import dataclasses
    import enum

    class Mode(enum.Enum):
        FSDP = "fsdp"

    @dataclasses.dataclass
    class Model:
        dim: int = 256
        dtype: object = torch.bfloat16
        shape: tuple = (2, 3)

    mc = MetricsClient(address=nowhere, config={"model": Model(), "mode": Mode.FSDP, "lr": float("nan")})
    assert mc._config == {
        "model": {"dim": 256, "dtype": "torch.bfloat16", "shape": [2, 3]},
        "mode": "fsdp",
        "lr": "nan",
    }
    assert protocol.decode_request(protocol.encode(mc._make_hello(1))).config == mc._config
    mc.close(timeout=0.1)
