"""kforge-sidecar client: the only part a trainer imports (pyzmq and msgpack, nothing heavy)."""

from .address import resolve_address
from .backend import SidecarBackend
from .metrics_client import ClientStats, MetricsClient

__all__ = ["MetricsClient", "ClientStats", "SidecarBackend", "resolve_address"]
