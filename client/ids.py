"""Run IDs: what both sides accept as one (also the name of a run's spool directory)."""

from __future__ import annotations

import re

# wandb run IDs: letters, digits, dash and underscore.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
