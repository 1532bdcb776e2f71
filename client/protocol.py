"""The wire protocol between MetricsClient and the sidecar: one module, both sides.

Every message is one ZeroMQ frame holding a msgpack map with a protocol
version ``v`` and a type ``t``. The client speaks through a DEALER socket,
the sidecar answers through a ROUTER socket.

Client → sidecar:
  hello    session, project, name, run_id, config, pid, host, first, wandb, process
  metrics  session, seq, step (None: wandb's next step), kind ("train" | "eval"), time, values
  config   session, seq, values    a config update after the hello (merged into wandb's config)
  summary  session, seq, values    summary values for the run
  close    session, seq, exit_code
  ping     session                 a heartbeat from an idle client: "still alive"
  status   (control, from the CLI)
  stop     (control, from the CLI)

A seq'd frame (metrics, config, summary, close) may also travel in a batch: one
ZeroMQ part holding several such frames of one session back to back, each a
complete msgpack map exactly as it would travel alone, in seq order. Each is
validated, stored and acknowledged as if it had come alone. A client sends
batches only to a sidecar whose welcome carries ``batch`` (the largest batch
part it takes, in bytes); a hello always travels alone.

Sidecar → client:
  welcome  session, run_id, acked, batch
  ack      session, seq          every seq <= seq is durable in the spool (or refused, below)
  nack     session, seq          a gap after seq: resend from seq + 1
  error    session, reason, fatal, code, seq
  reply    body                  answer to a control request

Spool only (written by the receiver, never accepted from a socket):
  refused  session, seq, reason  a frame the receiver refused: its seq is used up

A metrics frame's ``values`` holds at most ``Limits.max_scalars`` keys; a
client splits a wider step into several frames of the same step, which wandb
merges into one row. Every integer field is bounded when decoded.

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
import functools
import math
import re
import secrets
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Union

import msgpack

from .ids import RUN_ID_RE  # noqa: F401  (part of the protocol: a hello's run_id)

PROTOCOL_VERSION = 1

KINDS = ("train", "eval")
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# Per-run wandb.init options a client may set; everything else comes from the
# sidecar's environment. "base_url" goes into wandb.Settings.
WANDB_INIT_KEYS = ("entity", "group", "job_type", "tags", "notes", "mode", "base_url")

Scalar = Union[int, float, bool]

# Integer fields on the wire: msgpack carries up to 64 bits; nothing the sidecar
# stores, adds up or sends back may leave int64.
INT64_MAX = 2**63 - 1
PID_MAX = 2**31 - 1
EXIT_CODE_RANGE = (-(2**31), 2**31 - 1)
# The trainer's process description in a hello (what wandb shows as the run's program).
PROCESS_KEYS = ("program", "args", "cwd", "executable", "git_commit", "git_remote")
MAX_ARGS = 1024

# Reason codes of Error replies: the client acts on these, never on the text.
E_UNKNOWN_SESSION = "unknown_session"
E_REFUSED = "refused"  # one frame refused; its seq is used up (``seq``)
E_FATAL = "fatal"  # this client cannot go on (version, hello refused, too many runs)
E_DISK = "disk"  # the spool is not writable; resend later

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def mint_run_id() -> str:
    """A wandb-style run ID (8 of [a-z0-9], like wandb.util.generate_id)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class Limits:
    """What the sidecar accepts; anything beyond is rejected and counted."""

    max_frame_bytes: int = 64 * 1024
    max_hello_bytes: int = 1024 * 1024  # a hello, config or summary frame carries the run config
    max_scalars: int = 1024
    max_key_len: int = 256
    max_str_len: int = 1024  # project, name, host
    max_config_depth: int = 32
    max_batch_bytes: int = 1024 * 1024  # one ZeroMQ part of back-to-back frames (see the module doc)

    @functools.cached_property
    def max_alone(self) -> int:
        """The largest frame accepted alone, of any type (a hello may be the largest)."""
        return max(self.max_frame_bytes, self.max_hello_bytes)

    @functools.cached_property
    def fast_metrics(self) -> Callable[[bytes], Any] | None:
        """The receiver's decoder of a metrics frame alone under these limits
        (``_fast_metrics_decoder``), or None where msgspec is not installed."""
        return _fast_metrics_decoder(self)


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
    process: dict[str, Any] = field(default_factory=dict)  # PROCESS_KEYS: the trainer's program, args, git
    t: str = field(default="hello", init=False)


