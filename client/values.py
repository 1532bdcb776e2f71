"""What ``log()`` accepts and how it is made to fit the wire: one place for the client.

The sidecar's limits (``protocol.Limits``) are checked here, before a frame is
queued, so the client never produces a frame the sidecar would refuse:

- keys: text of 1..``max_key_len`` characters. Other keys are made text
  (``str(key)``); a longer one keeps its head and gets a hash of the whole as
  its tail, so two long keys stay two keys. One warning per key.
- values: what wandb stores for a scalar, stored the way wandb stores it
  (README, "What gets logged"): bool, int (beyond 64 bits: the float wandb
  would store), float (NaN and ±inf included), numpy scalars, 0-d torch
  tensors of any dtype, anything with ``__float__`` that is a real number.
  Anything else is dropped with one warning per key.
- a step with more keys, or more bytes, than one frame holds is split into
  several frames of the same step; wandb merges them into one row.
- the run config (and config or summary updates) is made JSON-shaped and,
  past ``max_hello_bytes``, trimmed: its largest parts are replaced by a
  short note, with one warning, so the run itself is never refused.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any, Callable, Iterator

import msgpack

from . import protocol

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Bytes one key-value pair can take at most in a packed frame: a key of
# max_key_len characters of up to 4 UTF-8 bytes, its header, a float64.
_ENTRY_MAX = 4 * protocol.DEFAULT_LIMITS.max_key_len + 5 + 9
_FRAME_OVERHEAD = 256  # v, t, session, seq, step, kind, time and their keys
# Frames below this many keys cannot reach max_frame_bytes whatever their keys.
SAFE_KEYS = min(
    protocol.DEFAULT_LIMITS.max_scalars,
    (protocol.DEFAULT_LIMITS.max_frame_bytes - _FRAME_OVERHEAD) // _ENTRY_MAX,
)

Warn = Callable[..., None]  # (key, why, dropped=True): the client's one-warning-per-key


def short_key(key: str, limit: int) -> str:
    """A key cut to ``limit`` characters, unique per original key."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"{key[: limit - 9]}~{digest}"


def normal_key(key: Any, warn: Warn, limits: protocol.Limits = protocol.DEFAULT_LIMITS) -> str | None:
    """The key as it goes on the wire, or None (dropped, warned)."""
    if type(key) is not str:
        if isinstance(key, bytes):
            return warn(repr(key), "metric names must be text, not bytes")
        text = str(key)
        warn(repr(key), f"metric name is a {type(key).__name__}; logged as {text!r}", dropped=False)
        key = text
    if not key:
        return warn(key, "empty metric name")
    if len(key) > limits.max_key_len:
        short = short_key(key, limits.max_key_len)
        warn(key, f"metric name longer than {limits.max_key_len} characters; logged as {short!r}", dropped=False)
        return short
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: msgpack cannot carry it
        fixed = key.encode("utf-8", "backslashreplace").decode("utf-8")
        warn(key, f"metric name is not valid Unicode; logged as {fixed!r}", dropped=False)
        return normal_key(fixed, warn, limits)
    return key


def scalar(key: str, value: Any, warn: Warn) -> int | float | bool | None:
    """The value as wandb would store it, or None (dropped, warned)."""
    t = type(value)
    if t is float or t is bool:
        return value
    if t is int:
        return value if INT64_MIN <= value <= INT64_MAX else _big_int(key, value, warn)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):  # numpy ints, IntEnum, ...
        if getattr(value, "dtype", None) is not None and str(value.dtype) == "bool":
            return bool(value)
        v = int(value)
        return v if INT64_MIN <= v <= INT64_MAX else _big_int(key, v, warn)
    if isinstance(value, numbers.Real):  # numpy floats of every width, Fraction, Decimal
        try:
            return float(value)
        except (OverflowError, ValueError) as exc:
            return warn(key, f"{t.__name__} does not fit a float ({exc})")
    item = getattr(value, "item", None)  # 0-d torch tensors and numpy arrays, numpy bool_
    if item is not None and getattr(value, "ndim", None) == 0:
        if getattr(value, "is_complex", lambda: False)():
            return warn(key, "complex tensor is not a scalar wandb can chart")
        try:
            v = item()  # a CUDA tensor synchronises here (issue: log without host syncs)
        except Exception as exc:
            return warn(key, f"item() failed: {exc}")
        if isinstance(v, numbers.Number):  # Python's, or numpy's from an object array
            return scalar(key, v, warn)
        return warn(key, f"item() gave a {type(v).__name__}")
    if isinstance(value, complex):
        return warn(key, "complex is not a scalar wandb can chart")
    shape = getattr(value, "shape", None)
    what = f"{t.__name__} of shape {tuple(shape)}" if shape is not None else t.__name__
    return warn(key, f"{what} is not a scalar")


