"""Device scalars without host synchronisation (client/device.py).

The CPU tests always run: they drive CPU tensors through the staged path
(``device.STAGE_CPU``), the same code a CUDA tensor takes minus pinned memory
and events, and check dtypes, mixed dicts, tensor steps, order, the bounded
policy and exact values in wandb's record. The GPU test runs wherever CUDA is
available and skips with a reason elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")

from conftest import all_history  # noqa: E402

from client import MetricsClient, device  # noqa: E402


@pytest.fixture
def staged_cpu(monkeypatch):
    monkeypatch.setattr(device, "STAGE_CPU", True)


DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64, torch.bool)


def tensor_values(step: int) -> dict:
    out = {}
    for dt in DTYPES:
        name = str(dt).split(".")[-1]
        if dt == torch.bool:
            out[name] = torch.tensor(step % 2 == 0)
        elif dt.is_floating_point:
            out[name] = torch.tensor(1.0 / (step + 3), dtype=dt)
        else:
            out[name] = torch.tensor(step - 50, dtype=dt)
    out["one_element"] = torch.tensor([step * 0.5])
    return out


def expected_values(step: int) -> dict:
    host = {k: (v.item() if v.dim() == 0 else v[0].item()) for k, v in tensor_values(step).items()}
    return {k: (float(v) if isinstance(v, float) else v) for k, v in host.items()}


def test_staged_tensors_of_every_dtype_and_tensor_steps_land_exactly_in_order(env, sidecar, staged_cpu):
    sc = sidecar()
    mc = MetricsClient(address=env.address)
    for step in range(1, 101):
        values = tensor_values(step) | {"py": float(step), "np_like": step}
        mc.log(values, step=torch.tensor(step) if step % 2 else step)
        if step % 10 == 0:
            mc.log_eval({"eval/acc": torch.tensor(step / 100)}, step=step)
    assert mc.close(timeout=30) is True
    s = mc.stats()
    assert s.device_dropped == 0 and s.dropped_values == 0 and s.errors == 0
    sc.wait_run(mc.run_id, "finished")
    rows, dups = all_history(env.wandb_dir, mc.run_id)
    assert dups == 0
    for step in range(1, 101):
        want = expected_values(step) | {"py": float(step), "np_like": step}
        if step % 10 == 0:
            want["eval/acc"] = float(torch.tensor(step / 100))
        assert rows[step] == want, step


def test_frames_keep_their_order_behind_a_copy_still_in_flight(env, sidecar, staged_cpu, monkeypatch):
    sc = sidecar()
    gate = threading.Event()
    real_ready = device._Part.ready
    monkeypatch.setattr(device._Part, "ready", lambda self: gate.is_set() and real_ready(self))
    mc = MetricsClient(address=env.address)
    mc.log({"x": 1.0}, step=1)
    mc.log({"gpu": torch.tensor(2.0)}, step=2)  # its copy "is not done"
    for step in range(3, 11):
        mc.log({"x": float(step)}, step=step)
    assert mc.flush(1.0) is False  # nothing overtakes the frame in flight
    assert mc.stats().acked <= 1
    gate.set()
    assert mc.close(timeout=20) is True
    sc.wait_run(mc.run_id, "finished")
    rows, _ = all_history(env.wandb_dir, mc.run_id)
    assert rows == {1: {"x": 1.0}, 2: {"gpu": 2.0}} | {s: {"x": float(s)} for s in range(3, 11)}


def test_when_every_slot_is_in_flight_log_does_not_wait_and_counts_the_drop(env, staged_cpu, monkeypatch, caplog):
    monkeypatch.setattr(device, "SLOTS", 4)
    monkeypatch.setattr(device._Part, "ready", lambda self: False)  # the GPU is far behind
    mc = MetricsClient(address=env.address)
    for step in range(1, 11):
        mc.log({"gpu": torch.tensor(float(step)), "cpu": float(step)}, step=step)
    s = mc.stats()
    assert s.logged == 10 and s.device_dropped == 6  # 4 calls staged, the other 6 kept their CPU values
    assert sum("dropping device values" in r.getMessage() for r in caplog.records) == 1
    assert s.buffered == 10
    mc.close(timeout=0.2)


def test_client_import_pulls_in_no_torch():
    code = "import sys, client; from client import device, values; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine: see README)")
def test_cuda_tensors_never_synchronise_the_host_and_every_value_lands(env, sidecar, monkeypatch):
    monkeypatch.setattr(device, "SLOTS", 4096)  # room for every call in flight: nothing may drop here
    sc = sidecar()
    mc = MetricsClient(address=env.address)
    dev = torch.device("cuda")
    a = torch.randn(2048, 2048, device=dev)
    logged: list[tuple[int, dict]] = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 3001):
            for _ in range(2):
                a = torch.tanh(a @ a)  # a long queue of matmuls: the GPU runs far behind the CPU
            values = {
                "loss": a.mean(),
                "bf16": a[0, 0].to(torch.bfloat16),
                "f16": a[0, 1].to(torch.float16),
                "i64": (a[0, 2] * 1000).to(torch.int64),
                "flag": a[0, 3] > 0,
                "cpu": float(step),
            }
            mc.log(values, step=torch.tensor(step, device=dev) if step % 3 == 0 else step)
            logged.append((step, values))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    expected = {
        step: {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()} for step, values in logged
    }
    assert mc.close(timeout=120) is True
    s = mc.stats()
    sc.wait_run(mc.run_id, "finished", timeout=180)
    rows, _ = all_history(env.wandb_dir, mc.run_id)
    assert s.device_dropped == 0 and s.errors == 0
    assert rows == expected  # f32 bit for bit; bf16/f16 as float() gives them