@dataclass(frozen=True)
class Metrics:
    session: str
    seq: int
    step: int | None  # None: wandb's current step, assigned by the receiver
    kind: str
    time: float
    values: dict[str, Scalar]
    commit: bool = True  # with step None: False keeps wandb's row open (wandb's commit=False)
    t: str = field(default="metrics", init=False)


@dataclass(frozen=True)
class ConfigUpdate:
    session: str
    seq: int
    values: dict[str, Any]
    t: str = field(default="config", init=False)


@dataclass(frozen=True)
class SummaryUpdate:
    session: str
    seq: int
    values: dict[str, Any]
    t: str = field(default="summary", init=False)


@dataclass(frozen=True)
class Refused:
    """Spool only: the receiver refused this frame; its seq is used up."""

    session: str
    seq: int
    reason: str
    t: str = field(default="refused", init=False)


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
    batch: int = 0  # the largest batch part this sidecar takes, in bytes; 0: one frame per part
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
    reason: str  # for people
    fatal: bool = False
    code: str = ""  # E_*: for the client
    seq: int | None = None  # with E_REFUSED: the refused frame
    t: str = field(default="error", init=False)


@dataclass(frozen=True)
class Reply:
    body: dict[str, Any]
    t: str = field(default="reply", init=False)


Request = Union[Hello, Metrics, ConfigUpdate, SummaryUpdate, Close, Ping, Control]
# What frames.log holds: the seq'd requests and the receiver's own refusals.
Record = Union[Hello, Metrics, ConfigUpdate, SummaryUpdate, Close, Refused]
Response = Union[Welcome, Ack, Nack, Error, Reply]


def encode(msg: Request | Response) -> bytes:
    body = asdict(msg)
    body["v"] = PROTOCOL_VERSION
    return msgpack.packb(body, use_bin_type=True)


def encode_metrics(
    session: str, seq: int, step: int | None, kind: str, time: float, values: dict, commit: bool = True
) -> bytes:
    """The hot path's encoder: the same map as ``encode(Metrics(...))`` without asdict's deep copy."""
    body = {
        "v": PROTOCOL_VERSION,
        "t": "metrics",
        "session": session,
        "seq": seq,
        "step": step,
        "kind": kind,
        "time": time,
        "values": values,
    }
    if not commit:
        body["commit"] = False
    return msgpack.packb(body, use_bin_type=True)


def metrics_seq_offset(session: str) -> int:
    """Where ``encode_metrics`` puts the seq in a frame of ``session``: its map starts with
    v, t, session and seq, in that order, so the offset is the same for every frame."""
    head = {"v": PROTOCOL_VERSION, "t": "metrics", "session": session, "seq": 0}
    return len(msgpack.packb(head, use_bin_type=True)) - 1  # the map header's size does not change


