"""Device scalars without host synchronisation: CUDA tensors in ``log()``.

``tensor.item()`` on a CUDA tensor makes the CPU wait until the GPU has run
everything queued before it; the launch queue drains and the next step starts
on an idle GPU. Here the step loop never waits:

1. ``log()`` gathers the call's device values into one small tensor per
   kind (floats as float64, integers and bools as int64: exact, and bf16/f16
   as ``float()`` gives them), on the caller's current stream;
2. copies it with ``non_blocking=True`` into a slot of a pinned host buffer
   allocated once per device, and records an event on that stream;
3. the client's sender thread packs the frame only once ``event.query()``
   says the copy is done, and sends it in its place: frames keep their order.

The pinned buffer has ``SLOTS`` slots. When every slot is in flight (the GPU
runs far behind the CPU), ``log()`` still does not wait: that call's device
values are dropped and counted (``stats().device_dropped``), said once. Inside
a CUDA graph capture nothing can be staged: the call's device values are
dropped the same way. torch is imported only when a caller passes a tensor.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("kforge_sidecar.client")

SLOTS = 1024  # calls in flight per device before device values are dropped
WIDTH = 64  # values per slot; a call with more takes several slots


class Exhausted(Exception):
    """No free slot: the GPU is far behind."""


class _Ring:
    """One device's pinned slots (float64 and int64 rows) and their events, allocated once."""

    def __init__(self, torch: Any, device: Any):
        pinned = device.type == "cuda"
        self.torch = torch
        self.device = device
        self.floats = torch.zeros((SLOTS, WIDTH), dtype=torch.float64, pin_memory=pinned)
        self.ints = torch.zeros((SLOTS, WIDTH), dtype=torch.int64, pin_memory=pinned)
        self.events = [torch.cuda.Event() if pinned else None for _ in range(SLOTS)]
        self.free = list(range(SLOTS))  # list.pop/append are atomic: log() takes, the sender gives back

    def take(self, n: int) -> list[int]:
        need = max(1, -(-n // WIDTH))
        if len(self.free) < need:
            raise Exhausted
        return [self.free.pop() for _ in range(need)]


class Staging:
    """Per client: the rings of every device it has seen."""

    def __init__(self) -> None:
        self._rings: dict[Any, _Ring] = {}
        self._lock = threading.Lock()  # ring creation only; never held by log() otherwise
        self.dropped = 0  # values dropped: no free slot, or inside a CUDA graph capture
        self._warned = False

    def ring(self, torch: Any, device: Any) -> _Ring:
        ring = self._rings.get(device)
        if ring is None:
            with self._lock:
                ring = self._rings.setdefault(device, _Ring(torch, device))
        return ring

    def stage(self, tensors: dict[Any, Any]) -> "Staged | None":
        """Start the copies of ``{key: 0-d or 1-element device tensor}`` (key None: the step).
        None when nothing could be staged (counted)."""
        import torch

        by_device: dict[Any, dict[Any, Any]] = {}
        for key, t in tensors.items():
            by_device.setdefault(t.device, {})[key] = t
        parts = []
        try:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise Exhausted("inside a CUDA graph capture")
            for device, group in by_device.items():
                parts.append(_stage_device(torch, self.ring(torch, device), group))
        except Exhausted as exc:
            for p in parts:
                p.release()
            self._drop(len(tensors), str(exc) or "every pinned slot is in flight (the GPU is far behind)")
            return None
        return Staged(parts)

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if not self._warned:
            self._warned = True
            log.warning(
                "kforge-sidecar client: dropping device values of a log() call: %s; log() never waits for the "
                "GPU (counted in stats().device_dropped; said once)", why,
            )  # fmt: skip


class _Part:
    """One device's share of a call: keys, the slots their values land in, the events."""

    __slots__ = ("ring", "float_keys", "int_keys", "bool_keys", "slots", "keep")

    def __init__(self, ring: _Ring, float_keys: list, int_keys: list, bool_keys: set, slots: list[int], keep: Any):
        self.ring, self.float_keys, self.int_keys, self.bool_keys = ring, float_keys, int_keys, bool_keys
        self.slots: list[int] | None = slots
        self.keep = keep  # the gathered device tensors, alive until their copies are done

    def ready(self) -> bool:
        slots = self.slots
        return slots is None or all(e is None or e.query() for e in (self.ring.events[s] for s in slots))

    def read(self, into: dict) -> None:
        ring, slots = self.ring, self.slots
        assert slots is not None
        nf = -(-len(self.float_keys) // WIDTH)
        floats = [x for s in slots[:nf] for x in ring.floats[s].tolist()]
        ints = [x for s in slots[nf:] for x in ring.ints[s].tolist()]
        into.update(zip(self.float_keys, floats))
        for key, v in zip(self.int_keys, ints):
            into[key] = bool(v) if key in self.bool_keys else v

    def release(self) -> None:
        slots, self.slots, self.keep = self.slots, None, None
        if slots:
            self.ring.free.extend(slots)


def _stage_device(torch: Any, ring: _Ring, group: dict[Any, Any]) -> _Part:
    floats = {k: t for k, t in group.items() if t.is_floating_point()}
    ints = {k: t for k, t in group.items() if not t.is_floating_point()}
    bool_keys = {k for k, t in ints.items() if t.dtype == torch.bool}
    nf, ni = len(floats), len(ints)
    slots = ring.take(-(-nf // WIDTH) * WIDTH + ni if ni else nf)
    keep = []
    stream = torch.cuda.current_stream(ring.device) if ring.device.type == "cuda" else None
    k = 0  # the next slot
    for values, rows, dtype, n in ((floats, ring.floats, torch.float64, nf), (ints, ring.ints, torch.int64, ni)):
        if not n:
            continue
        # one gather per kind on the caller's stream (stack and cat promote dtypes; the widening is exact)
        tensors = list(values.values())
        try:
            src = torch.stack(tensors).to(dtype)  # all 0-d: the common case
        except RuntimeError:
            src = torch.cat([t.reshape(1) for t in tensors]).to(dtype)  # some 1-element tensors
        keep.append(src)
        for start in range(0, n, WIDTH):
            m = min(WIDTH, n - start)
            rows[slots[k]][:m].copy_(src[start : start + m], non_blocking=stream is not None)
            k += 1
    if stream is not None:
        for s in slots:
            ring.events[s].record(stream)
    return _Part(ring, list(floats), list(ints), bool_keys, slots, keep)


class Staged:
    """One ``log()`` call's device values on their way to host memory."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[_Part]):
        self.parts = parts

    def ready(self) -> bool:
        return all(p.ready() for p in self.parts)

    def read(self) -> dict:
        """The values (key None: the step), once ``ready()``; frees the slots."""
        out: dict = {}
        for p in self.parts:
            p.read(out)
            p.release()
        return out

    def release(self) -> None:
        for p in self.parts:
            p.release()

    def __del__(self) -> None:  # dropped unread (a full client buffer): give the slots back
        self.release()


# Tests set this to drive CPU tensors through the staged path (no pinned memory, no events).
STAGE_CPU = False


def is_device_tensor(value: Any) -> bool:
    """A CUDA tensor, told without importing torch: ``.item()`` on it would sync."""
    device = getattr(value, "device", None)
    kind = getattr(device, "type", None)
    return (kind == "cuda" or (STAGE_CPU and kind == "cpu")) and type(value).__module__.startswith("torch")
