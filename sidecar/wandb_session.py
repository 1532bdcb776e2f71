"""The wandb side of one uploader process: the run's settings, ``wandb.init`` (with a
rewind, or its fallback), log, config and summary updates, ``finish``.

Failures come out classified (wandb_errors.py): ``Permanent`` or ``Transient``. What
the uploader's state becomes is not decided here but in consumer.py.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from client.protocol import Hello

from .config import UploaderConfig
from .spool import RunMeta, UploaderState
from .txlog import TransactionLog
from .wandb_errors import Permanent, RewindRefused, Transient, no_rewind, permanent

log = logging.getLogger("kforge_sidecar.uploader")

TRAINER_STEP = "trainer/step"  # the trainer's own step, on rows appended after a refused rewind


class WandbSession:
    """One wandb run at a time in this process (a segment: a rewind closes one, and the
    next uploader process opens the next)."""

    def __init__(self, cfg: UploaderConfig, meta: RunMeta):
        self.cfg = cfg
        self.meta = meta
        self.run: Any = None  # the wandb run, once initialised
        self.offline = True
        self.txlog: TransactionLog | None = None

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def wandb_dir(self) -> str:
        """Where wandb keeps the run's files."""
        return str(Path(self.run.dir).parent)

    @property
    def starting_step(self) -> int:
        return int(self.run.starting_step)

    # ---------------------------------------------------------------- init

    def settings(self, wandb: Any, trainer: Hello | None) -> Any:
        """wandb settings: our timeouts, and the trainer's description, so the run shows the
        trainer's program, args, git and host, and samples the trainer's process."""
        meta = self.meta
        process = (trainer.process if trainer else None) or meta.process or {}
        pid = trainer.pid if trainer else meta.pid
        host = (trainer.host if trainer else None) or meta.host
        opts: dict[str, Any] = dict(
            init_timeout=self.cfg.init_timeout,
            finish_timeout=self.cfg.finish_timeout,
            finish_timeout_raises=True,
            x_transaction_log_flush_interval=self.cfg.flush_interval,
            console="off",  # the uploader's own output is not the trainer's
            silent=True,
            host=host or None,
        )
        program = process.get("program")
        if program:
            opts["program"] = program
            if os.path.isabs(program):
                opts["program_abspath"] = program
            # wandb reads the run's arguments from sys.argv: this process is the trainer's stand-in
            sys.argv = [program, *process.get("args", [])]
        if process.get("executable"):
            opts["x_executable"] = process["executable"]
        if process.get("git_commit"):
            opts["git_commit"] = process["git_commit"]
            opts["git_remote_url"] = process.get("git_remote") or None
        else:
            opts["disable_git"] = True  # the sidecar's own checkout is not the trainer's
        local = bool(pid) and host == socket.gethostname()
        if self.cfg.system_metrics and local:
            opts["x_stats_pid"] = pid  # the trainer's CPU and memory; GPUs are the node's
        else:
            opts["x_disable_stats"] = True  # this process's figures are not the job's
        # Settings this wandb does not have (the transaction-log flush interval came in 0.31;
        # before, it is 15 s: a hard kill replays more, loses nothing) are left out.
        known = type(wandb.Settings()).model_fields if hasattr(wandb.Settings, "model_fields") else opts
        return wandb.Settings(**{k: v for k, v in opts.items() if k in known})

    def start(self, state: UploaderState, trainer: Hello | None, rewind_to: int | None) -> None:
        """``wandb.init`` of the run, rewound to ``rewind_to`` if given (a resumed trainer went
        back). On a backend without rewind the resumed rows are appended after the run's last
        step instead: ``state.rewind_refused`` and ``state.step_offset`` say so from then on.
        Raises Permanent or Transient."""
        meta = self.meta
        try:
            import wandb
        except ImportError as exc:
            raise Permanent(f"wandb not installed: {exc}") from None
        settings = self.settings(wandb, trainer)
        opts = dict(meta.wandb_init)
        base_url = opts.pop("base_url", None)
        if base_url:
            settings.base_url = base_url
        try:
            try:
                if rewind_to is not None and state.rewind_refused:
                    raise RewindRefused("refused before by this backend")
                self.run = self._init(wandb, settings, opts, rewind_to, state)
            except Exception as exc:
                if rewind_to is None or not no_rewind(exc):
                    raise
                # The backend has no rewind: append the resumed rows after the run's last
                # step instead, each carrying its own step as trainer/step.
                log.warning(
                    "run %s: the wandb backend refused the rewind (%s); appending the resumed rows after the "
                    "run's last step, with the trainer's step in %r", meta.run_id, " ".join(str(exc).split())[:200], TRAINER_STEP,
                )  # fmt: skip
                state.rewind_refused = True
                first = rewind_to + 1
                if not isinstance(exc, RewindRefused):
                    wandb.teardown()  # after a failed init, wandb holds the run ID in this process
                settings = self.settings(wandb, trainer)  # and the last settings kept resume_from
                if base_url:
                    settings.base_url = base_url
                self.run = self._init(wandb, settings, opts, None, state)
                state.step_offset = max(0, int(self.run.starting_step) - first)
                self.run.define_metric(TRAINER_STEP)
                log.info(
                    "run %s: resumed at wandb step %d; trainer step %d and on go to wandb step + %d",
                    meta.run_id, self.run.starting_step, first, state.step_offset,
                )  # fmt: skip
        except Exception as exc:  # wandb.errors.Error and whatever its backend raises
            reason = f"WandB init failed: {type(exc).__name__}: {exc}"
            if permanent(exc):
                raise Permanent(reason) from None
            raise Transient(" ".join(reason.split())[:500]) from None
        self.offline = bool(getattr(self.run.settings, "_offline", False))
        self.txlog = TransactionLog(Path(self.run.dir).parent / f"run-{self.run.id}.wandb")

    def _init(
        self, wandb: Any, settings: Any, opts: dict[str, Any], rewind_to: int | None, state: UploaderState
    ) -> Any:
        meta = self.meta
        opts = dict(opts)
        if rewind_to is not None:
            # resume_from rewinds the run's history to that step and continues it; offline
            # the rewind is recorded as the run's branch point and applied at `wandb sync`
            opts["resume_from"] = f"{meta.run_id}?_step={rewind_to + state.step_offset}"
            log.info("run %s: rewinding to step %d", meta.run_id, rewind_to)
        else:
            opts["id"] = meta.run_id
            opts["resume"] = "allow"  # a deleted run comes back as a fresh one under this ID
        config = {**meta.config, **state.config}
        return wandb.init(project=meta.project or None, name=meta.name, config=config, settings=settings, **opts)

    # ---------------------------------------------------------------- the run

    def log(self, values: dict[str, Any], step: int) -> None:
        self.run.log(values, step=step)

    def update_config(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def update_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def written_step(self) -> int | None:
        """The highest step wandb-core has written to its transaction log (None: none yet)."""
        return self.txlog.last_step() if self.txlog is not None else None

    def finish(self, exit_code: int) -> None:
        """``finish``, bounded by finish_timeout; on success wandb has kept everything handed.
        A stalled backend raises Transient: what wandb did not confirm is replayed by a fresh
        uploader later (wandb drops steps the server already has)."""
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            raise Transient(f"wandb finish failed: {type(exc).__name__}: {exc}") from None
        self.run = None
        self.txlog = None
