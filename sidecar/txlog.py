"""wandb-core's transaction log (run-<id>.wandb), read back: how far wandb has really written.

Offline, the uploader trusts a frame (moves its cursor past it) only once its step
is in this file; see consumer.py.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path


class TransactionLog:
    """Reads back wandb-core's run-<id>.wandb, incrementally: the highest history step in it.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1,
    version 0), then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, u16 length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) around a
    protobuf ``Record``; a block's tail shorter than a header is padding.
    Reading stops at an incomplete chunk, the part wandb-core has not flushed.
    """

    BLOCK = 32 * 1024
    HEAD = struct.Struct("<IHB")

    def __init__(self, path: Path):
        self.path = path
        self._pos = 7  # after the file header
        self._step: int | None = None

    def last_step(self) -> int | None:
        from wandb.proto import wandb_internal_pb2 as pb

        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return self._step
        with f:
            f.seek(self._pos)
            pos, parts = self._pos, []
            while True:
                left = self.BLOCK - pos % self.BLOCK
                if left < self.HEAD.size:
                    f.seek(left, os.SEEK_CUR)
                    pos += left
                    continue
                head = f.read(self.HEAD.size)
                if len(head) < self.HEAD.size:
                    break
                _, length, kind = self.HEAD.unpack(head)
                data = f.read(length)
                if len(data) < length or kind == 0:
                    break  # not flushed yet (or zero fill)
                pos += self.HEAD.size + length
                parts.append(data)
                if kind in (1, 4):  # FULL or LAST: a whole record
                    rec = pb.Record.FromString(b"".join(parts))
                    parts = []
                    self._pos = pos
                    if rec.HasField("history"):
                        self._step = rec.history.step.num
        return self._step
