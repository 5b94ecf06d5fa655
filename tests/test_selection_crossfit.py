"""scripts/selection_crossfit.py: selection rules scored on held-out rows their choice did not see."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "selection_crossfit.py"
spec = importlib.util.spec_from_file_location("selection_crossfit", SCRIPT)
crossfit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crossfit)


def _rows(rng: random.Random, n: int, p: float) -> str:
    return "".join("1" if rng.random() < p else "0" for _ in range(n))


def test_a_choice_among_equals_is_not_rewarded_out_of_sample():
    """Five checkpoints of the same true accuracy (independent row noise): the in-sample best is the
    largest of five noisy figures, above all of them on average; the cross-fitted best is scored on rows
    its choice did not see and lands on their mean."""
    rng = random.Random(7)
    points = {str(step): _rows(rng, 500, 0.6) for step in (0, 200, 400, 600, 800)}
    mean = sum(crossfit.accuracy(r) for r in points.values()) / len(points)
    best = max(crossfit.accuracy(r) for r in points.values())
    fair = crossfit.crossfit_best(points, splits=100)
    assert best - mean > 0.01
    assert abs(fair - mean) < 0.01 and fair < best - 0.005


def test_a_clearly_better_checkpoint_is_always_chosen():
    rng = random.Random(3)
    points = {"0": _rows(rng, 400, 0.5), "200": _rows(rng, 400, 0.85), "400": _rows(rng, 400, 0.5)}
    assert crossfit.crossfit_best(points, splits=50) == pytest.approx(crossfit.accuracy(points["200"]))
    same = {str(s): points["200"] for s in (0, 200, 400)}  # identical checkpoints: every rule agrees
    assert crossfit.crossfit_best(same, splits=10) == pytest.approx(crossfit.accuracy(points["200"]))


def _run(folder: Path, seed: int, points: dict, average: str, seconds: float) -> None:
    folder.mkdir(parents=True)
    log = [{"step": int(s), "select_accuracy": crossfit.accuracy(r), "select_rows": r} for s, r in points.items()]
    log.append({"step": 400, "average_of_steps": [200, 400], "select_accuracy_average": crossfit.accuracy(average),
                "select_rows_average": average})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    best = max(points, key=lambda s: crossfit.accuracy(points[s]))
    (folder / "metrics.json").write_text(json.dumps({"train": {"best_step": int(best), "dtype": "bf16",
                                                               "train_seconds": seconds}}))
    (folder / "config.json").write_text(json.dumps({"train": {"task": "xnli", "seed": seed},
                                                    "compute": {"cpu_capability": "AVX2"}, "git_commit": "abc"}))


def test_the_page_pairs_rules_by_run_and_keeps_what_it_read(tmp_path):
    """Two runs: the page gives each rule's figure per run and the paired difference against the
    cross-fitted best; the JSON store keeps the runs, so a render without the folders gives the same page."""
    runs = tmp_path / "runs"
    _run(runs / "xnli-sel-s1", 1, {"0": "0000", "200": "1000", "400": "1111"}, "1110", 10.0)
    _run(runs / "xnli-sel-s2", 2, {"0": "0000", "200": "1000", "400": "1111"}, "1100", 11.0)
    (runs / "unfinished").mkdir()  # no metrics: skipped
    out = tmp_path / "docs" / "crossfit.md"
    out.parent.mkdir()
    crossfit.main(["--runs-dir", str(runs), "--out", str(out), "--splits", "20"])
    page = out.read_text()
    # each run's best is its last step, chosen on either half: cross-fitted best = last = in-sample
    assert "| xnli-sel-s1 | 1 | 400 | 100.0 | 100.0 | 100.0 | 75.0 |" in page
    assert "| xnli-sel-s2 | 2 | 400 | 100.0 | 100.0 | 100.0 | 50.0 |" in page
    assert "- mean of the last 2: -37.50 ± 12.50 (2 runs)" in page
    assert "- in-sample best: +0.00 ± 0.00 (2 runs)" in page
    stored = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert sorted(stored) == ["xnli-sel-s1@10.0", "xnli-sel-s2@11.0"]
    text = page.replace("(to be written)", "kept reading")
    out.write_text(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    crossfit.main(["--runs-dir", str(empty), "--out", str(out), "--splits", "20"])
    assert out.read_text() == text  # the stored runs render the same page; the reading is kept


def test_the_average_on_targets_is_paired_by_seed_with_the_stored_best():
    """The dev report: target averages over the 6 official PAWS-X targets, their difference, the paired z
    from per-row outcomes, and whether the re-scored best checkpoint decides the stored rows alike."""
    targets = ("de", "es", "fr", "ja", "ko", "zh")
    best = {"seed": 42, "dev": {lang: {"accuracy": 0.5, "correct": "1100"} for lang in targets}}
    best["dev"]["en"] = {"accuracy": 0.75, "correct": "1110"}
    average = {"run": "pawsx-sel-s42", "task": "pawsx", "seed": 42,
               "dev": {lang: {"accuracy": 0.75, "correct": "1110"} for lang in ("en", *targets)},
               "best_rescored": {"de": {"correct": "1100"}}}
    lines = crossfit.target_lines([average], {"pawsx": [best]})
    assert "| 42 | 75.0 | 75.0 | +0.0 | 50.0 | 75.0 | +25.0 | +2.4 | de: yes |" in lines
    assert any("English dev +0.00 points; target average +25.00 points" in line for line in lines)
    average["best_rescored"] = {"de": {"correct": "0110"}}  # another run: its outcomes differ
    assert "| 42 | 75.0 | 75.0 | +0.0 | 50.0 | 75.0 | +25.0 | +2.4 | de: no |" in crossfit.target_lines([average], {"pawsx": [best]})
    assert crossfit.target_lines([average], {"pawsx": []}) == []  # no stored run of that seed: no row


def test_english_dev_pairs_the_best_checkpoint_with_its_average():
    mine = [{"run": "x", "seed": 1, "en_dev": {"accuracy": 0.5, "correct": "1100"}},
            {"run": "y", "seed": 2, "en_dev": {"accuracy": 0.5, "correct": "1100"}}]  # no average scored: left out
    averages = {"x": {"dev": {"en": {"accuracy": 0.75, "correct": "1110"}}}}
    (line,) = crossfit.english_dev_lines(mine, averages)
    assert line == ("- On English dev (4 rows no run chose anything on), the mean of the last 3 against the best "
                    "checkpoint: +25.00 (1 run; best → average: seed 1: 50.0 → 75.0 (z +1.0)).")
    assert crossfit.english_dev_lines(mine[1:], averages) == []
