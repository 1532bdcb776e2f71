"""What the framework adapters share (no framework imported here)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..metrics_client import MetricsClient


def open_or_update(
    client: MetricsClient | None, make: Callable[[Any], MetricsClient], config: Any, values: Mapping[str, Any] | None
) -> MetricsClient:
    """The client, with ``values`` merged into the run's config.

    A client not yet started gets them in its hello (``config``, beside the
    adapter's own ``config``): the sidecar keeps the hello's config with the
    run, so every wandb segment of it (a resume's rewind, an uploader restart,
    ``sync``) starts with them. Later values go through ``update_config``.
    """
    if client is None:
        if values and (config is None or isinstance(config, Mapping)):
            return make({**(config or {}), **values})
        client = make(config)
    if values:
        client.update_config(values)
    return client
