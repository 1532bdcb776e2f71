"""The uploader process: one per run, the only process that imports wandb.

Started and watched by the sidecar's supervisor as
``python -m sidecar.uploader --config JSON`` (config.UploaderConfig, whole;
``kforge-sidecar sync`` starts it the same way, with ``sync`` set). wandb can
wedge this process; that is why it is a process: the sidecar kills it when
its heartbeat stops, and the other runs never notice.

This module is the process's entry point: the configuration, the log, one
uploader per run (a lock), the parent's death, the signals. The work is
elsewhere:

- consumer.py: reads the spool from the cursor, keeps uploader.json and the heartbeat;
- wandb_session.py: wandb.init (with a rewind), log, finish;
- txlog.py: wandb-core's transaction log, read back (how far wandb has written);
- wandb_errors.py: transient or permanent.

Exit codes (exits.py): EXIT_DONE (finished, failed for good, or drained);
EXIT_RETRY a transient failure (backend unreachable, 5xx, finish timed out):
the supervisor starts a fresh process after a backoff, since wandb cannot
re-init the same run ID in one process; EXIT_CRASHED (also restarted);
EXIT_LOCKED another uploader holds the run.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import signal
import sys

from .config import UploaderConfig
from .consumer import Uploader
from .exits import EXIT_CRASHED, EXIT_LOCKED
from .spool import RunSpool

log = logging.getLogger("kforge_sidecar.uploader")

# wandb hands every run.log to its own I/O thread and waits for it, so the two
# threads pass the GIL back and forth once a row; at the default 5 ms switch
# interval one can wait that long for the other. This interpreter is ours alone
# (a trainer could not do this without slowing its own threads). Draining a
# 40k-row backlog on a 2-core machine, interleaved pairs: 0.5 ms beat the default
# in 7 of 8 (by 6% at the median), and 0.1 ms beat 0.5 ms in 3 of 3.
SWITCH_INTERVAL = 0.0001


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the sidecar dies, so an orphan drains and leaves at once. A
    sidecar that died before this call sends none: the loop's check against the config's
    ``parent_pid`` notices that one."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the getppid() check in the loop still notices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sidecar.uploader")
    p.add_argument(
        "--config", required=True, help="UploaderConfig as JSON (config.py; the supervisor and sync write it)"
    )
    cfg = UploaderConfig.from_json(p.parse_args(argv).config)
    sys.setswitchinterval(SWITCH_INTERVAL)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s %(levelname)s uploader[{cfg.run_dir.name}] %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    try:
        locked = RunSpool(cfg.run_dir).lock()
    except OSError as exc:
        log.error("run %s: cannot take the run's uploader lock: %s", cfg.run_dir.name, exc)
        return EXIT_CRASHED
    if locked is None:
        # e.g. the one a killed sidecar left behind, still draining: its exit frees the run
        log.warning("run %s: another uploader is running for this run; this one exits", cfg.run_dir.name)
        return EXIT_LOCKED
    up = Uploader(cfg)
    signal.signal(signal.SIGTERM, up.stop)
    signal.signal(signal.SIGINT, up.stop)
    # the supervisor starts us with these blocked; a pending one is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return up.serve()
    except Exception:
        log.exception("run %s: uploader crashed; the sidecar will restart it from the cursor", cfg.run_dir.name)
        return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
