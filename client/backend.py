"""SidecarBackend: a drop-in for KempnerForge's in-process ``WandBBackend``.

Same shape as KempnerForge's ``_LoggingBackend`` (``log(metrics, step)``,
``close()``, plus ``log_eval`` and ``mark_preempting``), built from its
``MetricsConfig`` (duck-typed: ``wandb_project``, ``wandb_run_name``,
``wandb_run_id`` and an optional ``sidecar_address``).

Like the seed's backend it is lazy: constructing it does no I/O and starts no
thread. The ``MetricsClient`` is created on the first ``log()``, after
distributed setup and checkpoint resume, so a ``wandb_run_id`` restored from
the checkpoint's extra dict is the one the client asks for. The run ID goes
back into ``config.wandb_run_id`` on that first ``log()``: the client mints it
at once. The training loop then puts it into ``ckpt_extra["wandb_run_id"]``,
as it did with the seed's backend.

Nothing here raises into the caller. Non-zero ranks (``$RANK``) get an inert
client. A backend inherited through ``fork()`` before its first ``log()`` stays
silent in the child (one created after is made inert by the client itself).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import protocol
from .metrics_client import MetricsClient

log = logging.getLogger("kforge_sidecar.backend")

DEFAULT_PROJECT = "kempnerforge"
CLOSE_RUN_ID_WAIT = 2.0  # seconds close() waits for a run ID it does not know yet


class SidecarBackend:
    """KempnerForge logging backend that hands metrics to the local kforge-sidecar.

    Args:
        metrics_config: KempnerForge's ``MetricsConfig`` or any object with
            ``wandb_project`` (None or missing: "kempnerforge"), ``wandb_run_name``,
            ``wandb_run_id`` and optionally ``sidecar_address``. ``wandb_run_id``
            is written back on it once known.
        config: the run config for wandb (a dict, or a dataclass such as
            KempnerForge's JobConfig; the client makes it JSON-shaped on first log).
        **client_kwargs: passed to ``MetricsClient`` (e.g. ``buffer_size``,
            ``rank``, ``address``); they override what the config gives.
    """

    def __init__(self, metrics_config: Any, config: Any = None, **client_kwargs: Any) -> None:
        self._config = metrics_config
        self._run_config = config
        self._client_kwargs = client_kwargs
        self._client: MetricsClient | None = None
        self._failed = False  # the seed's sentinel: tried to start the client and could not
        self._id_written = False
        self._closed = False
        self._close_result = True  # what close() returned, for a repeated close()
        self._pid = os.getpid()

    # ----------------------------------------------------------- _LoggingBackend

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's scalars. Never blocks, never raises."""
        self._log("train", metrics, step)

    def log_eval(self, metrics: dict[str, float], step: int) -> None:
        """Queue evaluation scalars for ``step`` (same rules as ``log``)."""
        self._log("eval", metrics, step)

    def _log(self, kind: str, metrics: dict[str, float], step: int) -> None:
        client = self._client if self._client is not None else self._ensure_client()
        if client is None:
            return
        (client.log if kind == "train" else client.log_eval)(metrics, step)
        if not self._id_written:
            self._write_back()

    def mark_preempting(self) -> None:
        """KempnerForge calls this on SIGTERM. Frames are already on their way to
        the sidecar, and a run closed now is re-opened by the resumed job, so
        this only records the run ID, if known. Never blocks."""
        if self._client is not None and not self._id_written:
            self._write_back()

    def close(self, timeout: float = 10.0, exit_code: int = 0) -> bool:
        """Send what is buffered and finish the run; returns within ``timeout``.

        True when the sidecar confirmed it has every frame and the close, or when
        there was nothing to send (nothing logged, or an inert client). A second
        call returns the first one's answer at once.
        """
        client = self._client
        if self._closed or client is None:
            self._closed = True
            return self._close_result
        self._closed = True
        self._close_result = False
        try:
            deadline = time.monotonic() + max(float(timeout), 0.0)
            if not self._id_written and not client.inert:  # an inert client never learns one
                client.wait_run_id(min(CLOSE_RUN_ID_WAIT, max(float(timeout), 0.0)))
                self._write_back()
            done = client.close(timeout=max(deadline - time.monotonic(), 0.0), exit_code=exit_code)
            if not self._id_written:
                self._write_back()  # the welcome may have come during close()
            self._close_result = bool(done)
            return self._close_result
        except Exception:
            log.warning("kforge-sidecar backend: close() failed", exc_info=True)
            return False

    # ----------------------------------------------------------- extras

    @property
    def run_id(self) -> str | None:
        """The run ID once the sidecar has answered (or the one passed in)."""
        client = self._client
        return client.run_id if client is not None else None

    @property
    def client(self) -> MetricsClient | None:
        """The underlying client; None until the first log()."""
        return self._client

    # ----------------------------------------------------------- internals

    def _ensure_client(self) -> MetricsClient | None:
        """Start the client on first use. The slow path: runs until it succeeds or fails once."""
        if self._failed or self._closed:
            return None
        if os.getpid() != self._pid:
            # Inherited through fork() before the parent ever logged (a DataLoader
            # worker, say): the child must not open its own run.
            self._failed = True
            return None
        try:
            cfg = self._config
            kwargs: dict[str, Any] = {
                "project": getattr(cfg, "wandb_project", None) or DEFAULT_PROJECT,
                "name": getattr(cfg, "wandb_run_name", None) or None,
                "run_id": str(getattr(cfg, "wandb_run_id", None) or "") or None,
                "config": self._run_config,  # the client makes it JSON-shaped
                "address": getattr(cfg, "sidecar_address", None) or None,
            }
            kwargs.update(self._client_kwargs)
            run_id = kwargs.get("run_id")
            if run_id is not None and not protocol.RUN_ID_RE.match(run_id):
                # resume="allow" semantics: an unusable ID starts a fresh run, it does not stop logging
                log.warning(
                    "kforge-sidecar backend: restored run ID %r is not a valid run ID; starting a new run", run_id
                )
                kwargs["run_id"] = None
            self._client = MetricsClient(**kwargs)
        except Exception as exc:
            log.warning("kforge-sidecar backend: could not start the metrics client: %s", exc)
            self._failed = True
            return None
        return self._client

    def _write_back(self) -> None:
        try:
            client = self._client
            run_id = client.run_id if client is not None else None
            if run_id is not None:
                self._id_written = True
                if getattr(self._config, "wandb_run_id", None) != run_id:
                    self._config.wandb_run_id = run_id
        except Exception:
            self._id_written = True  # a read-only config: do not retry on every step
            log.warning("kforge-sidecar backend: could not write the run ID back into the config", exc_info=True)
