"""MetricsClient: what the trainer's step loop calls.

``log()`` checks the values, stamps a sequence number, packs the frame and
appends it to a bounded deque: a few microseconds, no socket, no lock, no
exception. The ``Transport`` thread does the rest. Non-zero ranks and forked
children (e.g. DataLoader workers) get an inert client. ``values.py`` decides
what a value becomes on the wire.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

from . import device, protocol
from . import values as wire
from .address import ENV_ADDRESS, resolve_address
from .transport import Transport

log = logging.getLogger("kforge_sidecar.client")

_live: "weakref.WeakSet[MetricsClient]" = weakref.WeakSet()
# A hello carries the config and the process description: the config gets what the rest leaves.
_I64_MIN, _I64_MAX = wire.INT64_MIN, wire.INT64_MAX
_KEY_MAX = protocol.DEFAULT_LIMITS.max_key_len
_CONFIG_BUDGET = protocol.DEFAULT_LIMITS.max_hello_bytes - 64 * 1024
_PROCESS_ARGS_BUDGET = 32 * 1024


@dataclass(frozen=True)
class ClientStats:
    logged: int  # log()/log_eval() calls accepted
    sent: int  # distinct frames handed to the socket
    acked: int  # frames durable in the sidecar's spool (or refused by it, below)
    buffered: int  # frames waiting to be sent or acknowledged
    dropped: int  # frames lost to a full buffer
    dropped_values: int  # individual values dropped (not a scalar, bad name)
    errors: int  # calls swallowed inside log() (bad step, bad metrics)
    refused: int = 0  # frames the sidecar refused (counted in its status too)
    late: int = 0  # rows logged below a step this client had already logged
    device_dropped: int = 0  # CUDA values dropped: every pinned slot in flight, or in a graph capture


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


def _git(cwd: str, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=2, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def describe_process() -> dict[str, Any]:
    """The trainer as wandb would have described it in-process: program, args, cwd, git.

    Runs in the sender thread, once, before the first hello (git takes milliseconds)."""
    limit = protocol.DEFAULT_LIMITS.max_str_len
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if (
        spec is not None
        and getattr(spec, "name", None)
        and not str(getattr(main, "__file__", "")).endswith("__main__.py")
    ):
        program = f"-m {spec.name}"
    else:
        program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "<python>"
    cwd = os.getcwd()
    args: list[str] = []
    used = 0
    for a in sys.argv[1 : protocol.MAX_ARGS + 1]:
        a = a[:limit]
        used += len(a)
        if used > _PROCESS_ARGS_BUDGET:
            break
        args.append(a)
    info: dict[str, Any] = {
        "program": program[:limit],
        "args": args,
        "cwd": cwd[:limit],
        "executable": sys.executable[:limit],
    }
    where = os.path.dirname(program) if os.path.isabs(program) else cwd
    commit = _git(where, "rev-parse", "HEAD")
    if commit:
        info["git_commit"] = commit[:limit]
        remote = _git(where, "config", "--get", "remote.origin.url")
        if remote:
            info["git_remote"] = remote[:limit]
    return info


class _StagedCall:
    """One log() call with device values: packed by the sender once the copies are done."""

    __slots__ = ("session", "kind", "time", "values", "staged", "step", "_done")

    def __init__(self, session: str, kind: str, time: float, values: dict, staged: Any, step: Any):
        self.session, self.kind, self.time, self.values = session, kind, time, values
        self.staged, self.step, self._done = staged, step, False

    def ready(self) -> bool:
        return self.staged is None or self._done or self.staged.ready()

    def resolve(self) -> None:
        if not self._done:
            self._done = True
            if self.staged is not None:
                host = self.staged.read()
                if None in host:
                    self.step = host.pop(None)
                self.values.update(host)
            if self.step is not None and not 0 <= self.step <= protocol.INT64_MAX:
                self.step = None  # a negative device step: wandb's next step, not a refused frame


class _StagedFrame:
    """An outbox entry that becomes a frame once its call's device values are on the host."""

    __slots__ = ("call", "seq", "keys", "commit")

    def __init__(self, call: _StagedCall, seq: int, keys: list, commit: bool):
        self.call, self.seq, self.keys, self.commit = call, seq, keys, commit

    def ready(self) -> bool:
        return self.call.ready()

    def pack(self) -> bytes:
        c = self.call
        c.resolve()
        values = {k: c.values[k] for k in self.keys if k in c.values}
        return protocol.encode_metrics(c.session, self.seq, c.step, c.kind, c.time, values, self.commit)


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
        finish_at_exit: bool = False,
    ):
        self.project = project
        self.name = name
        self.address = resolve_address(address)
        if run_id is not None and (type(run_id) is not str or not protocol.RUN_ID_RE.match(run_id)):
            raise ValueError(f"run_id {run_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
        self._rank = _rank_from_env() if rank is None else rank
        self._inert = self._rank != 0
        # Minted here when none was restored, so it is real the moment the client exists:
        # a checkpoint written in the first second of training already holds it.
        self._run_id = run_id if run_id is not None or self._inert else protocol.mint_run_id()
        self._run_id_ready = threading.Event()
        if self._run_id is not None:
            self._run_id_ready.set()
        self._session = secrets.token_hex(8)
        self._seq = itertools.count(1)
        self._logged = 0
        self._last_seq = 0
        self._dropped_values = 0
        self._errors = 0
        self._late = 0
        self._max_step = 0  # the highest explicit step logged in this session
        self._warned_keys: set[str] = set()
        self._closed = False
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._process: dict[str, Any] | None = None
        self._staging: device.Staging | None = None  # created on the first CUDA tensor
        # JSON-shaped and within the hello's limit, so that the hello can always be sent
        self._config = self._fit_config(wire.json_config(config), "config")
        self._wandb_init = dict(wandb_init or {})
        unknown = set(self._wandb_init) - set(protocol.WANDB_INIT_KEYS)
        if unknown:
            raise ValueError(f"wandb_init keys {sorted(unknown)} are not among {protocol.WANDB_INIT_KEYS}")
        self._transport: Transport | None = None
        # At interpreter exit, finish the run (exit code 1 after an uncaught exception), as
        # in-process wandb does; otherwise an unclosed client only pushes out its buffer.
        self._finish_at_exit = finish_at_exit
        if self._inert:
            return
        if finish_at_exit:
            _watch_uncaught()
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

    def log(self, metrics: Mapping[str, Any], step: int | None = None, *, commit: bool = True) -> None:
        """Queue one training step's scalars. Never blocks, never raises.

        ``step=None`` is wandb's: the current step, then the next (after a resume, the
        run's next step); ``commit=False`` then keeps that row open for more values."""
        self._enqueue("train", metrics, step, commit)

    def log_eval(self, metrics: Mapping[str, Any], step: int | None = None, *, commit: bool = True) -> None:
        """Queue evaluation scalars for ``step`` (same rules as ``log``)."""
        self._enqueue("eval", metrics, step, commit)

    def _enqueue(self, kind: str, metrics: Mapping[str, Any], step: Any, commit: bool = True) -> None:
        if self._inert or self._closed:
            return
        try:
            values = {}
            on_device: dict[Any, Any] | None = None  # CUDA tensors: staged, never .item()'d here
            for k, v in metrics.items():
                t = type(v)
                if (t is float or t is bool or (t is int and _I64_MIN <= v <= _I64_MAX)) and (
                    type(k) is str and 0 < len(k) <= _KEY_MAX
                ):
                    values[k] = v  # the common case, without a call
                else:
                    key = k if type(k) is str and 0 < len(k) <= _KEY_MAX else wire.normal_key(k, self._warn)
                    if key is None:
                        continue
                    if device.is_device_tensor(v) and wire.device_scalar(key, v, self._warn):
                        on_device = on_device or {}
                        on_device[key] = v
                        continue
                    v = wire.scalar(key, v, self._warn)
                    if v is not None:
                        values[key] = v
            if step is not None:
                if type(step) is int and self._max_step <= step <= _I64_MAX:
                    self._max_step = step  # the common case, without a call
                elif device.is_device_tensor(step):
                    on_device = on_device or {}
                    on_device[None] = step
                else:
                    step = self._step(step)
            now = time.time()
            if on_device:
                self._enqueue_staged(kind, values, on_device, step, now, commit)
                return
            parts = [values] if len(values) <= wire.SAFE_KEYS else list(wire.chunks(values))
            last = len(parts) - 1
            for i, part in enumerate(parts):
                seq = next(self._seq)
                # Packed here, not in the sender, and queued bare: bytes are no work for
                # the trainer's garbage collector, while any container that waits in the
                # outbox counts toward its next collection (a full one walks the whole
                # heap). The sender reads the seq from the frame. A split step=None row
                # stays one row: only its last frame commits.
                self._outbox.append(
                    protocol.encode_metrics(self._session, seq, step, kind, now, part, commit and i == last)
                )
                self._last_seq = seq
            self._logged += 1
        except Exception:
            self._errors += 1
            if self._errors == 1:
                log.warning("kforge-sidecar client: log() failed; dropping this call (said once)", exc_info=True)

    def _enqueue_staged(self, kind: str, values: dict, on_device: dict, step: Any, now: float, commit: bool) -> None:
        """A call with CUDA tensors: start their copies and queue frames that the sender
        packs once the copies are done, in their place in the stream."""
        if self._staging is None:
            self._staging = device.Staging()
        staged = self._staging.stage(on_device)
        if staged is None:
            if None in on_device:
                return  # the step itself is on the device: without it the row has no place
            on_device = {}
        call = _StagedCall(self._session, kind, now, values, staged, step)
        keys = dict.fromkeys(values, 0.0) | dict.fromkeys((k for k in on_device if k is not None), 0.0)
        parts = [keys] if len(keys) <= wire.SAFE_KEYS else list(wire.chunks(keys))
        last = len(parts) - 1
        for i, part in enumerate(parts):
            seq = next(self._seq)
            self._outbox.append((seq, _StagedFrame(call, seq, list(part), commit and i == last)))
            self._last_seq = seq
        self._logged += 1

    def _step(self, step: Any) -> int:
        if type(step) is not int:
            if isinstance(step, bool) or not hasattr(step, "__index__") and not hasattr(step, "item"):
                raise TypeError(f"step must be an integer or None, not {type(step).__name__}")
            step = int(step.item() if hasattr(step, "item") else step)
        if not 0 <= step <= protocol.INT64_MAX:
            raise ValueError(f"step {step} is out of range (0..2**63-1)")
        if step < self._max_step:
            self._late += 1
            if self._late == 1:
                log.warning(
                    "kforge-sidecar client: step %d is lower than step %d already logged. wandb keeps a run's "
                    "steps increasing, so rows like this one are not charted; the sidecar keeps them in its "
                    "spool and counts them as 'late' in `kforge-sidecar status` (said once)",
                    step, self._max_step,
                )  # fmt: skip
        else:
            self._max_step = step
        return step

    def _warn(self, key: str, why: str, dropped: bool = True) -> None:
        self._dropped_values += dropped  # a renamed key is warned about, not dropped
        if key not in self._warned_keys:
            self._warned_keys.add(key)
            shown = key if len(key) <= 80 else f"{key[:60]}...({len(key)} characters)"
            log.warning("kforge-sidecar client: metric %r: %s (warned once per key)", shown, why)
        return None

    # ----------------------------------------------------------- config and summary

    def update_config(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the run's config (hyperparameters known after start). Never raises."""
        self._enqueue_map("config", values)

    def update_summary(self, values: Mapping[str, Any]) -> None:
        """Set summary values of the run (final or best figures). Never raises."""
        self._enqueue_map("summary", values)

    def _enqueue_map(self, kind: str, values: Mapping[str, Any]) -> None:
        if self._inert or self._closed:
            return
        try:
            shaped = self._fit_config(wire.json_config(values), kind)
            seq = next(self._seq)
            msg = (protocol.ConfigUpdate if kind == "config" else protocol.SummaryUpdate)(self._session, seq, shaped)
            self._outbox.append((seq, protocol.encode(msg)))
            self._last_seq = seq
        except Exception:
            self._errors += 1
            if self._errors == 1:
                log.warning(
                    "kforge-sidecar client: update_%s() failed; dropping this call (said once)", kind, exc_info=True
                )

    def _fit_config(self, config: dict[str, Any], what: str) -> dict[str, Any]:
        fitted, trimmed = wire.fit_config(config, _CONFIG_BUDGET)
        if trimmed:
            log.warning(
                "kforge-sidecar client: the %s is larger than the sidecar takes (%d bytes); trimmed %s "
                "(each replaced by a note with its size) so the run keeps every metric",
                what, protocol.DEFAULT_LIMITS.max_hello_bytes, ", ".join(trimmed[:10]) + (" ..." if len(trimmed) > 10 else ""),
            )  # fmt: skip
        return fitted

    # ----------------------------------------------------------- run id

    @property
    def run_id(self) -> str | None:
        """The wandb run ID: the one passed in, else one minted at construction (rank 0).
        None only on an inert (non-zero rank) client."""
        return self._run_id

    def wait_run_id(self, timeout: float = 10.0) -> str | None:
        """The run ID (known at once on rank 0; kept for callers written for older clients)."""
        self._run_id_ready.wait(timeout)
        return self._run_id

    def _make_hello(self, first: int) -> protocol.Hello:
        if self._process is None:
            try:
                self._process = describe_process()
            except Exception:  # never let the description stop the hello
                self._process = {}
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
            process=self._process,
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
        self._outbox.append(
            (seq, protocol.encode(protocol.Close(session=self._session, seq=seq, exit_code=int(exit_code))))
        )
        self._last_seq = seq
        t = self._transport
        t.wake()
        started = time.monotonic()
        done = t.wait_acked(seq, timeout)
        waited = time.monotonic() - started
        t.stop(max(deadline - time.monotonic(), 0.05))
        _live.discard(self)
        if not done:
            left = self.stats().buffered
            if t.fatal_reason is not None:
                log.warning(
                    "kforge-sidecar client: close(): the sidecar at %s refused this client (%s); "
                    "%d frames were not delivered", self.address, t.fatal_reason, left,
                )  # fmt: skip
            elif not t.ever_welcomed:
                log.warning(
                    "kforge-sidecar client: close(): no kforge-sidecar answered at %s in %.1fs; %d frames "
                    "were not delivered and are lost (start one with `kforge-sidecar serve`, or set %s)",
                    self.address, waited, left, ENV_ADDRESS,
                )  # fmt: skip
            else:
                log.warning(
                    "kforge-sidecar client: close() gave up after %.1fs with %d frames not yet acknowledged by "
                    "the sidecar at %s; they are lost unless it already has them", waited, left, self.address,
                )  # fmt: skip
        return done

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything logged so far is durable in the sidecar's spool."""
        if self._transport is None:
            return self._inert
        self._transport.wake()
        return self._transport.wait_acked(self._last_seq, timeout)

    def stats(self) -> ClientStats:
        t = self._transport
        if t is None:
            return ClientStats(
                self._logged,
                0,
                0,
                0,
                0,
                self._dropped_values,
                self._errors,
                0,
                self._late,
                self._staging.dropped if self._staging else 0,
            )
        c = t.counters
        return ClientStats(
            logged=self._logged,
            sent=c.sent,
            acked=c.acked,
            buffered=t.buffered,
            dropped=c.dropped + t.unnoticed_drops(self._last_seq),
            dropped_values=self._dropped_values,
            errors=self._errors,
            refused=c.refused,
            late=self._late,
            device_dropped=self._staging.dropped if self._staging else 0,
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
        if client._transport is not None:
            client._transport.close_wake_pipe(locked=False)
        client._transport = None
    _live.clear()


_uncaught: list[BaseException] = []  # an uncaught exception is ending the interpreter
_excepthook_wrapped = False
FINISH_AT_EXIT_TIMEOUT = 10.0  # seconds a finish_at_exit client's close may take at exit


def _watch_uncaught() -> None:
    global _excepthook_wrapped
    if _excepthook_wrapped:
        return
    _excepthook_wrapped = True
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        _uncaught.append(exc)
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _at_exit() -> None:
    # A client that was never closed: with finish_at_exit, finish its run (1 after an
    # uncaught exception); otherwise push out what is buffered, briefly, but do not
    # finish the run (the process may be exiting on an exception).
    for client in list(_live):
        t = client._transport
        if t is None or client._closed:
            continue
        if client._finish_at_exit:
            client.close(timeout=FINISH_AT_EXIT_TIMEOUT, exit_code=1 if _uncaught else 0)
        else:
            t.wait_acked(client._last_seq, 2.0)
            t.stop(0.5)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
