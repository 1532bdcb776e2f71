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


def _leveldb_log(records: list[bytes]) -> tuple[bytes, list[int]]:
    """wandb-core's framing (txlog.py) around ``records``; and where each record ends."""
    import struct
    import zlib

    block, out, ends = TransactionLog.BLOCK, bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0)), []
    for rec in records:
        first = True
        while True:
            left = block - len(out) % block
            if left < 7:
                out += b"\0" * left  # a block's padding
                continue
            chunk, rec = rec[: left - 7], rec[left - 7 :]
            kind = (1 if not rec else 2) if first else (4 if not rec else 3)
            out += struct.pack("<IHB", zlib.crc32(chunk), len(chunk), kind) + chunk
            first = False
            if not rec:
                break
        ends.append(len(out))
    return bytes(out), ends


def test_last_step_finds_the_newest_history_record_however_the_file_grows(tmp_path):
    import bisect
    import random

    from wandb.proto import wandb_internal_pb2 as pb

    rng = random.Random(7)
    records, newest = [], []  # newest: the step of the newest history record up to each record
    for s in range(2000):
        rec = pb.Record()
        pad = rng.choices([10, 300, 5000, 80_000], weights=[60, 30, 8, 2])[0]  # some span several blocks
        if rng.random() < 0.7:
            rec.history.step.num = s
            rec.history.item.add(key="pad", value_json='"' + "x" * pad + '"')
        else:  # other records: the newest history record may lie blocks back
            rec.summary.update.add(key="pad", value_json='"' + "y" * pad + '"')
        records.append(rec.SerializeToString())
        newest.append(s if rec.HasField("history") else (newest[-1] if newest else None))
    data, ends = _leveldb_log(records)
    path = tmp_path / "grow.wandb"
    for trial in range(4):
        log, cut = TransactionLog(path), 0
        while cut < len(data):
            cut = min(len(data), cut + rng.choice([1, 100, 3000, 40_000, 200_000, 1_000_000]))
            path.write_bytes(data[:cut])
            whole = bisect.bisect_right(ends, cut)  # records wholly in the file
            assert log.last_step() == (newest[whole - 1] if whole else None), (trial, cut)
