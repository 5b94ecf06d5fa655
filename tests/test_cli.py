import csv
import json

import pytest
from typer.testing import CliRunner

from conftest import TEST_DATA
from xprompt.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    runs = tmp_path_factory.mktemp("runs")
    result = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                    "--max-steps", 6, "--eval-every", 3, "--prompt-length", 4, "--batch-size", 8,
                    "--run-name", "tiny", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    return runs / "tiny"


def test_train_writes_a_complete_run(trained, tiny_bert_dir):
    assert {p.name for p in trained.iterdir()} >= {"config.json", "prompt", "metrics.json", "log.jsonl"}
    config = json.loads((trained / "config.json").read_text())
    assert config["train"]["method"] == "deep" and config["train"]["max_steps"] == 6
    assert len(config["backbone"]["sha256"]) == 64
    card = json.loads((trained / "prompt" / "xprompt.json").read_text())
    assert card["labels"] == ["entailment", "neutral", "contradiction"]
    assert card["selection"]["train_rows"] == 96  # 120 pool rows, 24 held out for selection
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "select_accuracy" in r] == [0, 3, 6]
    assert any("loss" in r for r in log)


def test_eval_table_metrics_and_predictions(trained):
    result = invoke("eval", "--run", trained, "--langs", "en,zh,de", "--data-dir", TEST_DATA)
    assert result.exit_code == 0, result.output
    for text in ("en", "zh", "de", "avg (partial: de, zh)", "avg (with en)", "gap (en - targets)"):
        assert text in result.output
    metrics = json.loads((trained / "metrics.json").read_text())
    dev = metrics["eval"]["xnli"]["dev"]
    assert set(dev) == {"en", "zh", "de"} and dev["zh"]["n"] == 24
    assert 0.0 <= dev["zh"]["accuracy"] <= 1.0 and "train" in metrics
    rows = list(csv.reader((trained / "predictions" / "xnli.dev.zh.tsv").open(), delimiter="\t"))
    assert rows[0] == ["id", "prediction"] and len(rows) == 25
    ids = [json.loads(line)["id"] for line in (TEST_DATA / "xnli/dev.zh.jsonl").read_text().splitlines()]
    assert [r[0] for r in rows[1:]] == [str(i) for i in ids]
    assert {r[1] for r in rows[1:]} <= {"entailment", "neutral", "contradiction"}
    from xprompt.registry import list_runs

    (indexed,) = list_runs(trained.parent)
    assert indexed["run_id"] == "tiny" and indexed["finished"] == 1
    assert {(r["task"], r["lang"]) for r in indexed["results"]} >= {("xnli", "zh"), ("xnli", "de")}


def test_eval_json_matches_table_numbers(trained):
    result = invoke("eval", "--run", trained, "--langs", "en,de", "--data-dir", TEST_DATA, "--json", "--limit", 10)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["results"]["de"]["n"] == 10
    accs = [out["results"][lang]["accuracy"] for lang in ("en", "de")]
    assert out["summary"]["avg_all"] == pytest.approx(sum(accs) / 2)
    assert out["summary"]["gap"] == pytest.approx(accs[0] - accs[1])


def test_eval_latest_run_on_unlabeled_test_split(trained):
    result = invoke("eval", "--runs-dir", trained.parent, "--langs", "zh", "--split", "test", "--data-dir", TEST_DATA)
    assert result.exit_code == 0, result.output
    assert "no labels found in the test files of zh" in result.output
    rows = (trained / "predictions" / "xnli.test.zh.tsv").read_text().splitlines()
    assert len(rows) == 13


