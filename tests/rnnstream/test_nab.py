"""NAB scoring on hand-made cases (values worked out from the published formulas, GUIDE section 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnnstream.nab import (
    PROFILES,
    ScoredFile,
    probation,
    row_values,
    scaled_sigmoid,
    score_corpus,
    windows_as_rows,
)

N = 1000  # rows; probation: the first 150
WINDOW = (500, 509)  # 10 rows
STANDARD, LOW_FP, LOW_FN = PROFILES["standard"], PROFILES["reward_low_FP"], PROFILES["reward_low_FN"]


def detections(*rows: int, value: float = 1.0) -> np.ndarray:
    scores = np.zeros(N)
    scores[list(rows)] = value
    return scores


def score(scores: np.ndarray, profile=STANDARD, windows=(WINDOW,)) -> float:
    return score_corpus([ScoredFile("f", scores, list(windows))], profile).score


def test_probation_and_sigmoid():
    assert probation(1000) == 150 and probation(10_000) == 750 and probation(6) == 0
    assert scaled_sigmoid(-1.0) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert scaled_sigmoid(0.0) == 0.0 and scaled_sigmoid(3.5) == -1.0


@pytest.mark.parametrize("profile", list(PROFILES.values()))
def test_the_null_detector_scores_0_and_the_perfect_one_100(profile):
    assert score(np.zeros(N), profile) == pytest.approx(0.0)
    assert score(detections(WINDOW[0]), profile) == pytest.approx(100.0)
    result = score_corpus([ScoredFile("f", detections(WINDOW[0]), [WINDOW])], profile)
    assert result.windows == result.windows_hit == 1 and result.false_positives == 0


def test_a_detection_at_the_windows_end_earns_little():
    ratio = scaled_sigmoid(-1 / 10) / scaled_sigmoid(-1.0)  # p = -(R - R + 1) / w
    assert ratio == pytest.approx(0.2482, abs=1e-4)
    assert score(detections(WINDOW[1])) == pytest.approx(100 * (ratio + 1) / 2)
    assert score(detections(WINDOW[1]), LOW_FN) == pytest.approx(100 * (ratio + 2) / 3)


def test_only_the_earliest_detection_of_a_window_counts():
    assert score(detections(WINDOW[0], 505, WINDOW[1])) == pytest.approx(100.0)
    middle = scaled_sigmoid(-(509 - 505 + 1) / 10) / scaled_sigmoid(-1.0)
    assert score(detections(505, WINDOW[1])) == pytest.approx(100 * (middle + 1) / 2)


def test_false_positives_cost_by_distance_from_the_previous_window():
    far = score(detections(WINDOW[0], 900))  # q = 391 / 9 > 3: the full fp
    assert far == pytest.approx(100 * (1 - 0.11 + 1) / 2)
    assert score(detections(WINDOW[0], 900), LOW_FP) == pytest.approx(100 * (1 - 0.22 + 1) / 2)
    before = score(detections(WINDOW[0], 300))  # before the first window: the full fp
    assert before == pytest.approx(far)
    just_after = score(detections(WINDOW[0], 510))  # q = 1/9: almost free
    cost = 0.11 * scaled_sigmoid(1 / 9)
    assert cost == pytest.approx(-0.0298, abs=1e-4)
    assert just_after == pytest.approx(100 * (1 + cost + 1) / 2)
    assert score(detections(WINDOW[0], 100)) == pytest.approx(100.0)  # in probation: not scored


def test_no_detection_misses_the_window():
    result = score_corpus([ScoredFile("f", detections(), [WINDOW])], LOW_FN)
    assert (
        result.score == pytest.approx(0.0) and result.raw == pytest.approx(-2.0) and result.windows_hit == 0
    )


def test_the_threshold_is_chosen_for_the_whole_corpus():
    a = np.zeros(N)
    a[WINDOW[0]], a[900] = 0.9, 0.95  # a false positive scores above the true one
    b = np.zeros(N)
    b[WINDOW[0]] = 0.6  # caught only at a low threshold
    b[200:260] = 0.5  # ... below which 60 false positives wait
    result = score_corpus([ScoredFile("a", a, [WINDOW]), ScoredFile("b", b, [WINDOW])], STANDARD)
    assert result.threshold == 0.6 and result.windows_hit == 2 and result.false_positives == 1
    assert result.raw == pytest.approx(2 - 0.11)


def test_row_values_and_windows_from_timestamps():
    value, window = row_values(20, [(5, 9)], STANDARD)
    assert (window[5:10] == 0).all() and (window[:5] == -1).all() and (window[10:] == -1).all()
    assert value[0] == -0.11 and value[5] == pytest.approx(1.0) and value[10] < 0 and value[10] > -0.11
    ts = 1_700_000_000 + 300 * np.arange(20)
    assert windows_as_rows(ts, [(ts[5], ts[9]), (ts[19] + 1, ts[19] + 10)]) == [(5, 9)]
