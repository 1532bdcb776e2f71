"""PyTorch Lightning: a ``Logger`` that hands metrics to the local kforge-sidecar.

    from client.integrations.lightning import SidecarLogger

    logger = SidecarLogger(project="my-project")
    trainer = Trainer(logger=logger, callbacks=[logger])   # callbacks: the run ID rides in the checkpoint
    trainer.fit(model, ckpt_path=ckpt)                     # a resume continues the same wandb run

A thin layer over ``client.MetricsClient``: ``log_metrics`` is ``log`` (with
Lightning's step), ``log_hyperparams`` goes into the run's config (in the
client's hello when it is the first call, else ``update_config``), and
``finalize("failed")`` is ``close(exit_code=1)``. Any other ``finalize`` keeps
the run open for the next stage (a ``trainer.test`` after ``fit``, in the same
session: a new session of a finished run whose first row is at the run's last
step would be taken for a resume and rewound over); the run is finished when
the process exits (exit code 1 after an uncaught exception), or by ``close()``. It imports
only Lightning (``lightning``, else the older ``pytorch_lightning`` package).

The run ID travels in the checkpoint through what Lightning restores: a
``Callback``'s ``state_dict``/``load_state_dict``. Lightning saves and restores
no state for loggers, so ``SidecarLogger`` is both: pass it as the logger and in
``callbacks``. Lightning restores callbacks after ``setup`` and before the first
hyperparameter or metric is logged, so the client is created lazily, after the
restore: ``experiment`` is a lazy handle, and ``version`` is ``""`` until the
fit starts (``on_fit_start``) or the first log, then the run ID. A
``ModelCheckpoint`` without ``dirpath`` therefore resolves its directory to
``<root>/<project>/checkpoints``, the same for a fresh and a resumed job (and
``ckpt_path="last"`` finds it). Without ``callbacks=[logger]``, logging works
but a resumed job starts a new run unless ``run_id=`` is passed.

Rank zero only: other ranks get an inert client, and Lightning's
``rank_zero_only`` keeps them from calling it at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any, Mapping

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers.logger import Logger
    from lightning.pytorch.utilities import rank_zero_only
except ImportError:  # the standalone package (pip install pytorch-lightning)
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    from pytorch_lightning.loggers.logger import Logger  # type: ignore[no-redef]
    from pytorch_lightning.utilities import rank_zero_only  # type: ignore[no-redef]

from ..metrics_client import MetricsClient
from ._common import open_or_update

log = logging.getLogger("kforge_sidecar.lightning")

__all__ = ["SidecarLogger"]


class _LazyClient:
    """What ``logger.experiment`` returns: the ``MetricsClient``, created on first use.

    Lightning touches ``logger.experiment`` during ``setup``, before it restores
    callbacks from a checkpoint; creating the client there would open a run
    before the checkpoint's run ID is known.
    """

    def __init__(self, logger: "SidecarLogger") -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger._ensure_client(), name)

    def __repr__(self) -> str:
        return f"<lazy MetricsClient of {self._logger!r}>"


class SidecarLogger(Logger, Callback):
    """Lightning logger (and callback) over ``client.MetricsClient``.

    Args:
        project, name, run_id, config, address: as for ``MetricsClient``. ``run_id``
            continues a known run (it wins over one restored from a checkpoint).
            Lightning's ``logger.name`` is the project, as for its WandbLogger.
        prefix: prepended to every metric key (``prefix/key``), as Lightning's loggers do.
        close_timeout: how long ``finalize`` may wait for the sidecar (seconds).
        **client_kwargs: passed to ``MetricsClient`` (``wandb_init``, ``buffer_size``, ...).
    """

    LOGGER_JOIN_CHAR = "/"

    def __init__(
        self,
        project: str = "lightning",
        name: str | None = None,
        run_id: str | None = None,
        config: Any = None,
        address: str | None = None,
        *,
        prefix: str = "",
        close_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        self._project = project
        self._name = name
        self._run_id = run_id
        self._explicit_run_id = run_id is not None
        self._config = config
        self._address = address
        self._prefix = prefix
        self._close_timeout = close_timeout
        self._rank = client_kwargs.pop("rank", None)
        self._client_kwargs = client_kwargs
        self._client: MetricsClient | None = None
        self._fit_started = False
        self.last_close: bool | None = None  # what the last finalize()'s close returned

    # ----------------------------------------------------------- Logger

    @property
    def name(self) -> str:
        """The project, as for Lightning's WandbLogger (the run's name is ``run_name``)."""
        return self._project

    @property
    def run_name(self) -> str | None:
        return self._name

    @property
    def version(self) -> str:
        """The run ID; ``""`` until the fit has started (the checkpoint may still bring one).

        Reading it never re-opens a run that ``finalize`` closed: a session opened
        and never closed would end the run as failed.
        """
        if self._run_id is None and self._client is None and self._fit_started and rank_zero_only.rank == 0:
            self._ensure_client()
        return self._run_id or ""

    @property
    def save_dir(self) -> str | None:
        return None

    @property
    def experiment(self) -> Any:
        """The run's ``MetricsClient`` (created on first use, after any checkpoint restore)."""
        return _LazyClient(self)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def client(self) -> MetricsClient | None:
        """The underlying client; None until the first log (or after ``finalize``)."""
        return self._client

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, argparse.Namespace):
            params = vars(params)
        if params is None:
            return
        if isinstance(params, Mapping):
            values = dict(params)
        elif dataclasses.is_dataclass(params) and not isinstance(params, type):
            values = dataclasses.asdict(params)
        else:
            log.warning("kforge-sidecar: hyperparameters of type %s are not logged", type(params).__name__)
            return
        self._ensure_client(values)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        self._ensure_client().log(metrics, step=step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """ "failed": finish the run now, as failed (exit code 1), within ``close_timeout``.

        Any other status ("success" after each ``fit``/``validate``/``test``,
        "finished" on a requeue signal) keeps the run open for the next stage;
        it is finished when the process exits (exit code 1 after an uncaught
        exception, else 0), or by ``close()``.
        """
        if status == "failed":
            self.close(exit_code=1)

    def close(self, timeout: float | None = None, exit_code: int = 0) -> bool:
        """Finish the run now (bounded by ``timeout``, default ``close_timeout``). A later
        log opens a new session of the same run."""
        client = self._client
        if client is None:
            return True
        self._client = None
        timeout = self._close_timeout if timeout is None else timeout
        self.last_close = client.close(timeout=timeout, exit_code=exit_code)
        return self.last_close

    # ----------------------------------------------------------- Callback: the run ID in the checkpoint

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_started = True  # the checkpoint (if any) is restored by now

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = state_dict.get("run_id")
        if not restored or restored == self._run_id:
            return
        if self._explicit_run_id:
            log.warning(
                "kforge-sidecar: run_id=%r was passed; not continuing run %r from the checkpoint",
                self._run_id,
                restored,
            )
        elif self._client is not None:
            log.warning(
                "kforge-sidecar: run %r is already open; the checkpoint's run %r cannot be continued",
                self._run_id,
                restored,
            )
        else:
            self._run_id = restored

    # ----------------------------------------------------------- internals

    def _ensure_client(self, config: Mapping[str, Any] | None = None) -> MetricsClient:
        """The client (started on first use), with ``config`` merged into the run's config."""
        if self._client is None or config:
            self._client = open_or_update(self._client, self._make_client, self._config, config)
            if self._client.run_id is not None:
                self._run_id = self._client.run_id
        return self._client

    def _make_client(self, config: Any) -> MetricsClient:
        return MetricsClient(
            finish_at_exit=True,  # finished at process exit: 1 after an uncaught exception
            project=self._project,
            name=self._name,
            run_id=self._run_id,
            config=config,
            address=self._address,
            rank=self._rank if self._rank is not None else getattr(rank_zero_only, "rank", None),
            **self._client_kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        # Lightning may pickle or deepcopy loggers (spawn launchers): the client's
        # sender thread and socket stay with the process that made them.
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"SidecarLogger(project={self._project!r}, run_id={self._run_id!r})"
