"""PPT: the pre-training formats built from a tiny corpus, and a pre-trained prompt as a run and a start."""

import json

import pytest

from conftest import TEST_DATA
from test_cli import invoke
from xprompt.errors import XPromptError
from xprompt.pretraining import PAIR_LABELS, bundled_corpus, choice_rows, pair_rows, read_corpus, split_sentences

DOCS = [["A1.", "A2.", "A3."], ["B1.", "B2."], ["C1.", "C2.", "C3.", "C4."]]
ADJACENT = {("A1.", "A2."), ("A2.", "A3."), ("B1.", "B2."), ("C1.", "C2."), ("C2.", "C3."), ("C3.", "C4.")}
DOC_OF = {s: i for i, doc in enumerate(DOCS) for s in doc}


def test_sentences_split_after_latin_and_chinese_ends():
    assert split_sentences("One. Two? Three!") == ["One.", "Two?", "Three!"]
    assert split_sentences("房间很好。早餐一般！还会再来吗？会") == ["房间很好。", "早餐一般！", "还会再来吗？", "会"]


def test_pair_rows_are_balanced_and_exact():
    rows = pair_rows(DOCS, seed=0)
    by_label = {label: [(r["sentence1"], r["sentence2"]) for r in rows if r["label"] == label] for label in PAIR_LABELS}
    # same-document pairs exist only for sentences with a non-adjacent sibling: A1 (A3), C1 (C3/C4), C2 (C4), C3 (C1)
    assert {len(v) for v in by_label.values()} == {4} and len(rows) == 12
    assert set(by_label["next"]) <= ADJACENT
    assert set(by_label["same-document"]) <= {("A1.", "A3."), ("C1.", "C3."), ("C1.", "C4."), ("C2.", "C4."),
                                               ("C3.", "C1.")}
    assert {a for a, _ in by_label["same-document"]} == {"A1.", "C1.", "C2.", "C3."}
    for a, b in by_label["same-document"]:
        assert DOC_OF[a] == DOC_OF[b] and abs(DOCS[DOC_OF[a]].index(a) - DOCS[DOC_OF[b]].index(b)) > 1
    for a, b in by_label["other-document"]:
        assert DOC_OF[a] != DOC_OF[b]
    assert pair_rows(DOCS, seed=0) == rows and pair_rows(DOCS, seed=1) != rows  # seeded
    assert [r["id"] for r in rows] == [f"pair-{i}" for i in range(12)]


def test_choice_rows_point_at_the_next_sentence():
    rows = choice_rows(DOCS, seed=0)
    assert len(rows) == len(ADJACENT)
    for row in rows:
        options = row["options"].split(" (")
        letters = [o.lstrip("(")[0] for o in options]
        texts = [o.split(") ", 1)[1] for o in options]
        assert letters == ["A", "B", "C", "D"]
        right = texts[letters.index(row["label"])]
        assert (row["context"], right) in ADJACENT
        assert all(DOC_OF[t] != DOC_OF[row["context"]] for t in texts if t != right)


def test_corpus_files_and_their_errors(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("A1.\nA2.\n\nB1.\n\nC1.\nC2.\nC3.\n")
    assert read_corpus(text) == [["A1.", "A2."], ["C1.", "C2.", "C3."]]  # B has one sentence: no pair
    lines = tmp_path / "corpus.jsonl"
    lines.write_text(json.dumps({"text": "One. Two."}) + "\n" + json.dumps({"text": "单句。"}) + "\n")
    assert read_corpus(lines) == [["One.", "Two."]]
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(XPromptError, match="bad.jsonl:1: expected an object with a string 'text' field"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "short.txt").write_text("one\n\ntwo\n")
    with pytest.raises(XPromptError, match="no document of two or more sentences"):
        read_corpus(tmp_path / "short.txt")


def test_the_bundled_corpus_is_training_text_only():
    from xprompt.data import BUNDLED_DATA_DIR

    docs, stats = bundled_corpus(BUNDLED_DATA_DIR)
    assert set(stats) == {"en", "zh"} and all(len(d) >= 2 for d in docs)
    sources = [s for entry in stats.values() for s in entry["sources"]]
    assert sources and all("train" in s or "pool" in s for s in sources)
    assert sum(entry["documents"] for entry in stats.values()) == len(docs)


def test_a_pretrained_prompt_is_a_run_and_a_start(tiny_bert_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(f"Sentence {d}-{i} about topic {d}." for i in range(4)) for d in range(6)))
    runs = tmp_path / "runs"
    out = invoke("pretrain", "--backbone", tiny_bert_dir, "--corpus", corpus, "--runs-dir", runs, "--max-steps", 3,
                 "--eval-every", 3, "--prompt-length", 2, "--dtype", "fp32", "--run-name", "ppt")
    assert out.exit_code == 0, out.output
    run = runs / "ppt"
    card = json.loads((run / "prompt" / "xprompt.json").read_text())
    assert card["task"] == "ppt-pair" and card["labels"] == PAIR_LABELS and card["train_language"] == "mixed"
    stats = json.loads((run / "pretraining" / "corpus.json").read_text())
    assert stats["documents"] == 6 and stats["sentences"] == 24 and stats["rows"] == 3 * 18  # 18 next, same-document and other-document pairs
    config = json.loads((run / "config.json").read_text())
    assert config["tasks_dir"].endswith("pretraining/tasks") and config["data_dir"].endswith("pretraining/data")
    assert "selection on" in card["selection"]["data"]  # held-out pre-training rows
    start = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 1,
                   "--prompt-length", 2, "--dtype", "fp32", "--init-from", run, "--run-name", "down")
    assert start.exit_code == 0, start.output
    down = json.loads((runs / "down" / "prompt" / "xprompt.json").read_text())
    assert f"from {run}" in down["selection"]["init"] and "class means" in down["selection"]["init"]
