"""wandb-core's transaction log (run-<id>.wandb), read back: how far wandb has really written.

Offline, the uploader trusts a frame (moves its cursor past it) only once its step
is in this file; see consumer.py.
"""

from __future__ import annotations

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
    MAX_READ = 64 * 1024 * 1024  # read at most this much per call; the next call goes on

    def __init__(self, path: Path):
        self.path = path
        self._pos = 7  # after the file header; always at a record's first chunk
        self._step: int | None = None

    def last_step(self) -> int | None:
        """Called every heartbeat: reads only what was added since the last call, in one
        read, walks its chunk headers, and decodes records from the newest back only until
        one is a history record (steps only matter as the last one written)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return self._step
        with f:
            f.seek(self._pos)
            data = f.read(self.MAX_READ)
        base, block, head = self._pos, self.BLOCK, self.HEAD
        unpack, hsize, n = head.unpack_from, head.size, len(data)
        i, end, parts = 0, 0, []
        records: list[list[tuple[int, int]]] = []  # each whole record's chunk spans in data
        while True:
            left = block - (base + i) % block
            if left < hsize:
                i += left  # a block's padding
                continue
            if i + hsize > n:
                break
            _, length, kind = unpack(data, i)
            if kind == 0 or i + hsize + length > n:
                break  # not flushed yet (or zero fill)
            parts.append((i + hsize, i + hsize + length))
            i += hsize + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                records.append(parts)
                parts, end = [], i
        if not records:
            return self._step
        self._pos = base + end
        from wandb.proto import wandb_internal_pb2 as pb

        for spans in reversed(records):
            rec = pb.Record.FromString(b"".join(data[a:b] for a, b in spans))
            if rec.HasField("history"):
                self._step = rec.history.step.num
                break
        return self._step
