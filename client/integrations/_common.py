"""What the framework adapters share (no framework imported here).

Why the adapters' clients use ``finish_at_exit``: the frameworks call their "end"
hook after every stage (Lightning's ``finalize`` after ``fit`` and again after
``test``; Transformers' ``on_train_end`` before an ``evaluate()``). Closing the
run there would make the next stage a new session of a finished run, whose
first row, at the same step as the last one, the sidecar would take for a
resume from an earlier checkpoint and rewind over. So a run that did not fail
stays open, in one session, until the process ends (or the adapter's
``close()``); then the client finishes it, with exit code 1 after an uncaught
exception, as in-process wandb does.
"""

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
