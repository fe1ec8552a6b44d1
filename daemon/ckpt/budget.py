"""The save budget (`checkpoint.max_overhead`): the periodic interval, in steps, that keeps what
periodic saves cost the training loop within a fraction of its time, chosen from measurements.

What a save costs the loop is measured, not assumed. The loop's step boundaries are timed; a
periodic save's window runs from its boundary to the first boundary that knows its write finished,
and its cost is the excess of the window's steps over the step time outside saves (the median of
the recent steps no save touched). The stall at the boundary (the snapshot, or the whole write
when saves are synchronous) falls in the window's first step; the slowdown of the steps a
background write overlaps, in the rest.

A save of cost C every N steps of T each costs C / (N·T) of the training time, so the budget b
allows N = C / (b·T) at the least. With `checkpoint.mtbf_hours` M, Young and Daly's interval
√(2·C·M) (in seconds of training, which minimises the time lost to saves and to the work a crash
redoes) is taken instead where it is longer: the budget clips it, never the other way.

Decided anew at each measured save, from the mean of the last COST_SAMPLES costs and the median
step time. The interval set is the longer of HEADROOM times the least the budget allows (a save then
costs 1/HEADROOM of the budget) and Young/Daly's; it changes only when the budget would be exceeded
(the least allowed passed it), or when the interval wanted moved more than SLACK times away from it
(for SHORTEN_AFTER saves in a row, to shorten it). Noise within that band changes nothing, so the
interval does not oscillate.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

HEADROOM = 1.25  # the interval set, over the least the budget allows
SLACK = 2.0  # how far the interval wanted may move from the one set (the budget's own bound aside)
# Saves whose mean cost decides: the mean, not the median, for an occasional slow save (a page-cache
# flush) is a cost the budget pays too; over a few, for one save's cost is a sum of noisy steps.
COST_SAMPLES = 5
STEP_SAMPLES = 64  # recent steps outside saves whose median is the step time
# Measured saves in a row that must find the interval too long before it shortens: a shorter one
# only makes saves fresher, a longer one keeps the budget, so only lengthening is done at once.
SHORTEN_AFTER = 2
FIRST_SAVE_AFTER = 10  # steps measured before the first save, which is made to measure one


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The periodic interval in force and the measurements it was chosen from."""

    interval_steps: int
    save_ms: float  # what one periodic save costs the loop: its stall and its overlapped steps' slowdown
    write_ms: float  # a write's own duration: a crash meanwhile falls back to the save before
    step_ms: float  # a step outside saves
    max_overhead: float
    young_daly_steps: int | None  # Young/Daly's interval for checkpoint.mtbf_hours; None without
    reason: str  # why it changed: first, over_budget, rarer_than_needed, young_daly

    @property
    def interval_s(self) -> float:
        return (self.interval_steps * self.step_ms + self.save_ms) / 1e3

    @property
    def overhead(self) -> float:
        """The share of the training time the saves cost at this interval, as measured."""
        return self.save_ms / (self.interval_steps * self.step_ms)

    @property
    def expected_loss_steps(self) -> float:
        """Steps a crash makes the run redo, on average: half an interval, and the save's write."""
        return self.interval_steps / 2 + self.write_ms / self.step_ms

    @property
    def expected_loss_s(self) -> float:
        return self.expected_loss_steps * self.step_ms / 1e3

    def fields(self) -> dict[str, float | int | str | None]:
        """As the `save_policy` event and save-policy.json carry it."""
        return {
            "interval_steps": self.interval_steps,
            "interval_s": round(self.interval_s, 3),
            "save_ms": round(self.save_ms, 3),
            "write_ms": round(self.write_ms, 3),
            "step_ms": round(self.step_ms, 3),
            "overhead": round(self.overhead, 5),
            "max_overhead": self.max_overhead,
            "young_daly_steps": self.young_daly_steps,
            "expected_loss_steps": round(self.expected_loss_steps, 1),
            "expected_loss_s": round(self.expected_loss_s, 3),
            "reason": self.reason,
        }


def least_interval(save_ms: float, step_ms: float, max_overhead: float) -> float:
    """The shortest interval, in steps, whose saves cost at most `max_overhead` of the training time."""
    return save_ms / (max_overhead * step_ms)


def young_daly(save_ms: float, step_ms: float, mtbf_hours: float) -> float:
    """Young/Daly's interval √(2·C·MTBF), in steps."""
    return math.sqrt(2 * save_ms * mtbf_hours * 3.6e6) / step_ms


