"""HF Transformers: a ``TrainerCallback`` that hands the Trainer's logs to the local kforge-sidecar.

    from client.integrations.transformers import SidecarCallback

    args = TrainingArguments(..., report_to="none")      # no in-process wandb
    trainer = Trainer(model, args, ..., callbacks=[SidecarCallback(project="my-project")])
    trainer.train(resume_from_checkpoint=ckpt)           # a resume continues the same wandb run

A thin layer over ``client.MetricsClient``:
- ``on_train_begin``: starts the client with the ``TrainingArguments`` (and
  the model's ``config``, if it has one) as the run's config;
- ``on_log``: ``log(logs, step=state.global_step)`` (``log_eval`` for an
  evaluation's ``eval_*`` dict); the end-of-training totals (``train_runtime``,
  ``train_loss``, ...) go to the run's summary (``update_summary``), as HF's own
  wandb callback does;
- the run is finished when the process exits: exit code 1 after an uncaught
  exception (a ``train()`` that raised: the Trainer has no failure hook),
  else 0; or by ``close()``. Not at ``on_train_end``: a ``trainer.evaluate()``
  after ``train()`` logs at the last training step, and as a new session of a
  finished run, the sidecar would take that row for a resume from an earlier
  checkpoint and rewind over the last training row.

The run ID is kept in the checkpoint's ``trainer_state.json``: the callback is
an ``ExportableState``, so the Trainer writes ``state()`` (the run ID) into
``TrainerState.stateful_callbacks`` at every save. On ``resume_from_checkpoint``
the Trainer loads that state before ``on_train_begin``, where the callback takes
the run ID back (with or without ``restore_callback_states_from_checkpoint``).
It imports only ``transformers``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from transformers.trainer_callback import ExportableState, TrainerCallback

from ..metrics_client import MetricsClient
from ._common import open_or_update

log = logging.getLogger("kforge_sidecar.transformers")

__all__ = ["SidecarCallback"]

# The Trainer's end-of-training totals: one value per run, so summary values, not history.
SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}
)


class SidecarCallback(TrainerCallback, ExportableState):
    """Transformers ``Trainer`` callback over ``client.MetricsClient``.

    Args:
        project, name, run_id, config, address: as for ``MetricsClient``. ``run_id``
            continues a known run (it wins over one restored from a checkpoint);
            ``config`` is sent besides the ``TrainingArguments``.
        close_timeout: how long finishing the run (at exit, or ``close()``) may wait for the sidecar (seconds).
        **client_kwargs: passed to ``MetricsClient`` (``wandb_init``, ``buffer_size``, ...).
    """

    def __init__(
        self,
        project: str = "huggingface",
        name: str | None = None,
        run_id: str | None = None,
        config: Any = None,
        address: str | None = None,
        *,
        close_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> None:
        self.project = project
        self.name = name
        self.run_id = run_id  # also what the checkpoint restores (ExportableState "attributes")
        self.address = address
        self.close_timeout = close_timeout
        self._explicit_run_id = run_id is not None
        self._config = config
        self._client_kwargs = client_kwargs
        self._client: MetricsClient | None = None
        self.last_close: bool | None = None  # what the last close() returned

    @property
    def client(self) -> MetricsClient | None:
        """The underlying client; None before training starts (and after ``close()``)."""
        return self._client

    # ----------------------------------------------------------- ExportableState

    def state(self) -> dict:
        # JSON only: it goes into trainer_state.json. "args" rebuild the callback
        # when the Trainer restores callback states itself.
        return {
            "args": {
                "project": self.project,
                "name": self.name,
                "address": self.address,
                "close_timeout": self.close_timeout,
            },
            "attributes": {"run_id": self.run_id},
        }

    # ----------------------------------------------------------- TrainerCallback

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        restored = self._restored_run_id(state)
        if restored and restored != self.run_id:
            if self._explicit_run_id or self._client is not None:
                log.warning(
                    "kforge-sidecar: run %r is in use; not continuing run %r from the checkpoint", self.run_id, restored
                )
            else:
                self.run_id = restored
        config: dict[str, Any] = {}
        model_config = getattr(model, "config", None)
        if hasattr(model_config, "to_dict"):
            config.update(model_config.to_dict())
        config.update(args.to_dict())
        self._ensure_client(args, config)

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        client = self._ensure_client(args)
        summary = {k: v for k, v in logs.items() if k in SUMMARY_KEYS}
        values = {k: v for k, v in logs.items() if k not in SUMMARY_KEYS}
        if summary:
            client.update_summary(summary)
        if values:
            is_eval = any(k.startswith("eval_") for k in values)
            (client.log_eval if is_eval else client.log)(values, step=state.global_step)

    def close(self, timeout: float | None = None, exit_code: int = 0) -> bool:
        """Finish the run now (bounded by ``timeout``, default ``close_timeout``); done at
        exit otherwise. A later log opens a new session of the same run."""
        client = self._client
        if client is None:
            return True
        self._client = None
        self.last_close = client.close(timeout=self.close_timeout if timeout is None else timeout, exit_code=exit_code)
        return self.last_close

    # ----------------------------------------------------------- internals

    def _restored_run_id(self, state: Any) -> str | None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several callbacks of this class: the first one's
            saved = saved[0] if saved else None
        if isinstance(saved, Mapping):
            run_id = (saved.get("attributes") or {}).get("run_id")
            return run_id if isinstance(run_id, str) and run_id else None
        return None

    def _ensure_client(self, args: Any, config: Mapping[str, Any] | None = None) -> MetricsClient:
        """The client (started on first use), with ``config`` merged into the run's config."""
        if self._client is None or config:

            def make(run_config: Any) -> MetricsClient:
                kwargs = dict(self._client_kwargs)
                kwargs.setdefault("rank", getattr(args, "process_index", None))
                return MetricsClient(
                    finish_at_exit=True,  # finished at process exit: 1 after an uncaught exception
                    project=self.project,
                    name=self.name,
                    run_id=self.run_id,
                    config=run_config,
                    address=self.address,
                    **kwargs,
                )

            self._client = open_or_update(self._client, make, self._config, config)
            if self._client.run_id is not None:
                self.run_id = self._client.run_id
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # a sender thread and a socket do not travel
        return state
