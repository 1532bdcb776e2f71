"""MetricsClient: what the trainer's step loop calls.

``log()`` checks the values, stamps a sequence number, packs the frame and
appends it to a bounded deque: a few microseconds, no socket, no lock, no
exception. The ``Transport`` thread does the rest. Non-zero ranks and forked children (e.g.
DataLoader workers) get an inert client.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

from . import protocol
from .address import resolve_address
from .transport import Transport

log = logging.getLogger("kforge_sidecar.client")

_live: "weakref.WeakSet[MetricsClient]" = weakref.WeakSet()
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class ClientStats:
    logged: int  # frames log()/log_eval() accepted
    sent: int  # distinct frames handed to the socket
    acked: int  # frames durable in the sidecar's spool
    buffered: int  # frames waiting to be sent or acknowledged
    dropped: int  # frames lost to a full buffer
    dropped_values: int  # individual non-scalar values dropped
    errors: int  # exceptions swallowed inside log()


def _rank_from_env() -> int:
    """RANK from the launcher, else torch.distributed if the caller already set it up."""
    rank = os.environ.get("RANK")
    if rank is not None:
        try:
            return int(rank)
        except ValueError:
            return 0
    dist = sys.modules.get("torch.distributed")  # never import torch ourselves
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except Exception:
            pass
    return 0


class MetricsClient:
    """Push scalar metrics to the local kforge-sidecar without ever blocking the caller."""

    def __init__(
        self,
        project: str = "kempnerforge",
        name: str | None = None,
        run_id: str | None = None,
        config: Any = None,
        address: str | None = None,
        *,
        wandb_init: Mapping[str, Any] | None = None,
        buffer_size: int = 100_000,
        rank: int | None = None,
    ):
        self.project = project
        self.name = name
        self.address = resolve_address(address)
        self._run_id = run_id
        self._run_id_ready = threading.Event()
        if run_id is not None:
            if not protocol.RUN_ID_RE.match(run_id):
                raise ValueError(f"run_id {run_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
            self._run_id_ready.set()
        # JSON-shaped, so that the hello can always be sent (enums, dtypes, dataclasses, NaN...)
        self._config = protocol.jsonable(config or {})
        if not isinstance(self._config, dict):
            raise ValueError(f"config must be a mapping or a dataclass, not {type(config).__name__}")
        self._wandb_init = dict(wandb_init or {})
        unknown = set(self._wandb_init) - set(protocol.WANDB_INIT_KEYS)
        if unknown:
            raise ValueError(f"wandb_init keys {sorted(unknown)} are not among {protocol.WANDB_INIT_KEYS}")
        self._session = secrets.token_hex(8)
        self._seq = itertools.count(1)
        self._logged = 0
        self._last_seq = 0
        self._dropped_values = 0
        self._errors = 0
        self._warned_keys: set[str] = set()
        self._closed = False
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._rank = _rank_from_env() if rank is None else rank
        self._inert = self._rank != 0
        self._transport: Transport | None = None
        if self._inert:
            return
        self._outbox: deque = deque(maxlen=buffer_size)
        self._transport = Transport(
            address=self.address,
            session=self._session,
            hello=self._make_hello,
            outbox=self._outbox,
            capacity=buffer_size,
            on_welcome=self._on_welcome,
            on_fatal=self._on_fatal,
        )
        self._transport.start()
        _live.add(self)

    # ----------------------------------------------------------- hot path

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue one training step's scalars. Never blocks, never raises."""
        self._enqueue("train", metrics, step)

    def log_eval(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue evaluation scalars for ``step`` (same rules as ``log``)."""
        self._enqueue("eval", metrics, step)

    def _enqueue(self, kind: str, metrics: Mapping[str, Any], step: int) -> None:
        if self._inert or self._closed:
            return
        try:
            values = {}
            for k, v in metrics.items():
                t = type(v)
                if (t is float or t is int or t is bool) and type(k) is str:
                    values[k] = v
                else:
                    v = self._coerce(k, v)
                    if v is not None:
                        values[k] = v
            if type(step) is not int:
                step = int(step.item() if hasattr(step, "item") else step)
            if step < 0:
                raise ValueError(f"step {step} is negative")
            seq = next(self._seq)
            now = time.time()
            try:
                frame = protocol.encode_metrics(self._session, seq, step, kind, now, values)
            except OverflowError:  # an int beyond 64 bits: the one value msgpack refuses
                for k in [k for k, v in values.items() if type(v) is int and not _INT_MIN <= v <= _UINT_MAX]:
                    self._drop(k, f"integer {values.pop(k)} does not fit in 64 bits")
                frame = protocol.encode_metrics(self._session, seq, step, kind, now, values)
            # Packed here, not in the sender: a (seq, bytes) pair is invisible to the
            # garbage collector, while a queued dict would make every full
            # collection of the trainer walk the backlog.
            self._outbox.append((seq, frame))
            self._last_seq = seq
            self._logged += 1
        except Exception:
            self._errors += 1
            if self._errors == 1:
                log.warning("kforge-sidecar client: log() failed; dropping this call", exc_info=True)

    def _coerce(self, key: Any, value: Any) -> int | float | bool | None:
        """Slow path: numpy scalars, 0-d tensors, and what gets dropped."""
        if type(key) is not str:
            return self._drop(repr(key), "metric names must be strings")
        if isinstance(value, (int, float)):  # numpy float64, IntEnum, ...
            return value if isinstance(value, bool) else (float(value) if isinstance(value, float) else int(value))
        item = getattr(value, "item", None)
        if item is not None and getattr(value, "ndim", None) == 0:
            try:
                scalar = item()  # a CUDA tensor syncs here, as the seed's .item() did
            except Exception as exc:
                return self._drop(key, f"item() failed: {exc}")
            if type(scalar) in (int, float, bool):
                return scalar
            return self._drop(key, f"item() gave a {type(scalar).__name__}")
        shape = getattr(value, "shape", None)
        what = f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__
        return self._drop(key, f"{what} is not a scalar")

    def _drop(self, key: str, why: str) -> None:
        self._dropped_values += 1
        if key not in self._warned_keys:
            self._warned_keys.add(key)
            log.warning("kforge-sidecar client: dropping metric %r: %s (warned once per key)", key, why)
        return None

    # ----------------------------------------------------------- run id

    @property
    def run_id(self) -> str | None:
        """The wandb run ID: the one passed in, else the sidecar's answer to hello (None until then)."""
        return self._run_id

    def wait_run_id(self, timeout: float = 10.0) -> str | None:
        """Wait at most ``timeout`` seconds for the run ID; None if the sidecar has not answered."""
        self._run_id_ready.wait(timeout)
        return self._run_id

    def _make_hello(self, first: int) -> protocol.Hello:
        return protocol.Hello(
            session=self._session,
            project=self.project,
            name=self.name,
            run_id=self._run_id,
            config=self._config,
            pid=self._pid,
            host=self._host,
            first=max(first, 1),
            wandb=self._wandb_init,
        )

    def _on_welcome(self, run_id: str) -> None:
        if self._run_id is None:
            self._run_id = run_id
        self._run_id_ready.set()

    def _on_fatal(self, reason: str) -> None:
        log.error("kforge-sidecar client: the sidecar refused this client (%s); metrics are not sent", reason)

    # ----------------------------------------------------------- shutdown

    def close(self, timeout: float = 10.0, exit_code: int = 0) -> bool:
        """Send what is buffered, ask the sidecar to finish the run, and stop.

        Returns within ``timeout`` whatever the sidecar or wandb does; True when
        the sidecar confirmed that every frame and the close are durable.
        """
        if self._closed or self._transport is None:
            self._closed = True
            return self._transport is None
        self._closed = True
        deadline = time.monotonic() + max(timeout, 0.0)
        seq = next(self._seq)
        self._outbox.append((seq, protocol.encode(protocol.Close(session=self._session, seq=seq, exit_code=int(exit_code)))))
        self._last_seq = seq
        done = self._transport.wait_acked(seq, timeout)
        self._transport.stop(max(deadline - time.monotonic(), 0.05))
        _live.discard(self)
        if not done:
            s = self.stats()
            log.warning(
                "kforge-sidecar client: close() timed out after %.1fs with %d frames unacknowledged; "
                "they are lost unless the sidecar already has them",
                timeout,
                s.buffered,
            )
        return done

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything logged so far is durable in the sidecar's spool."""
        if self._transport is None:
            return self._inert
        return self._transport.wait_acked(self._last_seq, timeout)

    def stats(self) -> ClientStats:
        t = self._transport
        if t is None:
            return ClientStats(self._logged, 0, 0, 0, 0, self._dropped_values, self._errors)
        c = t.counters
        return ClientStats(
            logged=self._logged,
            sent=c.sent,
            acked=c.acked,
            buffered=t.buffered,
            # + frames the outbox's maxlen pushed out that the sender has not noticed yet
            dropped=c.dropped + max(0, self._last_seq - c.highest_seen - len(self._outbox)),
            dropped_values=self._dropped_values,
            errors=self._errors,
        )

    @property
    def inert(self) -> bool:
        return self._inert

    def __enter__(self) -> "MetricsClient":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def _after_fork_in_child() -> None:
    # The sender thread does not exist in the child, and a ZeroMQ context must
    # not be used across fork: every inherited client goes quiet.
    for client in list(_live):
        client._inert = True
        client._transport = None
    _live.clear()


def _at_exit() -> None:
    # A client that was never closed: push out what is buffered, briefly, but
    # do not finish the run (the process may be exiting on an exception).
    for client in list(_live):
        t = client._transport
        if t is not None and not client._closed:
            t.wait_acked(client._last_seq, 2.0)
            t.stop(0.5)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
