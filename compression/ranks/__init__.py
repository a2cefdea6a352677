"""Rank selection under a budget: one module per method behind one interface."""

from __future__ import annotations

from compression.errors import BudgetError
from compression.ranks.base import Data, Meter, RankSelector, SelectionContext
from compression.ranks.batude import Batude
from compression.ranks.energy import Energy
from compression.ranks.manual import Manual
from compression.ranks.rene import Rene
from compression.ranks.uniform import Uniform
from compression.ranks.vbmf import VBMF

METHODS: dict[str, type[RankSelector]] = {cls.name: cls for cls in (Uniform, Energy, VBMF, Manual, Batude, Rene)}


def get_method(name: str) -> RankSelector:
    if name not in METHODS:
        raise BudgetError(f"unknown rank-selection method {name!r}: choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def default_method(has_data: bool) -> str:
    """The best method for what the user gave (see README's benchmark table)."""
    for name in (("batude", "rene") if has_data else ("rene",)) + ("energy", "uniform"):
        if name in METHODS:
            return name
    return "uniform"


def select_ranks(ctx: SelectionContext, method: str | None = None):
    return get_method(method or default_method(ctx.data is not None)).select(ctx)


__all__ = ["METHODS", "Data", "Meter", "RankSelector", "SelectionContext", "default_method", "get_method",
           "select_ranks"]
