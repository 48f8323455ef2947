"""The auto-switch rule as a pure function (DESIGN 3.5), and its incremental form."""

import math

import pytest

from wsd_llms import SwitchDetector, find_switch


def test_draft_shorter_than_window_never_switches():
    assert find_switch([1.0, 1.0], window=3, threshold=0.5) is None


def test_empty_draft():
    assert find_switch([], window=1, threshold=0.5) is None


def test_threshold_met_exactly_passes():
    assert find_switch([0.5, 0.5, 0.5], window=3, threshold=0.5) == 2
    assert find_switch([0.8] * 6, window=6, threshold=0.8) == 5


def test_just_below_threshold_fails():
    assert find_switch([0.8] * 5 + [0.8 - 1e-6], window=6, threshold=0.8) is None


def test_all_ones_switch_at_first_full_window():
    assert find_switch([1.0] * 10, window=6, threshold=1.0) == 5


def test_window_of_one_switches_at_first_confident_token():
    assert find_switch([0.1, 0.5, 0.95, 0.99], window=1, threshold=0.9) == 2


def test_geometric_not_arithmetic_mean():
    # arithmetic mean 0.5 >= 0.4, geometric mean ~0.1 < 0.4
    assert find_switch([0.99, 0.01], window=2, threshold=0.4) is None
    assert find_switch([0.81, 0.64], window=2, threshold=0.72) == 1  # sqrt(.81*.64) = .72


def test_zero_probability_blocks_its_windows():
    assert find_switch([1.0, 0.0, 1.0, 1.0], window=2, threshold=0.5) == 3


def test_first_passing_window_wins():
    probs = [0.2, 0.9, 0.95, 0.99, 0.99]
    assert find_switch(probs, window=2, threshold=0.9) == 2


def test_incremental_matches_pure_and_truncates():
    probs = [0.3, 0.7, 0.9, 0.2, 0.95, 0.97, 0.99]
    det = SwitchDetector(3, 0.9)
    hits = [i for i, p in enumerate(probs) if det.push(p)]
    assert hits[0] == find_switch(probs, 3, 0.9) == 6
    det.truncate(3)
    assert len(det) == 3
    assert det.push(0.99) is False  # window [0.9, 0.2, 0.99] ~ 0.56
    assert math.isclose(len(det), 4)


def test_no_switch_inside_a_forced_start():
    """min_switch (a forced start's last token): windows ending earlier do not count, later ones do."""
    probs = [1.0, 1.0, 1.0, 0.1, 1.0, 1.0]
    assert find_switch(probs, window=2, threshold=0.9) == 1
    assert find_switch(probs, window=2, threshold=0.9, min_switch=2) == 2  # its window still reaches back
    assert find_switch(probs, window=2, threshold=0.9, min_switch=3) == 5
    assert find_switch(probs, window=2, threshold=0.9, min_switch=6) is None
    det = SwitchDetector(2, 0.9, min_switch=3)
    assert [det.push(p) for p in probs] == [False, False, False, False, False, True]


@pytest.mark.parametrize("window,threshold", [(0, 0.5), (3, 0.0), (3, 1.5)])
def test_invalid_settings(window, threshold):
    with pytest.raises(ValueError):
        SwitchDetector(window, threshold)
