"""What a wandb failure means for the uploader: retry in a fresh process, or stop for good.

- ``Transient``: a later attempt in a fresh process may not meet it (the backend is
  unreachable, 5xx, finish timed out); the uploader exits EXIT_RETRY.
- permanent (``permanent``): no retry can fix it (no credentials, forbidden, wandb
  missing): the run enters the failure sentinel ("failed").
- ``no_rewind``: the backend does not offer rewind (self-managed servers; a preview on
  W&B cloud) and refused ``resume_from``: the resume is appended instead (README, "Resume").
"""

from __future__ import annotations

import re

_PERMANENT = re.compile(
    r"\b(401|403)\b|not logged in|api[ _-]?key|unauthori[sz]ed|forbidden|permission denied|not installed",
    re.IGNORECASE,
)
_NO_REWIND = re.compile(r"rewind|resume_?from", re.IGNORECASE)


class Transient(Exception):
    """A failure a later attempt in a fresh process may not meet."""


class Permanent(Exception):
    """A failure no retry can fix; the message is the reason the sentinel records."""


class RewindRefused(Exception):
    """This backend refused a rewind before (``UploaderState.rewind_refused``)."""


def permanent(exc: BaseException) -> bool:
    try:
        from wandb.errors import AuthenticationError, UsageError

        if isinstance(exc, (AuthenticationError, UsageError)):
            return True
    except ImportError:
        pass
    return bool(_PERMANENT.search(str(exc)))


def no_rewind(exc: BaseException) -> bool:
    """The backend refused a rewind (``resume_from``), now or before."""
    return isinstance(exc, RewindRefused) or bool(_NO_REWIND.search(str(exc)))
