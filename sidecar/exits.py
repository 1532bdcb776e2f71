"""Exit codes: the contract between the sidecar's processes, its callers and the systemd unit.

Every code one process returns and another one (or systemd, or a job script) acts
on is defined here, once. ``deploy/systemd/kforge-sidecar@.service`` lists
``RestartPreventExitStatus=`` from the serve codes a restart cannot fix
(``SERVE_NO_RESTART``); ``tests/test_exits.py`` checks that it does.
"""

from __future__ import annotations

# ``kforge-sidecar serve`` (server.py), and the CLI around it
EXIT_OK = 0
EXIT_IN_USE = 1  # another sidecar serves the address or the spool; a metrics port in use
EXIT_UNSAFE = 2  # the socket directory is unsafe, or the spool directory unusable (a user's fix)
EXIT_USAGE = 2  # a mistake on the command line (click's own code for usage errors)
EXIT_MISSING_DEPS = 1  # a plain install (no `sidecar` extra): the command says what to install
SERVE_NO_RESTART = (EXIT_IN_USE, EXIT_UNSAFE)  # systemd: RestartPreventExitStatus=

# ``python -m sidecar.uploader`` (uploader.py), read by the supervisor and by `sync`
EXIT_DONE = 0  # finished, failed for good (the sentinel), or drained
EXIT_CRASHED = 1  # an unexpected error: restarted from the cursor
EXIT_LOCKED = 3  # another uploader holds the run
EXIT_RETRY = 75  # EX_TEMPFAIL: a transient wandb failure; a fresh process retries after a backoff

# ``kforge-sidecar run`` (launcher.py), as a shell reports a command it cannot run
EXIT_NO_SIDECAR = 125  # no sidecar could be started
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