_UINTS = {0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q")}


def metrics_seq(frame: bytes, offset: int) -> int:
    """The seq of an ``encode_metrics`` frame, read in place (``offset``: metrics_seq_offset)."""
    code = frame[offset]
    return code if code < 0x80 else _UINTS[code].unpack_from(frame, offset + 1)[0]


# --------------------------------------------------------------------- decoding

_unpackb = msgpack.unpackb
_SCALAR_TYPES = frozenset((int, float, bool))
_TEXT = frozenset((str,))
# Session ids that matched SESSION_RE: a set lookup instead of a regex per frame.
# Bounded: a flood of fresh ids only empties it.
_SESSIONS_OK: set[str] = set()
_SESSIONS_OK_MAX = 4096


class Trailing(ProtocolError):
    """A part holding more than one msgpack object (``malformed`` to ``decode_request``):
    a batch, if its first object is a seq'd frame (the receiver looks, with ``first``)."""

    def __init__(self, first: Any):
        super().__init__("malformed", "not msgpack (ExtraData)")
        self.first = first


def _unpack(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise ProtocolError("oversize", f"{len(raw)} bytes, limit {limit}")
    try:
        obj = _unpackb(raw, raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise Trailing(exc.unpacked) from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("malformed", f"not msgpack ({type(exc).__name__})") from None
    return obj


def _versioned(obj: Any) -> dict:
    if type(obj) is not dict:
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


def _int(obj: dict, name: str, lo: int, hi: int, optional: bool = False) -> int | None:
    """An integer field within [lo, hi]: nothing beyond int64 gets in, to be summed or sent back."""
    value = _field(obj, name, (int,), optional)
    if value is not None and not lo <= value <= hi:
        raise ProtocolError("bad_field", f"{name!r} must be in {lo}..{hi}")
    return value


def _text(obj: dict, name: str, limits: Limits, optional: bool = False) -> str | None:
    value = _field(obj, name, (str,), optional)
    if value is not None and len(value) > limits.max_str_len:
        raise ProtocolError("bad_field", f"{name!r} longer than {limits.max_str_len}")
    return value


def _session(obj: dict) -> str:
    session = obj.get("session")
    if type(session) is str and session in _SESSIONS_OK:
        return session
    session = _field(obj, "session", (str,))
    if not SESSION_RE.match(session):
        raise ProtocolError("bad_field", "malformed session id")
    if len(_SESSIONS_OK) >= _SESSIONS_OK_MAX:
        _SESSIONS_OK.clear()
    _SESSIONS_OK.add(session)
    return session


def _seq(obj: dict, name: str = "seq") -> int:
    value = obj.get(name)
    if type(value) is int and 1 <= value <= INT64_MAX:
        return value
    return _int(obj, name, 1, INT64_MAX)  # type: ignore[return-value]  # raises, with the reason


def check_values(values: Any, limits: Limits) -> dict[str, Scalar]:
    if type(values) is not dict:
        raise ProtocolError("bad_value", "'values' must be a map")
    if len(values) > limits.max_scalars:
        raise ProtocolError("too_many", f"{len(values)} scalars, limit {limits.max_scalars}")
    # The whole map at C speed; the loop below only runs to name what is wrong.
    if not values or (
        _SCALAR_TYPES.issuperset(map(type, values.values()))
        and _TEXT.issuperset(map(type, values))
        and all(values)
        and max(map(len, values)) <= limits.max_key_len
    ):
        return values
    for key, value in values.items():
        if type(key) is not str:  # msgpack also has binary keys: wandb.log raises on them
            raise ProtocolError("bad_value", f"key {key!r} is {type(key).__name__}, not text")
        if not key or len(key) > limits.max_key_len:
            raise ProtocolError("bad_value", f"key of length {len(key)} (1..{limits.max_key_len})")
        if type(value) not in _SCALAR_TYPES:
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
    elif type(value) is int:
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ProtocolError("bad_field", "config holds an integer beyond 64 bits")
    elif value is not None and not isinstance(value, (str, bool)):
        raise ProtocolError("bad_field", f"config holds a {type(value).__name__}")


def _config_map(obj: dict, name: str, limits: Limits) -> dict[str, Any]:
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("bad_field", f"{name!r} must be a map")
    _check_config(value, 0, limits)
    return value


def _wandb_init(opts: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise ProtocolError("bad_field", "'wandb' must be a map")
    for key, value in opts.items():
        if key not in WANDB_INIT_KEYS:
            raise ProtocolError("bad_field", f"wandb option {key!r} is not one of {WANDB_INIT_KEYS}")
        items = value if key == "tags" and isinstance(value, list) else [value]
        if not all(isinstance(v, str) and len(v) <= limits.max_str_len for v in items):
            raise ProtocolError(
                "bad_field", f"wandb option {key!r} must be text" + (" or a list of text" if key == "tags" else "")
            )
    return opts


def _process(info: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise ProtocolError("bad_field", "'process' must be a map")
    for key, value in info.items():
        if key not in PROCESS_KEYS:
            raise ProtocolError("bad_field", f"process field {key!r} is not one of {PROCESS_KEYS}")
        items = value if key == "args" and isinstance(value, list) else [value]
        if key == "args" and len(items) > MAX_ARGS:
            raise ProtocolError("bad_field", f"more than {MAX_ARGS} process args")
        if not all(isinstance(v, str) and len(v) <= limits.max_str_len for v in items):
            raise ProtocolError("bad_field", f"process field {key!r} must be text")
    return info


# The frames a client sends with a seq, and their size limits: metrics are small, a
# config or summary update may carry as much as the config in a hello.
SEQ_TYPES = ("metrics", "config", "summary", "close")


def _frame_limit(t: Any, limits: Limits) -> int:
    return limits.max_hello_bytes if t in ("hello", "config", "summary") else limits.max_frame_bytes


def decode_request(raw: bytes, limits: Limits = DEFAULT_LIMITS, spool: bool = False) -> Request | Refused:
    """Validate one incoming frame and return its message; raise ProtocolError otherwise.

    ``spool`` also admits the receiver's own ``refused`` records (reading frames.log).
    A part holding more than one object raises ``Trailing`` (a batch, to the receiver).
    """
    return decode_unpacked(_unpack(raw, limits.max_alone), len(raw), limits, spool)


def decode_part(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> MetricsFields | Request:
    """``decode_request`` for the receiver's hot path: a metrics frame comes back as its
    validated fields (``metrics_fields``' tuple), with no Metrics built; any other frame
    as its message. The same checks, the same errors.

    A metrics frame from a known session is decoded and checked by msgspec at once, where
    the sidecar's install has it (``Limits.fast_metrics``): 2.2 against 5.2 us for 14 keys.
    Whatever that schema does not take goes the long way below, which gives the error."""
    fast = limits.fast_metrics
    if fast is not None and len(raw) <= limits.max_frame_bytes:
        try:
            m = fast(raw)
        except Exception:  # msgspec's errors, and UnicodeDecodeError: the long way names them
            pass
        else:
            # a new session's id is checked (and remembered) the long way; a non-finite time refused there
            if m.session in _SESSIONS_OK and math.isfinite(m.time):
                return fields_of(m)
    obj = _unpack(raw, limits.max_alone)
    fields = metrics_fields(obj, len(raw), limits)
    if fields is not None:
        return fields
    return _decode_other(obj, len(raw), limits, False)  # type: ignore[return-value]


def decode_unpacked(obj: Any, size: int, limits: Limits = DEFAULT_LIMITS, spool: bool = False) -> Request | Refused:
    """``decode_request`` for a frame already unpacked (``size``: its length in bytes),
    as a batch's frames are: every check but msgpack's own is made here."""
    fields = metrics_fields(obj, size, limits)
    if fields is not None:
        return metrics_of(fields)
    return _decode_other(obj, size, limits, spool)


def _fast_metrics_decoder(limits: Limits) -> Callable[[bytes], Any] | None:
    """``metrics_fields``' rules as a msgspec schema, checked in C while it decodes: a
    current-version metrics frame with no field beyond the protocol's. The session's id
    and the time's finiteness are left to its callers. Stricter than the long way is
    only slower, never wrong (a frame it refuses goes the long way); never looser:
    tests/test_properties.py holds the two to the same answers. None without msgspec (a
    trainer's install has no need of it), or with one that fails ``_msgspec_sound``."""
    try:
        import msgspec
    except ImportError:
        return None
    return _metrics_schema(msgspec, limits) if _msgspec_sound(msgspec) else None


def _metrics_schema(msgspec: Any, limits: Limits) -> Callable[[bytes], Any]:
    from typing import Annotated, Literal, Optional

    meta = msgspec.Meta
    key = Annotated[str, meta(min_length=1, max_length=limits.max_key_len)]
    frame = msgspec.defstruct(
        "MetricsFrame",
        [
            ("t", Literal["metrics"]),
            ("v", Literal[PROTOCOL_VERSION]),  # type: ignore[valid-type]
            ("session", str),
            ("seq", Annotated[int, meta(ge=1, le=INT64_MAX)]),
            ("kind", Literal[KINDS]),  # type: ignore[valid-type]
            ("time", float),  # an int is taken as a float, as the long way does
            ("values", Annotated[dict[key, Scalar], meta(max_length=limits.max_scalars)]),
            ("step", Optional[Annotated[int, meta(ge=0, le=INT64_MAX)]], None),
            ("commit", Optional[bool], None),
        ],
        forbid_unknown_fields=True,  # the long way ignores them, after checking they decode
        gc=False,  # it holds no container that could refer back to it
    )
    return msgspec.msgpack.Decoder(frame).decode


@functools.lru_cache(maxsize=None)
def _msgspec_sound(msgspec: Any) -> bool:
    """Whether this msgspec enforces the schema: a frame the schema takes is stored as it
    is, and 0.18.0 did not hold map keys to min_length. Checked once, with small limits
    (the library's behaviour, not any one schema's)."""
    decode = _metrics_schema(msgspec, Limits(max_scalars=2, max_key_len=2))
    good = {"t": "metrics", "v": PROTOCOL_VERSION, "session": "canary-session", "seq": 1, "step": 1,
            "kind": KINDS[0], "time": 0.0, "values": {"k": 1.0}}  # fmt: skip
    for bad in (
        {"values": {"": 1.0}},
        {"values": {"kkk": 1.0}},
        {"values": {"a": 1.0, "b": 1.0, "c": 1.0}},
        {"values": {"k": "text"}},
        {"seq": 0},
        {"step": -1},
        {"kind": "other"},
        {"commit": 1},
        {"extra": 1},
    ):
        try:
            decode(msgpack.packb(good | bad))
        except Exception:
            continue
        return False
    return True


def fields_of(m: Any) -> MetricsFields:
    """A metrics frame's fields (``MetricsFields``) from what ``Limits.fast_metrics`` decoded."""
    return m.session, m.seq, m.step, m.kind, m.time, m.values, m.commit is not False


def metrics_of(fields: MetricsFields) -> Metrics:
    """The Metrics of fields already validated (``metrics_fields``', or a spool record's).
    A frozen dataclass's __init__ sets each field through object.__setattr__; filling its
    __dict__ at once makes the same object for a fraction of the cost (0.4 against 1.1 us)."""
    msg = _new_metrics()
    msg.__dict__.update(zip(_METRICS_FIELDS, fields), t="metrics")
    return msg


def _decode_other(obj: Any, size: int, limits: Limits, spool: bool) -> Request | Refused:
    """Every frame but a current-version metrics frame (``metrics_fields`` said no)."""
    obj = _versioned(obj)
    t = obj.get("t")
    limit = _frame_limit(t, limits)
    if size > limit:
        raise ProtocolError("oversize", f"{size} bytes, limit {limit}")
    if t == "hello":
        run_id = _field(obj, "run_id", (str,), optional=True)
        if run_id is not None and not RUN_ID_RE.match(run_id):
            raise ProtocolError("bad_field", "run_id must be 1-64 of [A-Za-z0-9_-]")
        return Hello(
            wandb=_wandb_init(obj.get("wandb") or {}, limits),
            session=_session(obj),
            project=_text(obj, "project", limits) or "",
            name=_text(obj, "name", limits, optional=True),
            run_id=run_id,
            config=_config_map(obj, "config", limits),
            pid=_int(obj, "pid", 0, PID_MAX),  # type: ignore[arg-type]
            host=_text(obj, "host", limits) or "",
            first=_seq(obj, "first"),
            process=_process(obj.get("process") or {}, limits),
        )
    if t == "config":
        return ConfigUpdate(session=_session(obj), seq=_seq(obj), values=_config_map(obj, "values", limits))
    if t == "summary":
        return SummaryUpdate(session=_session(obj), seq=_seq(obj), values=_config_map(obj, "values", limits))
    if t == "close":
        code = _int(obj, "exit_code", *EXIT_CODE_RANGE)
        return Close(session=_session(obj), seq=_seq(obj), exit_code=code)  # type: ignore[arg-type]
    if t == "ping":
        return Ping(session=_session(obj))
    if t in ("status", "stop"):
        return Control(t=t)
    if t == "refused" and spool:
        return Refused(session=_session(obj), seq=_seq(obj), reason=str(obj.get("reason", "")))
    raise ProtocolError("unknown_type", f"message type {t!r}")


_new_metrics = functools.partial(object.__new__, Metrics)
# MetricsFields' order: Metrics' fields less ``t``.
_METRICS_FIELDS = ("session", "seq", "step", "kind", "time", "values", "commit")
MetricsFields = tuple[str, int, "int | None", str, float, "dict[str, Scalar]", bool]
# Keys of ``values`` known good (non-empty, at most max_key_len long), per max_key_len: most
# frames repeat the same keys, so a subset test replaces the per-key length checks.
# Bounded: a flood of fresh keys only empties it.
_KEYS_OK: dict[int, set[str]] = {}
_KEYS_OK_MAX = 16384  # keys of up to max_key_len (256): a few MiB at most


def metrics_fields(obj: Any, size: int, limits: Limits) -> MetricsFields | None:
    """The hot path (most frames are metrics): a current-version metrics map's fields, in
    Metrics' order, validated as ``decode_unpacked`` validates them, without building the
    Metrics (the receiver's batch loop needs no object). None: not such a map (for
    ``decode_unpacked``'s general path). The checks _versioned, _session, _seq, _int and
    check_values make, in the same order, inlined; where one fails, that function is
    called to raise its error."""
    if not (
        type(obj) is dict and obj.get("t") == "metrics" and type(obj.get("v")) is int and obj["v"] == PROTOCOL_VERSION
    ):
        return None
    if size > limits.max_frame_bytes:
        raise ProtocolError("oversize", f"{size} bytes, limit {limits.max_frame_bytes}")
    get = obj.get
    kind = get("kind")
    if kind not in KINDS:
        raise ProtocolError("bad_field", f"'kind' must be one of {KINDS}")
    when = get("time")
    if type(when) is not float:
        when = float(_field(obj, "time", (float, int)))
    if not math.isfinite(when):
        raise ProtocolError("bad_field", "'time' must be finite")
    session = get("session")
    if type(session) is not str or session not in _SESSIONS_OK:
        session = _session(obj)
    seq = get("seq")
    if type(seq) is not int or not 1 <= seq <= INT64_MAX:
        seq = _seq(obj)
    step = get("step")
    if step is not None and (type(step) is not int or not 0 <= step <= INT64_MAX):
        _int(obj, "step", 0, INT64_MAX, optional=True)
    values = get("values")
    # check_values at C speed: the whole map at once; check_values itself names what is wrong
    if (
        type(values) is not dict
        or len(values) > limits.max_scalars
        or not _SCALAR_TYPES.issuperset(map(type, values.values()))
        or not _KEYS_OK.get(limits.max_key_len, _NO_KEYS).issuperset(values)
    ):
        values = check_values(values, limits)
        _keys_ok(values, limits.max_key_len)
    commit = get("commit")
    if commit is not None and type(commit) is not bool:
        raise ProtocolError("bad_field", "'commit' must be bool")
    return session, seq, step, kind, when, values, commit is not False


_NO_KEYS: frozenset[str] = frozenset()


def _keys_ok(values: dict[str, Scalar], max_key_len: int) -> None:
    """Remember the keys of a ``values`` map that passed check_values (for metrics_fields)."""
    known = _KEYS_OK.setdefault(max_key_len, set())
    if len(known) + len(values) > _KEYS_OK_MAX:
        known.clear()
    known.update(values)


def peek_seq(raw: bytes) -> tuple[str, int] | None:
    """(session, seq) of a frame that failed validation, if those two fields are sound:
    the receiver can then refuse exactly that frame and let the stream go on."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        if isinstance(obj, dict) and obj.get("t") in SEQ_TYPES:
            return _session(obj), _seq(obj)
    except Exception:
        pass
    return None


def decode_response(raw: bytes) -> Response:
    """Decode a sidecar reply on the client side. Raises ProtocolError."""
    obj = _versioned(_unpack(raw, 16 * 1024 * 1024))
    t = obj.get("t")
    if t == "ack":
        return Ack(session=_session(obj), seq=_field(obj, "seq", (int,)))
    if t == "nack":
        return Nack(session=_session(obj), seq=_field(obj, "seq", (int,)))
    if t == "welcome":
        batch = obj.get("batch")
        return Welcome(
            session=_session(obj),
            run_id=_field(obj, "run_id", (str,)),
            acked=_field(obj, "acked", (int,)),
            batch=batch if type(batch) is int and batch > 0 else 0,  # an older sidecar: none
        )
    if t == "error":
        seq = obj.get("seq")
        return Error(
            session=_field(obj, "session", (str,), optional=True),
            reason=_field(obj, "reason", (str,)),
            fatal=bool(obj.get("fatal")),
            code=obj.get("code") if isinstance(obj.get("code"), str) else "",
            seq=seq if type(seq) is int else None,
        )
    if t == "reply":
        return Reply(body=_field(obj, "body", (dict,)))
    raise ProtocolError("unknown_type", f"reply type {t!r}")
