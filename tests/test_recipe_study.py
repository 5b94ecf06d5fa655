"""scripts/recipe_study.py: what it read from a run's log survives the run folder, also when one run name
stands for several runs (the same seed in bf16 and in fp32, on two machines)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANGS = ("en", "de", "es", "fr", "ja", "ko", "zh")  # PAWS-X: English + its 6 official targets


def record(dtype: str, held_out: float) -> dict:
    dev = {lang: {"accuracy": 0.75, "correct": "1101"} for lang in LANGS}
    return {"run": "pawsx-baseline-s42", "seed": 42, "dev": dev,
            "train": {"select_accuracy": held_out, "best_step": 200, "dtype": dtype},
            "compute": {"cpu_bf16_reason": "a test CPU"}}


def render(tmp_path: Path, *runs_dir: str) -> str:
    args = [sys.executable, str(ROOT / "scripts" / "recipe_study.py"), "--bundle", f"pawsx={tmp_path / 'bf16.json'}",
            "--fp32", f"pawsx={tmp_path / 'fp32.json'}", "--out", str(tmp_path / "recipe.md")]
    for folder in runs_dir:
        args += ["--runs-dir", folder]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
    return (tmp_path / "recipe.md").read_text()


def test_the_log_of_a_name_shared_by_two_runs_survives_its_folder(tmp_path):
    (tmp_path / "bf16.json").write_text(json.dumps({"pawsx": {"baseline": [record("bf16", 0.8)]}}))
    (tmp_path / "fp32.json").write_text(json.dumps({"pawsx": {"baseline": [record("fp32", 0.7)]}}))
    folder = tmp_path / "runs" / "pawsx-baseline-s42"  # the bf16 run's folder: its log has the record's best point
    folder.mkdir(parents=True)
    steps = [{"select_accuracy": 0.512, "step": 0}, {"loss": 0.6, "grad_norm": 0.2, "grad_norm_max": 0.25, "step": 100},
             {"select_accuracy": 0.8, "step": 200}]
    (folder / "log.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    bf16_row = "| pawsx-baseline-s42 | 42 | bf16 |"

    first = render(tmp_path, str(tmp_path / "runs"))
    row = next(line for line in first.splitlines() if line.startswith(bf16_row))
    assert "| 51.2 | 200 | 80.0 |" in row and "| 0.250 |" in row  # held-out at step 0 and the gradient norm: the log
    fp32_row = next(line for line in first.splitlines() if line.startswith("| pawsx-baseline-s42 | 42 | fp32 |"))
    assert "| - | 200 | 70.0 |" in fp32_row  # the log's best point is not the fp32 record's: not its log

    for path in folder.iterdir():  # the run folder is gone (another machine, a cleaned runs dir)
        path.unlink()
    folder.rmdir()
    second = render(tmp_path)
    assert second == first  # the stored log of the bf16 run is still found, though the fp32 row has the same name


def test_a_log_of_another_run_with_the_same_best_point_is_not_taken(tmp_path):
    """Two runs of one name can reach the same best point (a seed on two machines): the run folder's metrics say
    which run wrote the log, by its dtype and training seconds."""
    bf16 = record("bf16", 0.8)
    bf16["train"]["train_seconds"] = 100.0
    (tmp_path / "bf16.json").write_text(json.dumps({"pawsx": {"baseline": [bf16]}}))
    (tmp_path / "fp32.json").write_text(json.dumps({"pawsx": {"baseline": [record("fp32", 0.7)]}}))
    folder = tmp_path / "runs" / "pawsx-baseline-s42"
    folder.mkdir(parents=True)
    steps = [{"select_accuracy": 0.512, "step": 0}, {"select_accuracy": 0.8, "step": 200}]
    (folder / "log.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    bf16_row = "| pawsx-baseline-s42 | 42 | bf16 |"
    for seconds, step0 in ((200.0, "-"), (100.0, "51.2")):  # another run's folder, then this run's
        (folder / "metrics.json").write_text(json.dumps({"train": {"dtype": "bf16", "train_seconds": seconds}}))
        (tmp_path / "recipe.json").unlink(missing_ok=True)
        page = render(tmp_path, str(tmp_path / "runs"))
        row = next(line for line in page.splitlines() if line.startswith(bf16_row))
        assert f"| {step0} | 200 | 80.0 |" in row


def test_the_spread_line_says_what_english_tells_of_transfer():
    """Over seeds: the target average's Pearson r with English held-out and English dev, and the 95%
    chi-square interval of its standard deviation (6 seeds: 5 degrees of freedom)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_study", ROOT / "scripts" / "recipe_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    targets = [0.60, 0.61, 0.62, 0.63, 0.64, 0.65]
    rows = [{"targets": t, "held_out": t, "en": 1 - t} for t in targets]
    line = study.spread_line(rows)
    assert "held-out accuracy at r = +1.00" in line and "English dev at r = -1.00" in line
    assert "deviation of 1.87 has a 95% interval of 1.17 to 4.59 over 6 seeds" in line


def test_the_seed_reference_says_how_far_two_different_seeds_are():
    """Pairs of different seeds: the share of target rows decided differently (mean, range over pairs) and
    the chance that two independent runs with the sweep's spread differ by more than 1.0 point."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_study", ROOT / "scripts" / "recipe_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    sweep = [{"targets": 0.60 + i / 100, "correct": {"de": "1" * (4 - i) + "0" * i}} for i in range(5)]
    (line,) = study.seed_reference(sweep)
    assert "decide 50.0% of target rows differently (range 25.0–100.0 over 10 pairs)" in line
    assert "target average (1.58) differ by more than 1.0 point with probability 0.65" in line
    assert study.seed_reference(sweep[:4]) == []  # fewer than 5 seeds: no reference
