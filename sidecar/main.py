"""The ``kforge-sidecar`` entry point.

A plain ``pip install kforge-sidecar`` is the light client for a training
environment (pyzmq and msgpack). The daemon needs the ``sidecar`` extra. This
module imports only the standard library until it has checked that the extra
is there, so a plain install gets one line saying what to install instead of
a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

from .exits import EXIT_MISSING_DEPS

# import name -> distribution name, for the message
DAEMON_DEPS = {"typer": "typer", "rich": "rich", "wandb": "wandb", "prometheus_client": "prometheus-client"}


def missing_deps() -> list[str]:
    return [dist for mod, dist in DAEMON_DEPS.items() if importlib.util.find_spec(mod) is None]


def main() -> None:
    missing = missing_deps()
    if missing:
        sys.stderr.write(
            f"kforge-sidecar: the daemon's dependencies are not installed ({', '.join(missing)}); "
            "install it in an environment of its own: pipx install 'kforge-sidecar[sidecar]' "
            "(or: uv tool install 'kforge-sidecar[sidecar]')\n"
        )
        sys.exit(EXIT_MISSING_DEPS)
    from .cli import main as cli_main

    cli_main()
