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
        """Called every heartbeat: reads what was added since the last call in one read.
        A block always starts with a chunk, so the newest history record is found by
        walking from one of the last block starts only (any record before it is older);
        the whole new part is walked only when those hold none."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return self._step
        with f:
            f.seek(self._pos)
            data = f.read(self.MAX_READ)
        base = self._pos
        block = (base + len(data)) // self.BLOCK * self.BLOCK - base  # the last block start, in data
        for _ in range(3):
            if block <= 0:
                break
            if self._scan(data, base, block, at_record=False):
                return self._step
            block -= self.BLOCK
        self._scan(data, base, 0, at_record=True)
        return self._step

    def _scan(self, data: bytes, base: int, i: int, at_record: bool) -> bool:
        """Walk the whole chunks of ``data`` (the file from ``base`` on) from ``data[i]``, a
        record's start (``at_record``) or a block's, where a record begun earlier may go on.
        Moves ``_pos`` past the last whole record, and takes the step of the newest history
        record that starts in the walk; False when none does."""
        block, unpack, hsize, n = self.BLOCK, self.HEAD.unpack_from, self.HEAD.size, len(data)
        end = None
        parts: list[tuple[int, int]] | None = [] if at_record else None  # None: in a record begun before i
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
            span = (i + hsize, i + hsize + length)
            i += hsize + length
            if kind == 1:  # FULL
                records.append([span])
                parts, end = [], i
            elif kind == 2:  # FIRST
                parts = [span]
            elif parts is not None:  # MIDDLE or LAST of a record that started in the walk
                parts.append(span)
            if kind == 4:  # LAST: a whole record
                if parts is not None:
                    records.append(parts)
                parts, end = [], i
        if end is not None:
            self._pos = base + end
        if not records:
            return False
        from wandb.proto import wandb_internal_pb2 as pb

        for spans in reversed(records):
            rec = pb.Record.FromString(b"".join(data[a:b] for a, b in spans))
            if rec.HasField("history"):
                self._step = rec.history.step.num
                return True
        return False
