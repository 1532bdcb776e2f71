"""The sidecar's configuration: one dataclass, filled by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from client.protocol import DEFAULT_LIMITS, Limits

from .retention import RetentionPolicy


@dataclass(frozen=True)
class ServeConfig:
    address: str
    spool_dir: Path
    log_level: str = "INFO"
    commit_interval: float = 0.005  # group commit: at most one fsync per run per interval
    drain_timeout: float = 30.0  # SIGTERM/stop: how long uploaders get to hand wandb what is spooled
    init_timeout: float = 60.0  # wandb.init, per attempt
    finish_timeout: float = 60.0  # wandb finish
    flush_interval: float = 1.0  # wandb-core's transaction log flush; bounds replays after a kill
    heartbeat_timeout: float = 30.0  # an uploader silent this long (outside init/finish) is wedged
    retry_backoff: float = 2.0  # first delay before a failed uploader is started again
    retry_backoff_max: float = 60.0
    session_timeout: float = 60.0  # a client silent this long is dead (idle clients ping every 5 s)
    resume_grace: float = 300.0  # a run whose trainers died waits this long for a resume, then fails
    limits: Limits = field(default=DEFAULT_LIMITS)
    max_runs: int = 64  # open runs (each an uploader and a wandb-core process) one sidecar takes
    system_metrics: bool = True  # wandb samples the trainer's process and the node's GPUs
    # Never outlive the job (both drain first, then exit 0):
    parent_pid: int | None = None  # exit when this process is gone
    idle_timeout: float | None = None  # exit after this long with no open or pending run and no client message
    log_file: Path | None = None  # stderr goes here (appending); SIGHUP reopens it, for logrotate
    # Spool retention: finished-and-uploaded runs leave after ``retention.retain``, or earlier
    # (oldest first) while the spool is over ``retention.max_bytes``; see retention.py.
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    gc_interval: float = 10.0  # seconds between retention passes
    # Health metrics for monitoring (metrics.py): a Prometheus endpoint, a node_exporter textfile, or both.
    metrics_port: int | None = None  # 0: any free port (status shows which)
    metrics_host: str = "127.0.0.1"
    metrics_textfile: Path | None = None
    metrics_interval: float = 5.0  # seconds between textfile writes
