"""The sidecar's configuration, in sections (as the options are grouped in options.py).

Filled from the command line by options.build; nothing here has a default that an
option declares (options.py holds each option's default, once).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.protocol import DEFAULT_LIMITS, Limits

from .retention import RetentionPolicy


@dataclass(frozen=True)
class ReceiverConfig:
    """Taking frames in: group commit, dead trainers, caps."""

    commit_interval: float  # group commit: at most one fsync per run per interval (seconds)
    session_timeout: float  # a client silent this long is dead (idle clients ping every 5 s)
    resume_grace: float  # a run whose trainers died waits this long for a resume, then fails
    max_runs: int  # open runs (each an uploader and a wandb-core process) one sidecar takes
    limits: Limits = field(default=DEFAULT_LIMITS)


@dataclass(frozen=True)
class UploadConfig:
    """The supervisor and its uploaders: wandb's timeouts, restarts."""

    init_timeout: float  # wandb.init, per attempt
    finish_timeout: float  # wandb finish
    flush_interval: float  # wandb-core's transaction log flush; bounds replays after a kill
    heartbeat_timeout: float  # an uploader silent this long (outside init/finish) is wedged
    retry_backoff: float  # first delay before a failed uploader is started again
    retry_backoff_max: float
    system_metrics: bool  # wandb samples the trainer's process and the node's GPUs


@dataclass(frozen=True)
class LifetimeConfig:
    """When the sidecar drains and exits: never outlive the job (both drain first, then exit 0)."""

    drain_timeout: float  # SIGTERM/stop: how long uploaders get to hand wandb what is spooled
    parent_pid: int | None  # exit when this process is gone
    idle_timeout: float | None  # exit after this long with no open or pending run and no client message


@dataclass(frozen=True)
class MetricsConfig:
    """Health metrics for monitoring (metrics.py): a Prometheus endpoint, a textfile, or both."""

    port: int | None  # 0: any free port (status shows which)
    host: str
    textfile: Path | None
    interval: float  # seconds between textfile writes


@dataclass(frozen=True)
class ServeConfig:
    address: str
    spool_dir: Path
    log_level: str
    log_file: Path | None  # stderr goes here (appending); SIGHUP reopens it, for logrotate
    receiver: ReceiverConfig
    upload: UploadConfig
    lifetime: LifetimeConfig
    # Spool retention: finished-and-uploaded runs leave after ``retention.retain``, or earlier
    # (oldest first) while the spool is over ``retention.max_bytes``; see retention.py.
    retention: RetentionPolicy
    gc_interval: float  # seconds between retention passes
    metrics: MetricsConfig


@dataclass(frozen=True)
class UploaderConfig:
    """What one uploader process is told, serialised whole (``to_json``) on its command line:
    ``python -m sidecar.uploader --config JSON``."""

    run_dir: Path
    init_timeout: float
    finish_timeout: float
    flush_interval: float  # wandb-core's transaction log flush (its default is 15 s)
    drain_timeout: float
    log_level: str
    system_metrics: bool  # sample the trainer's process and the node's GPUs into the run
    sync: bool = False  # kforge-sidecar sync: retry a failed run, stop at the end of the log
    poll_interval: float = 0.05
    heartbeat: float = 0.5  # how often the heartbeat (and uploader.json) is written, busy or idle
    # The sidecar that started it: once that process is gone, the uploader drains and exits.
    # Named here because a parent that died before the uploader could look is already gone
    # from getppid(). None: whatever process is its parent when it starts (sync).
    parent_pid: int | None = None

    @classmethod
    def for_run(cls, cfg: ServeConfig, run_dir: Path) -> UploaderConfig:
        """The settings the supervisor gives the uploader of one run."""
        up = cfg.upload
        return cls(
            run_dir=run_dir, init_timeout=up.init_timeout, finish_timeout=up.finish_timeout,
            flush_interval=up.flush_interval, drain_timeout=cfg.lifetime.drain_timeout,
            log_level=cfg.log_level, system_metrics=up.system_metrics, parent_pid=os.getpid(),
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> UploaderConfig:
        data: dict[str, Any] = json.loads(text)
        return cls(**{**data, "run_dir": Path(data["run_dir"])})