class SaveBudget:
    """The decision alone: measurements in, the interval out (a unit test drives it with numbers)."""

    def __init__(self, max_overhead: float, mtbf_hours: float | None = None) -> None:
        self.max_overhead = max_overhead
        self.mtbf_hours = mtbf_hours
        self.policy: Policy | None = None
        self.steps: deque[float] = deque(maxlen=STEP_SAMPLES)
        self.costs: deque[float] = deque(maxlen=COST_SAMPLES)
        self.writes: deque[float] = deque(maxlen=COST_SAMPLES)
        self.too_long = 0  # measured saves in a row that found the interval longer than wanted

    def step(self, step_ms: float) -> None:
        """A step no save touched."""
        self.steps.append(step_ms)

    def written(self, write_ms: float) -> None:
        """A periodic save's write took `write_ms`."""
        self.writes.append(write_ms)

    @property
    def step_ms(self) -> float | None:
        return statistics.median(self.steps) if self.steps else None

    def saved(self, cost_ms: float) -> Policy | None:
        """A periodic save cost the loop `cost_ms`: the new policy when the interval changes, else None."""
        step_ms = self.step_ms
        if step_ms is None or step_ms <= 0:
            return None  # no step measured outside saves yet: nothing to weigh the cost against
        self.costs.append(cost_ms)
        save_ms = statistics.fmean(self.costs)
        least = least_interval(save_ms, step_ms, self.max_overhead)
        fitting = young_daly(save_ms, step_ms, self.mtbf_hours) if self.mtbf_hours else None
        wanted = max(least * HEADROOM, fitting or 0.0)
        current = self.policy.interval_steps if self.policy else None
        self.too_long = self.too_long + 1 if current is not None and wanted * SLACK < current else 0
        if current is None:
            reason = "first"
        elif least > current:
            reason = "over_budget"
        elif self.too_long >= SHORTEN_AFTER:
            reason = "rarer_than_needed"
        elif wanted > current * SLACK:
            reason = "young_daly"  # only Young/Daly's interval can be wanted this far past the least allowed
        else:
            return None
        interval = max(1, math.ceil(wanted))
        if interval == current:
            return None  # rounded to the same count of steps
        self.too_long = 0
        self.policy = Policy(
            interval_steps=interval,
            save_ms=save_ms,
            write_ms=statistics.fmean(self.writes) if self.writes else 0.0,
            step_ms=step_ms,
            max_overhead=self.max_overhead,
            young_daly_steps=math.ceil(fitting) if fitting is not None else None,
            reason=reason,
        )
        return self.policy


class SaveMeter:
    """Times the loop's step boundaries and tells the steps a periodic save touched from the others,
    feeding the budget what each save cost. Times are passed in: a unit test drives it with numbers."""

    def __init__(self, budget: SaveBudget) -> None:
        self.budget = budget
        self._last: float | None = None  # the previous boundary's time, in seconds
        self._skip = False  # the next step holds a save outside the budget or an evaluation
        self._window: list[float] | None = None  # the steps of the periodic save being measured, in ms
        self._stall_ms = 0.0  # its stall at the boundary, measured on its own
        self._written = False  # its write is known to have finished

    def due(self, steps_since_save: int) -> bool:
        """Whether a periodic save is due, `steps_since_save` after the newest checkpoint. Before
        any save was measured, one is made as soon as the step time is known: it is the measurement."""
        policy = self.budget.policy
        if policy is None:
            return self._window is None and len(self.budget.steps) >= FIRST_SAVE_AFTER
        return steps_since_save >= policy.interval_steps

    def boundary(self, now: float) -> Policy | None:
        """At each step boundary, after the saves finished since the last one were reported; the new
        policy when a save measured here changed it."""
        last, self._last = self._last, now
        if last is None or self._skip:  # the first step of a process, or one holding more than a step
            self._skip = False
            return None
        step_ms = (now - last) * 1e3
        if self._window is None:
            self.budget.step(step_ms)
            return None
        self._window.append(step_ms)
        return self._close() if self._written else None

    def periodic(self) -> Policy | None:
        """A periodic save starts: the steps from here until its write is known finished are its
        cost. A save still measured closes here (the wait for its write falls to the new one)."""
        policy = self._close()
        self._window, self._stall_ms, self._written = [], 0.0, False
        return policy

    def stalled(self, stall_ms: float) -> None:
        """The periodic save being measured held the loop this long at its boundary: its least cost."""
        self._stall_ms = stall_ms

    def written(self, write_ms: float) -> None:
        """The periodic save being measured is durable; its write took `write_ms`."""
        self.budget.written(write_ms)
        self._written = True

    def other_save(self) -> Policy | None:
        """A save outside the budget: the step that holds it is not measured, and a periodic save
        still measured closes with the steps so far."""
        self._skip = True
        return self._close()

    def _close(self) -> Policy | None:
        window, self._window = self._window, None
        step_ms = self.budget.step_ms
        if not window or step_ms is None:
            return None  # no step of it measured (a save outside the budget came at once)
        return self.budget.saved(max(sum(window) - len(window) * step_ms, self._stall_ms))
