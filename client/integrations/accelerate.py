"""HF Accelerate: a ``GeneralTracker`` that hands ``accelerator.log`` to the local kforge-sidecar.

    from client.integrations.accelerate import SidecarTracker

    accelerator = Accelerator(log_with=[SidecarTracker(project="my-project")])
    accelerator.init_trackers("my-project", config={"lr": lr})   # the config becomes the run's config
    accelerator.log({"loss": loss}, step=step)                   # step may be None: wandb's next step
    accelerator.end_training()                                   # finishes the run (exit code 0)

A thin layer over ``client.MetricsClient``: ``store_init_configuration``
starts the client with that config (the first ``log`` starts it if there is
none), ``log`` is ``log``, ``finish`` is ``close``. A run that never reaches
``end_training()`` is finished when the process exits (exit code 1 after an
uncaught exception). ``tracker`` is the ``MetricsClient``. Accelerate gives
a custom tracker's constructor the project, not ``init_trackers``: the
``project_name`` passed there is not used. It imports only ``accelerate``.

To continue a run after a resume, pass the run ID back: keep ``tracker.run_id``
with your checkpoint (``accelerator.save_state`` / ``load_state`` through
``accelerator.register_for_checkpointing(tracker)``, which uses ``state_dict``
and ``load_state_dict`` here, restores it as long as it is loaded before
``init_trackers``) or pass ``SidecarTracker(run_id=...)``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from accelerate.tracking import GeneralTracker

from ..metrics_client import MetricsClient
from ._common import open_or_update

log = logging.getLogger("kforge_sidecar.accelerate")

__all__ = ["SidecarTracker"]


class SidecarTracker(GeneralTracker):
    """Accelerate tracker over ``client.MetricsClient``.

    Args:
        project, name, run_id, config, address: as for ``MetricsClient``.
        close_timeout: how long ``finish`` may wait for the sidecar (seconds).
        **client_kwargs: passed to ``MetricsClient`` (``wandb_init``, ``buffer_size``, ``rank``, ...).
    """

    name = "kforge-sidecar"
    requires_logging_directory = False
    main_process_only = True

    def __init__(
        self,
        project: str = "accelerate",
        name: str | None = None,
        run_id: str | None = None,
        config: Any = None,
        address: str | None = None,
        *,
        close_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        self.project = project
        self.run_name = name
        self.run_id = run_id
        self.address = address
        self.close_timeout = close_timeout
        self._config = config
        self._client_kwargs = client_kwargs
        self._client: MetricsClient | None = None
        self.last_close: bool | None = None  # what finish()'s close returned

    # ----------------------------------------------------------- GeneralTracker

    def start(self) -> None:
        # The client starts at store_init_configuration (so that the config goes
        # into its hello) or at the first log, whichever comes first.
        pass

    @property
    def tracker(self) -> MetricsClient:
        """The run's ``MetricsClient``."""
        return self._ensure_client()

    def store_init_configuration(self, values: Mapping[str, Any]) -> None:
        self._ensure_client(dict(values))

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self._ensure_client().log(values, step=step)

    def finish(self) -> None:
        self.close()

    # ----------------------------------------------------------- extras

    def close(self, timeout: float | None = None, exit_code: int = 0) -> bool:
        """Finish the run (``exit_code`` 1 shows it failed); a later log re-opens the same run."""
        client = self._client
        if client is None:
            return True
        self._client = None
        self.last_close = client.close(timeout=self.close_timeout if timeout is None else timeout, exit_code=exit_code)
        return self.last_close

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        restored = state_dict.get("run_id")
        if restored and restored != self.run_id:
            if self._client is not None:
                log.warning("kforge-sidecar: run %r is already open; not continuing run %r", self.run_id, restored)
            else:
                self.run_id = restored

    # ----------------------------------------------------------- internals

    def _ensure_client(self, config: Mapping[str, Any] | None = None) -> MetricsClient:
        """The client (started on first use), with ``config`` merged into the run's config."""
        if self._client is None or config:
            self._client = open_or_update(self._client, self._make_client, self._config, config)
            if self._client.run_id is not None:
                self.run_id = self._client.run_id
        return self._client

    def _make_client(self, config: Any) -> MetricsClient:
        kwargs = dict(self._client_kwargs)
        if "rank" not in kwargs:
            from accelerate.state import PartialState  # set up by the Accelerator by now

            kwargs["rank"] = PartialState().process_index
        return MetricsClient(
            finish_at_exit=True,  # finished at process exit: 1 after an uncaught exception
            project=self.project,
            name=self.run_name,
            run_id=self.run_id,
            config=config,
            address=self.address,
            **kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state
