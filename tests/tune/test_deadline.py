"""Deadline arithmetic as data: the window, the admission of new trials, the CLI's time arguments."""

from __future__ import annotations

import pytest

from korch.errors import UserError
from korch.tune.deadline import build_window, can_start_trial, estimate_trial_s, parse_deadline


def test_window_is_budget_less_reserve_and_output_margin():
    window = build_window(now=1000.0, deadline=None, time_budget_s=150, reserve_s=30, margin_s=15)
    assert (window.search_end, window.deadline) == (1105.0, 1150.0)
    window = build_window(now=1000.0, deadline=2000.0, time_budget_s=None, reserve_s=0, margin_s=15)
    assert (window.search_end, window.deadline) == (1985.0, 2000.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"deadline": None, "time_budget_s": None, "reserve_s": 0}, "exactly one of --deadline"),
    ({"deadline": 2000.0, "time_budget_s": 10, "reserve_s": 0}, "exactly one of --deadline"),
    ({"deadline": None, "time_budget_s": 100, "reserve_s": 90}, r"--time-budget leaves no time to search: 100 s remain"),
    ({"deadline": 900.0, "time_budget_s": None, "reserve_s": 0}, r"--deadline leaves no time to search"),
    ({"deadline": None, "time_budget_s": 100, "reserve_s": -1}, "--reserve -1 is negative"),
])
def test_window_errors_name_the_flag(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_window(now=1000.0, margin_s=15, **kwargs)


def test_new_trials_start_only_while_the_typical_trial_still_fits():
    assert can_start_trial(now=0, search_end=100, durations=[])  # nothing known yet: the first ones start
    assert not can_start_trial(now=100, search_end=100, durations=[])  # the window is closed
    assert can_start_trial(now=40, search_end=100, durations=[50, 60, 10])  # median 50 fits in 60
    assert not can_start_trial(now=60, search_end=100, durations=[50, 60, 10])  # 50 > 40 left
    assert estimate_trial_s([30, 500, 40]) == 40  # one straggler doesn't close the window


def test_deadline_parsing():
    assert parse_deadline("2030-01-01T00:00:00+00:00") == 1893456000.0
    with pytest.raises(UserError, match="not an ISO 8601 time"):
        parse_deadline("tomorrow at six")
