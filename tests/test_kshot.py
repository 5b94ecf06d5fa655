"""Published k-shot splits (the marc card: the UniPrompt authors' MARC splits): --shots K --seed S reads
the card's files as they are (ids asserted against the files), selection reads the split's dev file and
the lineage says so, and a K or seed without a file is a one-line error listing the published ones."""

import gzip
import json

import pytest
from typer.testing import CliRunner

from xprompt.cli import app
from xprompt.config import TrainConfig
from xprompt.data import BUNDLED_DATA_DIR, prepare_data
from xprompt.errors import XPromptError
from xprompt.tasks import load_task


def ids(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f]


@pytest.mark.parametrize("shots,seed", [(16, 13), (4, 100)])
def test_published_split_is_read_exactly(tokenizer, shots, seed):
    marc = load_task("marc")
    data = prepare_data(TrainConfig(task="marc", shots=shots, seed=seed, template="agnostic"), marc, tokenizer, None)
    folder = BUNDLED_DATA_DIR / "marc" / "kshot" / f"{shots}-{seed}"
    assert data.train_ids == ids(folder / "train.en.jsonl.gz") and len(data.train_ids) == 5 * shots
    assert data.select_ids == ids(folder / "dev.en.jsonl.gz") and data.select_split == "dev"
    assert f"published {shots}-shot split of seed {seed}" in data.describe


def test_an_unpublished_k_or_seed_names_the_published_ones(tokenizer):
    marc = load_task("marc")
    with pytest.raises(XPromptError) as error:
        prepare_data(TrainConfig(task="marc", shots=16, seed=7, template="agnostic"), marc, tokenizer, None)
    message = str(error.value)
    assert "--shots 16 --seed 7" in message and "--shots 4 --seed 13" in message and "--shots 256 --seed 100" in message
    assert message.count("--shots") == 1 + 7 * 5 and "\n" not in message


def test_marc_card_and_its_data():
    marc = load_task("marc")
    assert marc.labels == ("1", "2", "3", "4", "5") and marc.official_targets == ["de", "es", "fr", "ja", "zh"]
    for lang in marc.official_languages:
        assert len(ids(BUNDLED_DATA_DIR / "marc" / f"dev.{lang}.jsonl.gz")) > 1200
        assert len(marc.languages[lang].label_words) == 5


def test_train_with_a_published_split_from_the_cli(tiny_bert_dir, tmp_path):
    runner = CliRunner()
    args = ["train", "--task", "marc", "--backbone", str(tiny_bert_dir), "--runs-dir", str(tmp_path), "--max-steps", "2",
            "--eval-every", "2", "--prompt-length", "2", "--dtype", "fp32", "--shots", "4", "--seed", "42", "--run-name", "k"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    lineage = json.loads((tmp_path / "k" / "lineage.json").read_text())
    reads = {(r["split"], r["use"]): r["rows"] for r in lineage["reads"]}
    assert reads == {("train", "train"): 20, ("dev", "select"): 20}
    wrong = runner.invoke(app, [*args[:-2], "--run-name", "k2", "--seed", "43"])
    assert wrong.exit_code == 1 and "publishes no train split for --shots 4 --seed 43" in wrong.output
    assert "Traceback" not in wrong.output and not (tmp_path / "k2").exists()
