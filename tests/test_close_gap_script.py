"""scripts/close_gap.py: the paired z against the baseline of the same seed, and tables rendered from
an earlier render's record when the run folders are gone (another machine, a cleaned runs dir)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

LANGS = ("en", "de", "es", "fr", "ja", "ko", "zh")  # PAWS-X: English + its 6 official targets


@pytest.fixture(scope="module")
def close_gap():
    path = Path(__file__).resolve().parent.parent / "scripts" / "close_gap.py"
    spec = importlib.util.spec_from_file_location("close_gap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(run: str, seed, correct: dict[str, str]) -> dict:
    dev = {lang: {"accuracy": bits.count("1") / len(bits), "correct": bits, "rows": f"h-{lang}", "n": len(bits),
                  "seconds": 1.0, "limit": None, "labeled": True} for lang, bits in correct.items()}
    return {"run": run, "seed": seed, "dev": dev, "train": {"select_accuracy": 0.5, "train_seconds": 60.0},
            "compute": {"cpu_bf16_reason": "a test CPU"}}


def test_paired_z_counts_wins_and_losses_against_the_same_seed(close_gap):
    from xprompt.tasks import load_task

    task = load_task("pawsx")
    base = {lang: "1100" for lang in LANGS}
    # de: 2 wins (rows 2, 3), 0 losses; es: 1 loss (row 0); English rows never count (9 wins there)
    lever = {**base, "de": "1111", "es": "0100", "en": "1111"}
    other_seed_base = {lang: "0000" for lang in LANGS}
    baselines = {42: record("b42", 42, base), 13: record("b13", 13, other_seed_base)}
    z = close_gap._paired([record("l42", 42, lever)], baselines, 42, task)
    assert z == f"{(2 - 1) / 3 ** 0.5:+.1f}"  # +0.6: 2 wins, 1 loss over the targets
    # an ensemble (no seed) is compared with the first seed's baseline; a seed with no baseline is left out
    assert close_gap._paired([record("e", None, lever), record("l7", 7, lever)], baselines, 42, task) == "+0.6"
    # an ensemble of seeds 13 and 21 against seed 13's baseline (all wrong): 13 wins over the targets
    ensemble = record("ensemble:pawsx-baseline-s13,pawsx-baseline-s21", None, lever)
    assert close_gap._paired([ensemble], baselines, 42, task) == f"{13 / 13 ** 0.5:+.1f}"
    # a different row set (another dev file) is not paired
    moved = record("l42", 42, lever)
    moved["dev"]["de"]["rows"] = "other"
    assert close_gap._paired([moved], baselines, 42, task) == ""


def test_runs_whose_folders_are_gone_are_rendered_from_the_record(close_gap, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gap.md"
    base = record("pawsx-baseline-s42", 42, {lang: "1100" for lang in LANGS})
    lever = record("pawsx-augment-s42", 42, {**{lang: "1100" for lang in LANGS}, "de": "1111"})
    lever["compute"] = {"cpu_bf16_reason": "another CPU"}  # made on another machine: its speed stands apart
    out.with_suffix(".json").write_text(json.dumps({"pawsx": {"baseline": [base], "augment": [lever]}}))
    out.write_text("# old tables\n\n## What the figures say\n\nA reading by hand.\n")
    monkeypatch.setattr(sys, "argv", ["close_gap.py", "--tasks", "pawsx", "--levers", "baseline,augment",
                                      "--seeds", "42", "--runs-dir", str(tmp_path / "gone"), "--render-only",
                                      "--out", str(out)])
    close_gap.main()
    assert "pawsx-baseline-s42: from" in capsys.readouterr().out
    text = out.read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "**50.0**" in rows["| baseline"]  # 6 targets at 2 of 4
    assert "**58.3**" in rows["| augment"] and "+1.4" in rows["| augment"]  # de 4 of 4; z = 2 / sqrt 2
    assert "A: a test CPU; B: another CPU" in text
    assert rows["| baseline"].endswith("| 1.0 (A) | 4 (A) |")  # 28 rows in 7 seconds
    assert rows["| augment"].endswith("| 1.0 (B) | 4 (B) |")
    assert text.endswith("## What the figures say\n\nA reading by hand.\n")  # the hand-written reading stays
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["pawsx"]["augment"][0]["run"] == "pawsx-augment-s42"  # the record survives the re-render


def test_the_ensemble_of_seeds_is_rendered_from_its_record_or_made_over_the_prompts_here(close_gap, tmp_path,
                                                                                         monkeypatch):
    out = tmp_path / "gap.md"
    names = [f"pawsx-baseline-s{seed}" for seed in (42, 13, 21)]
    bases = [record(name, seed, {lang: "1100" for lang in LANGS}) for name, seed in zip(names, (42, 13, 21))]
    ensemble = record("ensemble:pawsx-baseline-s13,pawsx-baseline-s21", None, {lang: "1110" for lang in LANGS})
    out.with_suffix(".json").write_text(json.dumps({"pawsx": {"baseline": bases, "old label": [ensemble]}}))
    recorded = close_gap.recorded_runs(out.with_suffix(".json"))
    runs = tmp_path / "runs"
    assert close_gap.seed_members(runs, names, recorded) == names[1:]  # no prompt here: the recorded ensemble
    for name in names[:2]:  # prompts of seeds 42 and 13 here: as many seeds as the record, the prompts win
        (runs / name / "prompt").mkdir(parents=True)
        (runs / name / "prompt" / "prompt.safetensors").write_bytes(b"")
    assert close_gap.seed_members(runs, names, recorded) == names[:2]
    (runs / names[2] / "prompt").mkdir(parents=True)
    (runs / names[2] / "prompt" / "prompt.safetensors").write_bytes(b"")
    assert close_gap.seed_members(runs, names, recorded) == names  # all three: the most seeds
    assert close_gap.seed_members(runs, names[:1], {}) == []  # one seed is no ensemble

    monkeypatch.setattr(sys, "argv", ["close_gap.py", "--tasks", "pawsx", "--levers", "baseline", "--seeds", "42,13,21",
                                      "--runs-dir", str(tmp_path / "gone"), "--render-only", "--out", str(out)])
    close_gap.main()
    rows = {line.split(" | ")[0]: line for line in out.read_text().splitlines() if line.startswith("| ")}
    row = rows["| ensemble of the baseline's seeds (13, 21)"]
    assert "**75.0**" in row and f"+{6 / 6 ** 0.5:.1f}" in row  # 3 of 4 per target; 6 wins over seed 13's baseline
    again = json.loads(out.with_suffix(".json").read_text())["pawsx"]
    assert again["ensemble of the baseline's seeds (13, 21)"][0]["run"] == ensemble["run"]
    assert "old label" not in again  # the record moved to its new label, not copied


def test_a_render_of_some_levers_keeps_the_stored_records_of_the_others(close_gap, tmp_path, monkeypatch):
    # two lanes sharing one --out (or a later render of one lever) must not wipe each other's records
    out = tmp_path / "gap.md"
    base = record("pawsx-baseline-s42", 42, {lang: "1100" for lang in LANGS})
    lever = record("pawsx-augment-s42", 42, {lang: "1110" for lang in LANGS})
    other = record("xnli-baseline-s42", 42, {lang: "10" for lang in LANGS})
    out.with_suffix(".json").write_text(json.dumps({"pawsx": {"baseline": [base], "augment": [lever]},
                                                    "xnli": {"baseline": [other]}}))
    monkeypatch.setattr(sys, "argv", ["close_gap.py", "--tasks", "pawsx", "--levers", "baseline", "--seeds", "42",
                                      "--runs-dir", str(tmp_path / "gone"), "--render-only", "--out", str(out)])
    close_gap.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| augment")]
    assert rows == []  # the table shows what this render tabulated ...
    again = json.loads(out.with_suffix(".json").read_text())  # ... the store keeps every record, once
    assert [r["run"] for r in again["pawsx"]["augment"]] == ["pawsx-augment-s42"]
    assert [r["run"] for r in again["pawsx"]["baseline"]] == ["pawsx-baseline-s42"]
    assert [r["run"] for r in again["xnli"]["baseline"]] == ["xnli-baseline-s42"]
    # a new record of a stored run replaces it; a new seed joins the lever's list
    fresh = dict(base, seed=42, train={"select_accuracy": 0.9, "train_seconds": 1.0})
    seed13 = record("pawsx-baseline-s13", 13, {lang: "1100" for lang in LANGS})
    stored = close_gap.merged(again, {"pawsx": {"baseline": [fresh, seed13]}})
    assert [r["train"]["select_accuracy"] for r in stored["pawsx"]["baseline"]] == [0.9, 0.5]
    assert list(stored["pawsx"]) == ["augment", "baseline"]
