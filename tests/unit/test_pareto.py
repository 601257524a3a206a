"""The Pareto fronts against fronts computed by hand: ties, duplicates, dominated points, one point, NaN metrics."""

import math

import pytest

from quantflow.reporting.report import Row, front, pareto, pareto_speed
from tests.conftest import report_row


def row(name: str, size_mb: float, perplexity: float, tokens_per_s: float | None = None) -> Row:
    """A report row with only what the fronts read set to something that matters."""
    speed = [{"batch": 1, "decode_tokens_per_s": tokens_per_s}] if tokens_per_s is not None else []
    return report_row(name, size_mb=size_mb, perplexity=perplexity, speed=speed)


# (size MiB, perplexity) per row, and the front drawn on paper: a row is on it when no other row is as small
# and as good and better in one of the two.
CASES = {
    "one point": ({"a": (10, 20)}, ["a"]),
    "a staircase, all on the front": ({"a": (10, 30), "b": (20, 20), "c": (30, 10)}, ["a", "b", "c"]),
    "dominated in both": ({"a": (10, 10), "b": (20, 20), "c": (15, 5)}, ["a", "c"]),
    "same size, worse perplexity is off": ({"a": (10, 12), "b": (10, 11)}, ["b"]),
    "same perplexity, larger is off": ({"a": (12, 10), "b": (11, 10)}, ["b"]),
    "exact duplicates both stay": ({"a": (10, 10), "b": (10, 10), "c": (20, 20)}, ["a", "b"]),
    "a duplicate of a dominated row stays off": ({"a": (5, 5), "b": (10, 10), "c": (10, 10)}, ["a"]),
    "the baseline is big and best": (
        {"baseline": (100, 10), "w4": (25, 12), "w8": (50, 10.5), "w3": (30, 13)},
        ["baseline", "w4", "w8"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_size_front_is_the_one_computed_by_hand(case):
    points, expected = CASES[case]
    rows = [row(name, size, ppl) for name, (size, ppl) in points.items()]
    assert pareto(rows) == expected


def test_a_row_whose_perplexity_is_not_a_number_is_neither_on_the_front_nor_hides_another():
    """A diverged variant (NaN or infinite perplexity) measured nothing comparable: it can't be a trade-off."""
    rows = [row("a", 10, 20), row("nan", 5, math.nan), row("inf", 4, math.inf), row("b", 20, 10)]
    assert pareto(rows) == ["a", "b"]


def test_a_row_with_a_nan_cost_is_left_off_the_front():
    rows = [row("a", 10, 20), row("nan", math.nan, 5)]
    assert front(rows, lambda r: r.size_mb) == ["a"]


def test_only_nan_rows_give_an_empty_front():
    assert pareto([row("nan", 5, math.nan)]) == []


def test_the_speed_front_prefers_faster_and_skips_untimed_rows():
    rows = [
        row("slow-good", 10, 10, tokens_per_s=20),
        row("fast-bad", 10, 15, tokens_per_s=80),
        row("slow-bad", 10, 16, tokens_per_s=30),  # fast-bad is faster and better
        row("tie-fast", 10, 15, tokens_per_s=80),  # a duplicate of fast-bad: both stay
        row("untimed", 1, 1),  # best of all, but not timed: not on a speed front
    ]
    assert pareto_speed(rows) == ["slow-good", "fast-bad", "tie-fast"]
