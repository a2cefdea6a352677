"""Progress reporting shared by the CLI (bars), the worker (database + events)
and library users: one callback type, called with a phase name, the fraction
of that phase done (0..1) and a short message."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float, str], None]


def silent(phase: str, fraction: float, message: str = "") -> None:
    """The default: report nothing."""


# Relative weight of each engine phase in a run's overall progress; other phases add nothing.
PHASE_WEIGHTS = {"load": 0.1, "inspect": 0.05, "ranks": 0.2, "search": 0.2, "decompose": 0.1, "finetune": 0.4,
                 "export": 0.15}
# Reports of this phase already give the whole run's fraction (a sweep over several budgets).
WHOLE_RUN = "sweep"


class Overall:
    """Folds ``(phase, fraction)`` reports into one 0..1 fraction for the whole run:
    phases finished before the current one count in full, the current one by its
    fraction, each weighted by ``PHASE_WEIGHTS``. Never goes back, and stays below 1
    until the caller says the run is done."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.value = 0.0

    def update(self, phase: str, fraction: float) -> float:
        if not self.seen or self.seen[-1] != phase:
            self.seen.append(phase)
        if phase == WHOLE_RUN:
            now = fraction
        elif phase in PHASE_WEIGHTS:
            done = sum(PHASE_WEIGHTS[q] for q in dict.fromkeys(self.seen[:-1]) if q in PHASE_WEIGHTS)
            now = (done + PHASE_WEIGHTS[phase] * fraction) / sum(PHASE_WEIGHTS.values())
        else:
            return self.value
        self.value = max(self.value, min(0.99, now))
        return self.value
