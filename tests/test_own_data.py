"""The own-data journey (issue 33, part): an English labelled CSV of your own -> a task card -> a
prompt -> labels with probabilities for German and Chinese text, through the CLI and through Python."""

import csv
import json

from typer.testing import CliRunner

from xprompt.cli import app

runner = CliRunner()
POSITIVE = ["I loved this film", "What a wonderful day", "Great service and kind staff", "A delightful book",
            "The food was excellent", "Brilliant acting all round", "I am very happy with it", "Superb value"]
NEGATIVE = ["I hated this film", "What a terrible day", "Awful service and rude staff", "A boring book",
            "The food was disgusting", "Dreadful acting all round", "I am very unhappy with it", "Poor value"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def write_csv(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def test_your_csv_to_labels_in_other_languages(tiny_bert_dir, tmp_path):
    train = tmp_path / "reviews.csv"
    rows = [{"review": text, "stars": label} for _ in range(3) for text, label in
            [*((t, "good") for t in POSITIVE), *((t, "bad") for t in NEGATIVE)]]
    write_csv(train, rows, ["review", "stars"])
    cards = tmp_path / "cards"
    made = invoke("task", "new", "reviews", "--train", train, "--fields", "text=review", "--label-field", "stars",
                  "--tasks-dir", cards)
    assert made.exit_code == 0, made.output
    card = (cards / "reviews.yaml").read_text()
    assert "labels:\n- bad\n- good" in card and "{text} <mask>" in card and "label_words" not in card
    assert "48 en rows (bad 24, good 24)" in " ".join(made.output.split())

    runs = tmp_path / "runs"
    trained = invoke("train", "--task", "reviews", "--tasks-dir", cards, "--backbone", tiny_bert_dir, "--runs-dir", runs,
                     "--max-steps", 4, "--eval-every", 2, "--prompt-length", 2, "--batch-size", 8, "--dtype", "fp32",
                     "--select-size", 16, "--run-name", "mine")
    assert trained.exit_code == 0, trained.output
    summary = json.loads((runs / "mine" / "metrics.json").read_text())["train"]
    assert summary["train_rows"] == 48 - 16  # --select-size taken as given
    config = json.loads((runs / "mine" / "config.json").read_text())
    assert config["tasks_dir"] == str(cards)

    foreign = tmp_path / "foreign.csv"
    write_csv(foreign, [{"id": "d1", "text": "Ein wunderbarer Film", "lang": "de"},
                        {"id": "z1", "text": "这部电影很糟糕", "lang": "zh"}], ["id", "text", "lang"])
    out_file = tmp_path / "labels.jsonl"
    labelled = invoke("predict", "--run", runs / "mine", "--input", foreign, "--out", out_file, "--dtype", "fp32")
    assert labelled.exit_code == 0, labelled.output
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["id"], r["lang"]) for r in records] == [("d1", "de"), ("z1", "zh")]
    assert all(set(r["probabilities"]) == {"bad", "good"} and r["label"] in ("bad", "good") for r in records)

    import xprompt

    model = xprompt.load(runs / "mine", dtype="fp32")  # its task card found through the run's own record
    again = model.predict(["Ein wunderbarer Film", "这部电影很糟糕"])
    assert [r["label"] for r in again] == [r["label"] for r in records]
    assert all(abs(again[i]["probabilities"]["good"] - records[i]["probabilities"]["good"]) < 1e-6 for i in range(2))

    # eval with no --tasks-dir reads the run's cards; every train row was read by the run: nothing to score
    scored = invoke("eval", "--run", runs / "mine", "--langs", "en", "--split", "train", "--dtype", "fp32")
    assert scored.exit_code == 1 and "nothing is left to score" in " ".join(scored.output.split())


def test_hard_label_words_are_asked_for_only_where_read(tiny_bert_dir, tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": label}) + "\n"
                             for t, label in [("good one", "pos"), ("bad one", "neg")] * 5))
    cards = tmp_path / "cards"
    assert invoke("task", "new", "tiny", "--train", train, "--tasks-dir", cards).exit_code == 0
    again = invoke("task", "new", "tiny", "--train", train, "--tasks-dir", cards)
    assert again.exit_code == 1 and "exists" in again.output
    hard = invoke("train", "--task", "tiny", "--tasks-dir", cards, "--backbone", tiny_bert_dir, "--runs-dir",
                  tmp_path / "runs", "--max-steps", 1, "--verbalizer", "hard", "--dtype", "fp32")
    assert hard.exit_code == 1 and "gives none" in hard.output
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\n,neg\n")
    out = invoke("task", "new", "bad", "--train", bad, "--tasks-dir", cards)
    assert out.exit_code == 1 and "bad.csv:3: field 'text' is empty" in out.output
