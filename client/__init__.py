"""kforge-sidecar client: the only part a trainer imports (pyzmq and msgpack, nothing heavy).

The public names load on first use (PEP 562): the sidecar's processes import only
``client.protocol``, and each uploader would otherwise pay for pyzmq's asyncio
and the whole sender at start (about 90 ms of a 2-core machine's CPU).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .address import resolve_address
    from .backend import SidecarBackend
    from .metrics_client import ClientStats, MetricsClient

__all__ = ["MetricsClient", "ClientStats", "SidecarBackend", "resolve_address"]

_HOME = {
    "MetricsClient": "metrics_client",
    "ClientStats": "metrics_client",
    "SidecarBackend": "backend",
    "resolve_address": "address",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)  # the public names, not this module's helpers
