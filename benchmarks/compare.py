"""
Comparing the daemon with a yardstick: the daemon of another checkout (an
older commit, say), run in the same session against the same backends.

On a machine shared with other work, the CPU time of a request drifts over
a session by more than the changes worth measuring, so the two run in turn,
several rounds if asked, in alternating order, and medians are compared.
"""

from __future__ import annotations

import statistics
from typing import TypeVar

T = TypeVar("T")


def alternate(pairs: list[T], rounds: int) -> list[T]:
    """C{pairs} C{rounds} times over, every other time in reverse order."""
    runs: list[T] = []
    for round in range(rounds):
        runs += pairs if round % 2 == 0 else pairs[::-1]
    return runs


def change(ours: list[float], theirs: list[float]) -> str:
    """The median of C{ours} against the median of C{theirs}, in per cent."""
    return f"{(statistics.median(ours) / statistics.median(theirs) - 1) * 100:+.1f}%"
