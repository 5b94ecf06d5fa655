"""Applying a prompt to your own data (issue 33, part): ``xprompt predict`` and the Python API give the
labels ``eval`` gives on the same rows; malformed input is named by its line; nothing half-written."""

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
def runs(tmp_path_factory, tiny_bert_dir):
    runs = tmp_path_factory.mktemp("predict") / "runs"
    for name, seed in (("A", 1), ("B", 2)):
        out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 3,
                     "--eval-every", 3, "--prompt-length", 2, "--batch-size", 8, "--dtype", "fp32", "--run-name", name,
                     "--seed", seed, "--lr", 0.3)
        assert out.exit_code == 0, out.output
    return runs


def eval_labels(run) -> dict[str, str]:
    out = invoke("eval", "--run", run, "--langs", "de", "--data-dir", TEST_DATA, "--dtype", "fp32")
    assert out.exit_code == 0, out.output
    lines = (run / "predictions" / "xnli.dev.de.tsv").read_text().splitlines()[1:]
    return dict(line.split("\t") for line in lines)


def unlabelled_rows():
    rows = [json.loads(line) for line in (TEST_DATA / "xnli" / "dev.de.jsonl").read_text().splitlines() if line.strip()]
    return [{"id": str(r["id"]), "satz": r["premise"], "hypothese": r["hypothesis"]} for r in rows]


def test_predict_gives_eval_s_labels_on_your_csv(runs, tmp_path):
    expected = eval_labels(runs / "A")
    source = tmp_path / "mine.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "satz", "hypothese"])
        writer.writeheader()
        writer.writerows(unlabelled_rows())
    out_file = tmp_path / "labels.jsonl"
    out = invoke("predict", "--run", runs / "A", "--input", source, "--out", out_file, "--fields",
                 "premise=satz,hypothesis=hypothese", "--lang", "de", "--dtype", "fp32")
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {r["id"]: r["label"] for r in records} == expected and len(records) == 24
    first = records[0]
    assert first["line"] == 2 and first["lang"] == "de" and first["run"] == ["A"] and "<mask>" in first["template"]
    assert first["input"]["premise"].startswith("und er hat gesagt")
    assert abs(sum(first["probabilities"].values()) - 1) < 1e-4
    assert first["label"] == max(first["probabilities"], key=first["probabilities"].get)
    again = invoke("predict", "--run", runs / "A", "--input", source, "--out", out_file, "--fields",
                   "premise=satz,hypothesis=hypothese")
    assert again.exit_code == 1 and "exists" in again.output  # never overwritten silently


def test_several_runs_give_their_ensemble_and_each_run(runs, tmp_path):
    ensemble = json.loads(invoke("eval", "--run", f"{runs / 'A'},{runs / 'B'}", "--langs", "de", "--data-dir", TEST_DATA,
                                 "--dtype", "fp32", "--json").stdout)["run"]
    from pathlib import Path

    lines = (Path(ensemble) / "predictions" / "xnli.dev.de.tsv").read_text().splitlines()[1:]
    expected = dict(line.split("\t") for line in lines)
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps({"id": r["id"], "premise": r["satz"], "hypothesis": r["hypothese"],
                                          "lang": "de"}) + "\n" for r in unlabelled_rows()))
    out_file = tmp_path / "labels.jsonl"
    assert invoke("predict", "--run", f"{runs / 'A'},{runs / 'B'}", "--input", source, "--out", out_file,
                  "--dtype", "fp32").exit_code == 0
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {r["id"]: r["label"] for r in records} == expected
    r = records[0]
    assert set(r["runs"]) == {"A", "B"} and r["run"] == ["A", "B"]
    for label, p in r["probabilities"].items():
        assert abs(p - (r["runs"]["A"]["probabilities"][label] + r["runs"]["B"]["probabilities"][label]) / 2) < 1e-5


@pytest.mark.parametrize("text, message", [
    ('{"premise": "a", "hypothesis": "b"}\n{"premise": "a"\n', "mine.jsonl:2: malformed JSON"),
    ('{"premise": "a", "hypothesis": "b"}\n\n{"premise": "a"}\n', "mine.jsonl:3: field 'hypothesis' is missing"),
    ('{"premise": "a", "hypothesis": 3}\n', "mine.jsonl:1: field 'hypothesis' is not text (int)"),
])
def test_a_malformed_row_is_named_by_its_line_and_nothing_is_written(runs, tmp_path, text, message):
    source = tmp_path / "mine.jsonl"
    source.write_text(text)
    out = invoke("predict", "--run", runs / "A", "--input", source, "--out", tmp_path / "labels.jsonl")
    assert out.exit_code == 1 and message in " ".join(out.output.split())
    assert not (tmp_path / "labels.jsonl").exists() and not list(tmp_path.glob(".labels.jsonl.*"))


def test_the_python_api_labels_rows_as_the_cli_does(runs):
    import xprompt

    expected = eval_labels(runs / "A")
    model = xprompt.load(runs / "A", dtype="fp32")
    rows = [{"premise": r["satz"], "hypothesis": r["hypothese"], "lang": "de"} for r in unlabelled_rows()]
    assert [r["label"] for r in model.predict(rows)] == [expected[r["id"]] for r in unlabelled_rows()]
    with pytest.raises(xprompt_error()):
        model.predict(["one text"])  # XNLI reads two fields
    scored = xprompt.evaluate(runs / "A", ["de"], data_dir=TEST_DATA, dtype="fp32")
    assert scored["results"]["de"]["n"] == 24 and 0 <= scored["results"]["de"]["accuracy"] <= 1


def xprompt_error():
    from xprompt.errors import XPromptError

    return XPromptError
