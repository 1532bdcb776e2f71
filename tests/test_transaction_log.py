"""The uploader's reader of wandb-core's own transaction log (how the cursor knows what wandb kept)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import wandb_history

from sidecar.txlog import TransactionLog

SCRIPT = """
import wandb
run = wandb.init(project="p", id="txlog01", settings=wandb.Settings(console="off", x_disable_stats=True))
for s in range(1, 3001):
    run.log({"loss": 1.0 / s, "pad": "x" * 64}, step=s)
run.finish()
"""


def test_last_step_matches_wandbs_own_reader_and_reads_partial_files(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, timeout=120)
    path = next(tmp_path.glob("wandb/*-txlog01/run-txlog01.wandb"))
    assert path.stat().st_size > 3 * TransactionLog.BLOCK  # records cross block boundaries
    assert TransactionLog(path).last_step() == max(wandb_history(path)) == 3000

    # a file cut anywhere (what wandb-core had flushed so far) gives a step it really holds,
    # and reading on as the file grows gets to the end
    data = path.read_bytes()
    partial = tmp_path / "partial.wandb"
    log = TransactionLog(partial)
    seen = []
    for cut in (7, 1000, 40_000, 70_001, len(data) // 2, len(data) - 3, len(data)):
        partial.write_bytes(data[:cut])
        seen.append(log.last_step())
    steps = [s for s in seen if s is not None]
    assert steps == sorted(steps) and steps[-1] == 3000
    assert seen[0] is None
    shutil.rmtree(tmp_path / "wandb")
