"""What the framework adapters share (no framework imported here)."""

from __future__ import annotations

import atexit
import sys
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


# ----------------------------------------------------------- closing the run at exit

_uncaught: list[BaseException] = []  # an uncaught exception is ending the interpreter
_hooked = False


def _note_uncaught(previous: Callable[..., Any]) -> Callable[..., Any]:
    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        _uncaught.append(exc)
        previous(exc_type, exc, tb)

    return hook


def close_at_exit(close: Callable[[int], Any]) -> None:
    """Call ``close(exit_code)`` when the interpreter exits: 1 after an uncaught
    exception, else 0, as wandb finishes an in-process run.

    The frameworks call their "end" hook after every stage (Lightning's
    ``finalize`` after ``fit`` and again after ``test``; Transformers'
    ``on_train_end`` before an ``evaluate()``). Closing the run there would make
    the next stage a new session of a finished run, whose first row, at the
    same step as the last one, the sidecar would take for a resume from an
    earlier checkpoint and rewind over. So a run that did not fail stays open
    until the process ends (or the adapter's ``close()``), in one session.
    """
    global _hooked
    if not _hooked:
        _hooked = True
        sys.excepthook = _note_uncaught(sys.excepthook)
    atexit.register(lambda: close(1 if _uncaught else 0))
