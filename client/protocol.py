"""The wire protocol between MetricsClient and the sidecar: one module, both sides.

Every message is one ZeroMQ frame holding a msgpack map with a protocol
version ``v`` and a type ``t``. The client speaks through a DEALER socket,
the sidecar answers through a ROUTER socket.

Client → sidecar:
  hello    session, project, name, run_id, config, pid, host, first, wandb
  metrics  session, seq, step, kind ("train" | "eval"), time, values
  close    session, seq, exit_code
  ping     session                 a heartbeat from an idle client: "still alive"
  status   (control, from the CLI)
  stop     (control, from the CLI)

Sidecar → client:
  welcome  session, run_id, acked
  ack      session, seq          every seq <= seq is durable in the spool
  nack     session, seq          a gap after seq: resend from seq + 1
  error    session, reason, fatal
  reply    body                  answer to a control request

Sequence numbers start at 1 per client session and are assigned in log order.
``first`` in a hello is the oldest seq the client still holds: anything below
it was acknowledged or dropped for good, so the sidecar stops waiting for it.
``wandb`` in a hello holds per-run ``wandb.init`` options (WANDB_INIT_KEYS).

``decode_request`` is where every incoming frame is validated; it raises
``ProtocolError`` with a short reason code that the sidecar counts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Union

import msgpack

PROTOCOL_VERSION = 1

KINDS = ("train", "eval")
# wandb run IDs: letters, digits, dash and underscore; also a spool directory name.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# Per-run wandb.init options a client may set; everything else comes from the
# sidecar's environment. "base_url" goes into wandb.Settings.
WANDB_INIT_KEYS = ("entity", "group", "job_type", "tags", "notes", "mode", "base_url")

Scalar = Union[int, float, bool]


@dataclass(frozen=True)
class Limits:
    """What the sidecar accepts; anything beyond is rejected and counted."""

    max_frame_bytes: int = 64 * 1024
    max_hello_bytes: int = 1024 * 1024  # a hello carries the run config
    max_scalars: int = 1024
    max_key_len: int = 256
    max_str_len: int = 1024  # project, name, host
    max_config_depth: int = 32


DEFAULT_LIMITS = Limits()


class ProtocolError(ValueError):
    """A frame the sidecar will not accept. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Hello:
    session: str
    project: str
    name: str | None
    run_id: str | None
    config: dict[str, Any]
    pid: int
    host: str
    first: int = 1
    wandb: dict[str, Any] = field(default_factory=dict)
    t: str = field(default="hello", init=False)


@dataclass(frozen=True)
class Metrics:
    session: str
    seq: int
    step: int
    kind: str
    time: float
    values: dict[str, Scalar]
    t: str = field(default="metrics", init=False)


@dataclass(frozen=True)
class Close:
    session: str
    seq: int
    exit_code: int = 0
    t: str = field(default="close", init=False)


@dataclass(frozen=True)
class Ping:
    session: str
    t: str = field(default="ping", init=False)


@dataclass(frozen=True)
class Control:
    """A request from the CLI: ``status`` or ``stop``."""

    t: str


@dataclass(frozen=True)
class Welcome:
    session: str
    run_id: str
    acked: int
    t: str = field(default="welcome", init=False)


@dataclass(frozen=True)
class Ack:
    session: str
    seq: int
    t: str = field(default="ack", init=False)


@dataclass(frozen=True)
class Nack:
    session: str
    seq: int
    t: str = field(default="nack", init=False)


@dataclass(frozen=True)
class Error:
    session: str | None
    reason: str
    fatal: bool = False
    t: str = field(default="error", init=False)


@dataclass(frozen=True)
class Reply:
    body: dict[str, Any]
    t: str = field(default="reply", init=False)


Request = Union[Hello, Metrics, Close, Ping, Control]
Response = Union[Welcome, Ack, Nack, Error, Reply]


def encode(msg: Request | Response) -> bytes:
    body = asdict(msg)
    body["v"] = PROTOCOL_VERSION
    return msgpack.packb(body, use_bin_type=True)


def encode_metrics(session: str, seq: int, step: int, kind: str, time: float, values: dict) -> bytes:
    """The hot path's encoder: the same map as ``encode(Metrics(...))`` without asdict's deep copy."""
    return msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "t": "metrics",
            "session": session,
            "seq": seq,
            "step": step,
            "kind": kind,
            "time": time,
            "values": values,
        },
        use_bin_type=True,
    )


# --------------------------------------------------------------------- decoding


