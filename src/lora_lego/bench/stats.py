"""Paired comparisons of two evaluated merges on the same test rows: the difference of their mean accuracy
over tasks with a normal-approximation 95% interval (rows paired within each task, tasks weighted equally)."""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence


def paired_difference(first: Mapping[str, Sequence[int]], second: Mapping[str, Sequence[int]],
                      tasks: Sequence[str]) -> tuple[float, float, float]:
    """(difference, low, high): mean over `tasks` of accuracy(first) - accuracy(second), and its 95% interval.

    `first` and `second` map a task to the 0/1 correctness of each of its test rows, in the same row order.
    Per task t the paired differences d_i = first_i - second_i have mean m_t and variance s_t^2 / n_t of that
    mean; the difference is (1/T) sum_t m_t, with standard error sqrt(sum_t s_t^2 / n_t) / T.
    """
    means, variances = [], []
    for task in tasks:
        a, b = first[task], second[task]
        if len(a) != len(b) or not a:
            raise ValueError(f"task {task}: {len(a)} and {len(b)} rows cannot be paired")
        d = [x - y for x, y in zip(a, b)]
        means.append(statistics.fmean(d))
        variances.append(statistics.pvariance(d) / len(d) if len(d) > 1 else 0.0)
    difference = statistics.fmean(means)
    half = 1.96 * math.sqrt(sum(variances)) / len(tasks)
    return difference, difference - half, difference + half


def describe(first: str, second: str, result: tuple[float, float, float], where: str) -> str:
    """One line: the difference, its interval, and whether `first` beats `second` (the interval excludes 0)."""
    difference, low, high = result
    verdict = (f"{first} beats {second}" if low > 0 else f"{first} loses to {second}" if high < 0
               else "the interval includes 0")
    return f"{first} - {second} on {where}: {difference:+.3f} [95% CI {low:+.3f}, {high:+.3f}]: {verdict}"
