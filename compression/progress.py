"""Progress reporting shared by the CLI (bars), the worker (database + events)
and library users: one callback type, called with a phase name, the fraction
of that phase done (0..1) and a short message."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float, str], None]


def silent(phase: str, fraction: float, message: str = "") -> None:
    """The default: report nothing."""