def _unpack(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise ProtocolError("oversize", f"{len(raw)} bytes, limit {limit}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("malformed", f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"frame is a {type(obj).__name__}, not a map")
    v = obj.get("v")
    if type(v) is not int:
        raise ProtocolError("malformed", "no protocol version")
    if v != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {v}; this side speaks {PROTOCOL_VERSION}")
    return obj


def _field(obj: dict, name: str, types: tuple[type, ...], optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None and optional:
        return None
    # bool is an int subclass; never accept it where a number is meant
    if type(value) not in types:
        raise ProtocolError("bad_field", f"{name!r} must be {'/'.join(t.__name__ for t in types)}")
    return value


def _text(obj: dict, name: str, limits: Limits, optional: bool = False) -> str | None:
    value = _field(obj, name, (str,), optional)
    if value is not None and len(value) > limits.max_str_len:
        raise ProtocolError("bad_field", f"{name!r} longer than {limits.max_str_len}")
    return value


def _session(obj: dict) -> str:
    session = _field(obj, "session", (str,))
    if not SESSION_RE.match(session):
        raise ProtocolError("bad_field", "malformed session id")
    return session


def _seq(obj: dict, name: str = "seq") -> int:
    seq = _field(obj, name, (int,))
    if seq < 1:
        raise ProtocolError("bad_field", f"{name!r} must be >= 1")
    return seq


def check_values(values: Any, limits: Limits) -> dict[str, Scalar]:
    if type(values) is not dict:
        raise ProtocolError("bad_value", "'values' must be a map")
    if len(values) > limits.max_scalars:
        raise ProtocolError("too_many", f"{len(values)} scalars, limit {limits.max_scalars}")
    for key, value in values.items():
        if not key or len(key) > limits.max_key_len:
            raise ProtocolError("bad_value", f"key of length {len(key)} (1..{limits.max_key_len})")
        if type(value) not in (int, float, bool):
            raise ProtocolError("bad_value", f"{key!r} is a {type(value).__name__}, not a scalar")
    return values


def jsonable(value: Any, depth: int = 0) -> Any:
    """The run config as JSON-shaped data (what the sidecar accepts for wandb's config).

    A KempnerForge JobConfig is nested dataclasses holding enums, torch dtypes and
    tuples: dataclasses and mappings become dicts, sequences lists, enums their
    value, non-finite floats and anything else their str().
    """
    if depth > 24:
        return str(value)
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name, None), depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    item = getattr(value, "item", None)  # numpy scalars, 0-d tensors
    if item is not None and getattr(value, "ndim", None) == 0:
        try:
            return jsonable(item(), depth + 1)
        except Exception:
            pass
    return str(value)


def _check_config(value: Any, depth: int, limits: Limits) -> None:
    # The config lands in meta.json and wandb's config: JSON-shaped data only.
    if depth > limits.max_config_depth:
        raise ProtocolError("bad_field", "config nested too deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError("bad_field", "config keys must be strings")
            _check_config(v, depth + 1, limits)
    elif isinstance(value, list):
        for v in value:
            _check_config(v, depth + 1, limits)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError("bad_field", "config holds a non-finite float")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise ProtocolError("bad_field", f"config holds a {type(value).__name__}")


def _wandb_init(opts: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise ProtocolError("bad_field", "'wandb' must be a map")
    for key, value in opts.items():
        if key not in WANDB_INIT_KEYS:
            raise ProtocolError("bad_field", f"wandb option {key!r} is not one of {WANDB_INIT_KEYS}")
        items = value if key == "tags" and isinstance(value, list) else [value]
        if not all(isinstance(v, str) and len(v) <= limits.max_str_len for v in items):
            raise ProtocolError("bad_field", f"wandb option {key!r} must be text" + (" or a list of text" if key == "tags" else ""))
    return opts


def decode_request(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    """Validate one incoming frame and return its message; raise ProtocolError otherwise."""
    obj = _unpack(raw, max(limits.max_frame_bytes, limits.max_hello_bytes))
    t = obj.get("t")
    if t != "hello" and len(raw) > limits.max_frame_bytes:
        raise ProtocolError("oversize", f"{len(raw)} bytes, limit {limits.max_frame_bytes}")
    if t == "metrics":
        step = _field(obj, "step", (int,))
        if step < 0:
            raise ProtocolError("bad_field", "'step' must be >= 0")
        kind = obj.get("kind")
        if kind not in KINDS:
            raise ProtocolError("bad_field", f"'kind' must be one of {KINDS}")
        return Metrics(
            session=_session(obj),
            seq=_seq(obj),
            step=step,
            kind=kind,
            time=float(_field(obj, "time", (float, int))),
            values=check_values(obj.get("values"), limits),
        )
    if t == "hello":
        run_id = _field(obj, "run_id", (str,), optional=True)
        if run_id is not None and not RUN_ID_RE.match(run_id):
            raise ProtocolError("bad_field", "run_id must be 1-64 of [A-Za-z0-9_-]")
        config = obj.get("config") or {}
        if not isinstance(config, dict):
            raise ProtocolError("bad_field", "'config' must be a map")
        _check_config(config, 0, limits)
        return Hello(
            wandb=_wandb_init(obj.get("wandb") or {}, limits),
            session=_session(obj),
            project=_text(obj, "project", limits) or "",
            name=_text(obj, "name", limits, optional=True),
            run_id=run_id,
            config=config,
            pid=_field(obj, "pid", (int,)),
            host=_text(obj, "host", limits) or "",
            first=_seq(obj, "first"),
        )
    if t == "close":
        return Close(session=_session(obj), seq=_seq(obj), exit_code=_field(obj, "exit_code", (int,)))
    if t == "ping":
        return Ping(session=_session(obj))
    if t in ("status", "stop"):
        return Control(t=t)
    raise ProtocolError("unknown_type", f"message type {t!r}")


def decode_response(raw: bytes) -> Response:
    """Decode a sidecar reply on the client side. Raises ProtocolError."""
    obj = _unpack(raw, 16 * 1024 * 1024)
    t = obj.get("t")
    if t == "ack":
        return Ack(session=_session(obj), seq=_field(obj, "seq", (int,)))
    if t == "nack":
        return Nack(session=_session(obj), seq=_field(obj, "seq", (int,)))
    if t == "welcome":
        return Welcome(session=_session(obj), run_id=_field(obj, "run_id", (str,)), acked=_field(obj, "acked", (int,)))
    if t == "error":
        return Error(
            session=_field(obj, "session", (str,), optional=True),
            reason=_field(obj, "reason", (str,)),
            fatal=bool(obj.get("fatal")),
        )
    if t == "reply":
        return Reply(body=_field(obj, "body", (dict,)))
    raise ProtocolError("unknown_type", f"reply type {t!r}")

