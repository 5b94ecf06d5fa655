import pytest

from xprompt.reports import language_rows, summarize


def _results():
    return {
        "en": {"n": 10, "labeled": True, "accuracy": 0.8, "macro_f1": 0.7},
        "de": {"n": 10, "labeled": True, "accuracy": 0.6, "macro_f1": 0.5},
        "zh": {"n": 10, "labeled": True, "accuracy": 0.5, "macro_f1": 0.4},
        "sw": {"n": 10, "labeled": False},
    }


def test_summary_on_known_numbers():
    s = summarize(_results(), "en")
    assert s["avg_target"] == pytest.approx(0.55)
    assert s["avg_all"] == pytest.approx((0.8 + 0.6 + 0.5) / 3)
    assert s["gap"] == pytest.approx(0.25)
    assert s["languages"] == ["de", "en", "zh"]  # the unlabeled language is left out


def test_rows_format_percentages_and_summary():
    rows = language_rows(_results(), "en")
    assert rows[0] == ["en", "10", "80.0", "70.0"]
    assert rows[3] == ["sw", "10", "-", "-"]
    assert rows[4] == ["avg (2 targets)", "", "55.0", "45.0"]
    assert rows[-1] == ["gap (en - targets)", "", "25.0", "25.0"]


def test_no_target_language_means_no_gap():
    s = summarize({"en": {"n": 1, "labeled": True, "accuracy": 1.0}}, "en")
    assert "gap" not in s and "avg_target" not in s and s["avg_all"] == 1.0