def test_tasks_command():
    result = invoke("tasks")
    assert result.exit_code == 0
    assert "xnli" in result.output and "pawsx" in result.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["train", "--task", "nope"], 1, "unknown task 'nope'"),
        (["train", "--lang", "zh"], 1, "unknown language(s) for the train split of xnli: zh"),
        (["train", "--method", "lora"], 2, "Invalid value for '--method'"),
        (["train", "--prompt-length", "0"], 2, "prompt_length must be >= 1"),
        (["eval", "--runs-dir", "{empty}"], 1, "no finished run under"),
        (["eval", "--run", "{run}", "--langs", "en,xx"], 1, "unknown language(s) for the dev split of xnli: xx"),
        (["eval", "--run", "{run}", "--split", "valid"], 2, "unknown split 'valid'"),
        (["eval", "--run", "{run}", "--data-dir", "{missing}"], 1, "is not a folder"),
    ],
)
def test_bad_input_one_line_error(trained, tmp_path, args, code, message):
    fill = {"{run}": str(trained), "{empty}": str(tmp_path), "{missing}": str(tmp_path / "missing")}
    result = invoke(*[fill.get(a, a) for a in args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())


def test_prompt_from_another_backbone_is_refused(trained, other_bert_dir):
    result = invoke("eval", "--run", trained, "--backbone", other_bert_dir, "--langs", "en",
                    "--data-dir", TEST_DATA)
    assert result.exit_code == 1
    assert "the prompt was trained on backbone" in result.output


def test_malformed_data_file_names_line(trained, tmp_path):
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "dev.de.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{oops\n')
    before = sorted(p.name for p in (trained / "predictions").iterdir())
    result = invoke("eval", "--run", trained, "--langs", "de", "--data-dir", tmp_path)
    assert result.exit_code == 1
    assert "dev.de.jsonl:2: malformed JSON" in result.output
    assert sorted(p.name for p in (trained / "predictions").iterdir()) == before


def test_backbone_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("train", "--backbone", "no-such-org/no-such-model", "--runs-dir", tmp_path)
    assert result.exit_code == 1
    assert "cannot load backbone 'no-such-org/no-such-model'" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--backbone", tmp_path / "empty", "--runs-dir", tmp_path)
    assert result.exit_code == 1 and "has no config.json" in " ".join(result.output.split())
    assert not any(p.name != "empty" for p in tmp_path.iterdir())  # no half-made run directory


def test_failed_training_leaves_no_run_directory(tiny_bert_dir, tmp_path):
    data = tmp_path / "data"
    (data / "mnli").mkdir(parents=True)
    (data / "mnli" / "train_9k.en.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "yes"}\n')
    runs = tmp_path / "runs"
    result = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", data, "--runs-dir", runs)
    assert result.exit_code == 1
    assert "train_9k.en.jsonl:1: label 'yes' is not a label of task xnli" in " ".join(result.output.split())
    assert not runs.exists()  # neither the run nor the runs folder this command created


def test_resume_a_finished_run_is_refused(trained):
    result = invoke("train", "--resume", trained)
    assert result.exit_code == 1 and "already finished" in result.output


def test_sigterm_then_resume_finishes_the_run(tiny_bert_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    flags = ["--backbone", str(tiny_bert_dir), "--data-dir", str(TEST_DATA), "--runs-dir", str(runs),
             "--max-steps", "120", "--eval-every", "5", "--prompt-length", "2", "--batch-size", "4", "--dtype", "fp32"]
    proc = subprocess.Popen([sys.executable, "-m", "xprompt", "train", *flags, "--run-name", "killed"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = runs / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.13)  # between checkpoints, most likely inside a step
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "xprompt train --resume" in " ".join(out.split())
    stopped_at = json.loads(state.read_text())["step"]
    assert 0 < stopped_at < 120
    result = invoke("train", "--resume", runs / "killed")
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (runs / "killed" / "log.jsonl").read_text().splitlines()]
    assert {"step": stopped_at, "resumed": True} in log
    assert json.loads((runs / "killed" / "metrics.json").read_text())["train"]["steps"] == 120

    # the same as an uninterrupted run: the prompt, the last checkpoint's tensors and moments, the selections
    result = invoke("train", *flags, "--run-name", "whole")
    assert result.exit_code == 0, result.output

    def final(name):
        meta = json.loads((runs / name / "checkpoint" / "state.json").read_text())
        tensors = load_file(str(runs / name / "checkpoint" / meta["tensors"]))
        tensors.update({f"prompt.{k}": v for k, v in load_file(str(runs / name / "prompt" / "prompt.safetensors")).items()})
        lines = (runs / name / "log.jsonl").read_text().splitlines()
        return tensors, [json.loads(line) for line in lines if "select_accuracy" in line], meta["best_step"]

    (killed, killed_selections, killed_best), (whole, whole_selections, whole_best) = final("killed"), final("whole")
    assert killed.keys() == whole.keys()
    for name in whole:
        if not name.startswith("rng."):
            assert torch.equal(killed[name], whole[name]), name
    assert (killed_selections, killed_best) == (whole_selections, whole_best)


def test_debug_shows_the_traceback():
    from xprompt.errors import XPromptError

    result = runner.invoke(app, ["--debug", "train", "--task", "nope"])
    assert result.exit_code != 0
    assert isinstance(result.exception, XPromptError)
    result = runner.invoke(app, ["train", "--task", "nope"])
    assert result.exit_code == 1 and not isinstance(result.exception, XPromptError)


def test_cross_task_zero_shot_through_the_label_map(trained):
    result = invoke("eval", "--run", trained, "--task", "ocnli", "--langs", "zh", "--data-dir", TEST_DATA, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["task"] == "ocnli" and out["results"]["zh"]["n"] == 21
    preds = (trained / "predictions" / "ocnli.dev.zh.tsv").read_text().splitlines()[1:]
    assert len(preds) == 21 and {p.split("\t")[1] for p in preds} <= {"entailment", "neutral", "contradiction"}
    assert "ocnli" in json.loads((trained / "metrics.json").read_text())["eval"]


def test_seeds_sweep_trains_one_run_per_seed(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    result = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                    "--max-steps", 2, "--eval-every", 2, "--prompt-length", 2, "--shots", 4, "--dtype", "fp32",
                    "--seeds", "13,21", "--run-name", "sweep")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["sweep-s13", "sweep-s21"]
    seeds = [json.loads((runs / n / "config.json").read_text())["train"]["seed"] for n in ("sweep-s13", "sweep-s21")]
    assert seeds == [13, 21]
    assert invoke("train", "--seeds", "1,x").exit_code == 2


def test_target_language_few_shot_adaptation(trained):
    result = invoke("eval", "--run", trained, "--langs", "zh", "--shots", 2, "--adapt-steps", 3,
                    "--data-dir", TEST_DATA, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    adapted = trained.parent / "tiny-adapt-zh-k2-t3-s42"
    config = json.loads((adapted / "config.json").read_text())["train"]
    assert config["init_from"] == str(trained) and config["source_split"] == "dev" and config["lang"] == "zh"
    metrics = json.loads((adapted / "metrics.json").read_text())
    used = metrics["train"]["used_ids"]
    assert len(used) == 12  # 2 train + 2 selection rows per class, all from zh dev
    zh = metrics["eval"]["xnli"]["dev"]["zh"]
    assert zh["n"] == 24 - 12 and zh["zero_shot"]["n"] == 12  # both on the same rest of dev
    text = " ".join(result.output.split())
    assert "zero-shot" in text and "2-shot" in text


def test_task_card_train_defaults_and_flag_override(tiny_bert_dir, tmp_path):
    common = ["train", "--task", "pawsx", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir",
              tmp_path, "--max-steps", 1, "--eval-every", 1, "--prompt-length", 2, "--dtype", "fp32"]
    assert invoke(*common, "--run-name", "card").exit_code == 0
    assert invoke(*common, "--run-name", "flag", "--lr", "0.05").exit_code == 0
    lrs = [json.loads((tmp_path / n / "config.json").read_text())["train"]["lr"] for n in ("card", "flag")]
    assert lrs == [0.01, 0.05]


def test_every_phase_before_the_first_step_says_what_it_does(tiny_bert_dir, tmp_path, monkeypatch):
    """Loading, tokenising N rows, the label vectors' class means, the step-0 selection pass: each a
    line with its count; the final line's training examples/s counts the steps alone (selection
    passes, here slowed to 0.4 s each, are reported apart), as metrics.json records; eval says its phases."""
    import re
    import time

    import xprompt.workflows.runs as runs

    real = runs.predict
    monkeypatch.setattr(runs, "predict", lambda *a, **k: time.sleep(0.4) or real(*a, **k))
    result = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", tmp_path,
                    "--max-steps", 6, "--eval-every", 3, "--prompt-length", 4, "--batch-size", 8,
                    "--run-name", "phases", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    for text in ("loaded backbone", "tokenising 120 en rows (96 training, 24 for selection)",
                 "initialising label vectors from the class means of 96 training rows",
                 "step-0 selection pass on 24 held-out en rows"):
        assert re.search(re.escape(text) + r".*?: \d+\.\ds", out), text
    train = json.loads((tmp_path / "phases" / "metrics.json").read_text())["train"]
    assert train["train_examples"] == 48 and train["select_passes"] == 3 and train["select_rows"] == 24
    assert train["select_seconds"] >= 1.2  # three slowed passes
    assert train["step_seconds"] <= train["train_seconds"] - 0.8 + 0.05  # the two passes inside the loop left out
    assert train["train_examples_per_s"] == pytest.approx(48 / train["step_seconds"], rel=0.01)
    done = re.search(r"training ([\d.]+) ex/s \(48 examples in ([\d.]+)s of steps\), selection ([\d.]+)s "
                     r"\(3 passes on 24 rows\)", out)
    assert done and float(done.group(1)) == pytest.approx(train["train_examples_per_s"], abs=0.06), out
    log = [json.loads(line) for line in (tmp_path / "phases" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "select_accuracy" in r] == [0, 3, 6]

    result = invoke("eval", "--run", tmp_path / "phases", "--langs", "de", "--data-dir", TEST_DATA)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert re.search(r"de: tokenising \d+ dev rows.*?: \d+\.\ds", out) and re.search(r"de: scoring \d+ rows: \d+\.\ds", out)
    result = invoke("eval", "--run", tmp_path / "phases", "--langs", "de", "--data-dir", TEST_DATA, "--json")
    assert "scoring" not in result.stdout and json.loads(result.stdout)["results"]["de"]["n"] > 0
