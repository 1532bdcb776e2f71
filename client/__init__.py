"""kforge-sidecar client: the only part a trainer imports (pyzmq and msgpack, nothing heavy)."""

from .address import resolve_address
from .metrics_client import ClientStats, MetricsClient

__all__ = ["MetricsClient", "ClientStats", "resolve_address"]