def device_scalar(key: str, value: Any, warn: Warn) -> bool:
    """A device tensor that can be staged (one real or integer element), else warned."""
    try:
        if value.numel() != 1:
            warn(key, f"tensor of shape {tuple(value.shape)} is not a scalar")
            return False
        if value.dtype.is_complex:
            warn(key, "complex tensor is not a scalar wandb can chart")
            return False
    except Exception as exc:
        warn(key, f"unreadable tensor: {exc}")
        return False
    return True


def _big_int(key: str, value: int, warn: Warn) -> float | None:
    # wandb stores an integer beyond int64 as a float64 (checked: 2**70 -> 1.1805916207174113e+21)
    try:
        return float(value)
    except OverflowError:
        return warn(key, f"integer of {value.bit_length()} bits does not fit a float")


def chunks(values: dict[str, Any], limits: protocol.Limits = protocol.DEFAULT_LIMITS) -> Iterator[dict[str, Any]]:
    """Split one step's values into maps that each fit one metrics frame."""
    budget = limits.max_frame_bytes - _FRAME_OVERHEAD
    part: dict[str, Any] = {}
    size = 0
    for key, value in values.items():
        n = len(key.encode("utf-8")) + 5 + 9
        if part and (len(part) >= limits.max_scalars or size + n > budget):
            yield part
            part, size = {}, 0
        part[key] = value
        size += n
    if part or not values:
        yield part


# ------------------------------------------------------------------ config


def packed_size(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


def fit_config(config: dict[str, Any], budget: int) -> tuple[dict[str, Any], list[str]]:
    """``config`` (JSON-shaped) within ``budget`` packed bytes.

    Returns the config and the paths it trimmed. Trimming descends into the
    largest part until one subtree alone is worth cutting, so one huge list
    (a vocabulary, a file list) goes and the fields beside it stay.
    """
    if packed_size(config) <= budget:
        return config, []
    trimmed: list[str] = []
    config = dict(config)
    while packed_size(config) > budget:
        excess = packed_size(config) - budget
        if not _trim(config, excess, "", trimmed):
            break
    return config, trimmed


def _note(size: int) -> str:
    return f"<trimmed by kforge-sidecar: {size} bytes>"


def _trim(node: dict | list, excess: int, path: str, trimmed: list[str]) -> bool:
    """Cut at least ``excess`` bytes out of ``node`` (in place) if one part can; else its
    largest part. False if nothing is left that a note would shrink."""
    if not node:
        return False
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    sizes = {k: packed_size(node[k]) for k in keys}
    biggest = max(keys, key=lambda k: sizes[k])
    child = node[biggest]
    where = f"{path}.{biggest}" if path else str(biggest)
    # Descend while one part of the biggest part could cover the excess alone: the
    # vocabulary inside "model" goes, "model.dim" beside it stays.
    if isinstance(child, (dict, list)) and child and _largest_part(child) >= excess:
        child = dict(child) if isinstance(child, dict) else list(child)
        node[biggest] = child
        return _trim(child, excess, where, trimmed)
    note = _note(sizes[biggest])
    if sizes[biggest] <= packed_size(note):
        return False
    node[biggest] = note
    trimmed.append(where)
    return True


def _largest_part(node: dict | list) -> int:
    items = node.values() if isinstance(node, dict) else node
    return max((packed_size(v) for v in items), default=0)


def json_config(config: Any) -> dict[str, Any]:
    """A config as JSON-shaped data (dataclasses, enums, dtypes, NaN...); raises ValueError
    when it is not a mapping at all."""
    shaped = protocol.jsonable(config if config is not None else {})
    if not isinstance(shaped, dict):
        raise ValueError(f"config must be a mapping or a dataclass, not {type(config).__name__}")
    return _bound_ints(shaped)


def _bound_ints(value: Any) -> Any:
    # The sidecar refuses integers beyond 64 bits in a config: store them as text.
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return str(value)
    if isinstance(value, dict):
        return {k: _bound_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bound_ints(v) for v in value]
    return value
