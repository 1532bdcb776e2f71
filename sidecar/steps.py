"""wandb's step rule, folded over a run's records in spool order.

One definition, used by the receiver (to give ``step=None`` frames their step,
and to count late rows for ``status``) and by the uploader (to tell wandb
exactly what wandb would have placed, and to rewind only on a resume):

- ``log(d, step=s)``: with s at or above the current step, the row at s is
  open until a higher step (rows of one step merge); below it, wandb drops
  the row ("late"): counted, never a reason to rewind or re-init anything.
- ``log(d)`` (``step=None``): the current step, then the next (``commit=False``
  keeps the row open, as in wandb).
- a new session of a run that already has rows is a resumed trainer: its
  first row may go back (a resume from an earlier checkpoint); then the run
  is rewound to just before that row. A row with ``step=None`` continues
  after the run's last row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Placement = Literal["row", "rewind", "late"]


@dataclass
class StepClock:
    cur: int = 0  # wandb's current step: the next row's, or the open row's
    open: bool = False  # the row at ``cur`` has values and was not committed
    top: int | None = None  # the highest step with a row (after the last rewind)
    fresh: list[str] = field(default_factory=list)  # sessions that said hello and logged nothing yet
    seen: list[str] = field(default_factory=list)  # every session of the run

    def __post_init__(self) -> None:
        self._sessions: tuple | None = None  # (fresh, seen) as tuples for ``snapshot``; None: changed since

    def hello(self, session: str) -> None:
        if session in self.seen:
            return  # the same trainer reconnecting
        self.seen.append(session)
        self._sessions = None
        if self.top is not None:
            self.fresh.append(session)  # a resumed trainer (or a second one on the run)
            if self.open:  # a new process starts a new row, as wandb does on resume
                self.cur += 1
                self.open = False

    def place(self, session: str, step: int | None, commit: bool = True) -> tuple[int, Placement]:
        """The step a metrics frame lands on, and how."""
        fresh = session in self.fresh
        if fresh:
            self.fresh.remove(session)
            self._sessions = None
        if step is None:
            step = self.cur
            if commit:
                self.cur, self.open = step + 1, False
            else:
                self.open = True
            if self.top is None or step > self.top:  # max(), less a call per frame
                self.top = step
            return step, "row"
        if step >= self.cur:
            self.cur, self.open = step, True
            if self.top is None or step > self.top:
                self.top = step
            return step, "row"
        if fresh:
            # A resumed trainer's first row goes back: rewind the run to just before it.
            self.cur, self.open, self.top = step, True, step
            return step, "rewind"
        return step, "late"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def snapshot(self) -> tuple:
        """A cheap immutable copy (taken per frame by the uploader); ``restore`` undoes it.
        The sessions, which change once per trainer session, are copied only when they did."""
        if self._sessions is None:
            self._sessions = (tuple(self.fresh), tuple(self.seen))
        return (self.cur, self.open, self.top, self._sessions)

    @classmethod
    def restore(cls, snap: tuple) -> "StepClock":
        cur, open_, top, (fresh, seen) = snap
        return cls(cur, open_, top, list(fresh), list(seen))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "StepClock":
        if not data:
            return cls()
        return cls(
            cur=int(data.get("cur", 0)),
            open=bool(data.get("open", False)),
            top=data.get("top"),
            fresh=list(data.get("fresh") or []),
            seen=list(data.get("seen") or []),
        )

    def copy(self) -> "StepClock":
        return StepClock(self.cur, self.open, self.top, list(self.fresh), list(self.seen))
