"""The step rule (sidecar/steps.py), as pure logic: what wandb would place, and when a run rewinds."""

from __future__ import annotations

from sidecar.steps import StepClock


def test_explicit_steps_merge_late_rows_are_late_never_a_rewind():
    c = StepClock()
    c.hello("a")
    assert c.place("a", 1) == (1, "row")
    assert c.place("a", 1) == (1, "row")  # the same step again: merged into its row
    assert c.place("a", 5) == (5, "row")
    assert c.place("a", 3) == (3, "late")  # an eval computed late: wandb would drop it
    assert c.place("a", 6) == (6, "row")
    assert c.top == 6


def test_step_none_is_the_current_step_then_the_next_and_commit_false_keeps_the_row():
    c = StepClock()
    c.hello("a")
    assert [c.place("a", None)[0] for _ in range(3)] == [0, 1, 2]
    assert c.place("a", 10) == (10, "row")
    assert c.place("a", None) == (10, "row")  # merges into the open row 10, then commits it
    assert c.place("a", None, commit=False) == (11, "row")
    assert c.place("a", None) == (11, "row")
    assert c.place("a", 11) == (11, "late")  # committed: below wandb's current step 12


def test_only_a_resumed_sessions_first_row_rewinds():
    c = StepClock()
    c.hello("a")
    for s in range(1, 251):
        c.place("a", s)
    c.hello("b")  # the resumed trainer
    assert c.place("b", 201) == (201, "rewind")
    assert c.top == 201
    assert c.place("b", 150) == (150, "late")  # later rows of the session never rewind
    assert c.place("a", 100) == (100, "late")  # nor do the old session's stragglers
    c.hello("a")  # a reconnect of a known session is not a resume
    assert c.place("a", 50) == (50, "late")


def test_a_resumed_session_continues_with_step_none_after_the_last_row():
    c = StepClock()
    c.hello("a")
    c.place("a", 7)
    c.hello("b")
    assert c.place("b", None) == (8, "row")
    c2 = StepClock.restore(c.snapshot())
    assert c2 == c and StepClock.from_dict(c.to_dict()) == c
