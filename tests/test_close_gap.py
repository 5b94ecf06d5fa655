"""The levers a zero-shot user has besides English labels: self-training on unlabeled target text
(pseudo-labelling rules, protocols), prompt ensembles, and neighbour-swap augmentation."""

import json

import numpy as np
import pytest
import torch

from conftest import TEST_DATA
from test_cli import invoke
from xprompt.selftrain import pseudo_rows


# ---------------------------------------------------------------- pseudo-labelling rules

PROBS = np.array([
    [0.90, 0.05, 0.05],  # 0: class 0, sure
    [0.50, 0.30, 0.20],  # 1: class 0, unsure
    [0.10, 0.80, 0.10],  # 2: class 1
    [0.20, 0.70, 0.10],  # 3: class 1, less sure
    [0.10, 0.15, 0.75],  # 4: class 2
    [0.60, 0.20, 0.20],  # 5: class 0
    [0.05, 0.05, 0.90],  # 6: class 2, sure
    [0.34, 0.33, 0.33],  # 7: class 0, barely
    [0.10, 0.55, 0.35],  # 8: class 1
])


def test_threshold_keeps_the_confident_rows():
    rows, labels = pseudo_rows(PROBS, "threshold", threshold=0.75)
    assert rows.tolist() == [0, 2, 4, 6] and labels.tolist() == [0, 1, 2, 2]


def test_top_keeps_the_most_confident_rows_of_each_class_balanced():
    rows, labels = pseudo_rows(PROBS, "top", fraction=2 / 3)  # 9 rows * 2/3 / 3 classes = 2 per class
    assert rows.tolist() == [0, 2, 3, 4, 5, 6] and labels.tolist() == [0, 1, 1, 2, 0, 2]
    rows, _ = pseudo_rows(PROBS, "top", fraction=0.34)  # 1 per class
    assert rows.tolist() == [0, 2, 6]
    few = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])  # class 1 is predicted once
    rows, labels = pseudo_rows(few, "top", fraction=1.0)  # 2 per class asked, class 1 has only one
    assert rows.tolist() == [0, 1, 3] and labels.tolist() == [0, 0, 1]


# ---------------------------------------------------------------- self-training runs and their protocol

def test_self_training_reads_test_inputs_and_is_transductive_only_there(tiny_bert_dir, tmp_path):
    from xprompt.registry import list_runs
    from xprompt.reports import leaderboard

    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
                 "--prompt-length", 2, "--dtype", "fp32", "--unlabeled", "zh", "--unlabeled-rows", 12,
                 "--self-train-steps", 2, "--pseudo-fraction", 0.5, "--run-name", "st")
    assert out.exit_code == 0, out.output
    card = json.loads((runs / "st" / "prompt" / "xprompt.json").read_text())
    st = card["selection"]["self_training"]
    assert st["languages"] == ["zh"] and st["source"] == "test inputs"
    (round1,) = st["rounds"]
    zh = round1["pseudo"]["zh"]  # 12 rows * 0.5 / 3 classes: at most 2 per predicted class
    assert zh["of"] == 12 and max(zh["per_class"]) <= 2 and zh["kept"] == sum(zh["per_class"]) > 0
    assert round1["rows"] == 96 + zh["kept"]  # the English rows and the pseudo-labelled ones
    assert (runs / "st" / "selftrain-1" / "log.jsonl").is_file()
    # dev rows were never read: zero-shot; the test inputs it read: transductive
    dev = json.loads(invoke("eval", "--run", runs / "st", "--langs", "zh,de", "--data-dir", TEST_DATA, "--json").stdout)
    assert {r["protocol"] for r in dev["results"].values()} == {"zero-shot"}
    test = json.loads(invoke("eval", "--run", runs / "st", "--langs", "zh", "--split", "test", "--data-dir", TEST_DATA,
                             "--json").stdout)
    assert test["results"]["zh"]["protocol"] == "transductive"
    (run,) = list_runs(runs)
    assert {(r["split"], r["lang"], r["protocol"]) for r in run["results"]} == {
        ("dev", "zh", "zero-shot"), ("dev", "de", "zero-shot"), ("test", "zh", "transductive")}
    assert [r["protocol"] for r in leaderboard([run], "xnli", "dev")] == ["zero-shot"]


def test_self_training_on_dev_inputs_makes_dev_figures_transductive(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
                 "--prompt-length", 2, "--dtype", "fp32", "--unlabeled", "zh", "--unlabeled-split", "dev",
                 "--unlabeled-rows", 12, "--self-train-steps", 2, "--run-name", "st")
    assert out.exit_code == 0, out.output
    dev = json.loads(invoke("eval", "--run", runs / "st", "--langs", "zh,de", "--data-dir", TEST_DATA, "--json").stdout)
    assert dev["results"]["zh"]["protocol"] == "transductive" and dev["results"]["de"]["protocol"] == "zero-shot"


def test_self_training_can_hand_on_the_last_step_instead_of_the_english_best(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
                 "--prompt-length", 2, "--dtype", "fp32", "--lr", 0.3, "--unlabeled", "zh", "--unlabeled-rows", 12,
                 "--self-train-steps", 3, "--self-train-keep", "last", "--run-name", "st")
    assert out.exit_code == 0, out.output
    st = json.loads((runs / "st" / "prompt" / "xprompt.json").read_text())["selection"]["self_training"]
    assert st["keep"] == "last" and st["rounds"][0]["best_step"] == 3
    saved = load_file(str(runs / "st" / "prompt" / "prompt.safetensors"))
    (state,) = (runs / "st" / "selftrain-1" / "checkpoint").glob("state-*.safetensors")
    tensors = load_file(str(state))
    last = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    english_best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    assert set(saved) <= set(last) and all(torch.equal(saved[k], last[k]) for k in saved)
    assert any(not torch.equal(english_best[k], last[k]) for k in saved)  # best would have handed on another step
    log = [json.loads(x) for x in (runs / "st" / "selftrain-1" / "log.jsonl").read_text().splitlines()]
    scored = [x for x in log if "select_accuracy" in x]  # the round's last step, scored once, recorded as scored
    assert scored[-1]["step"] == 3 and st["rounds"][0]["select_accuracy"] == round(scored[-1]["select_accuracy"], 4)
    bad = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--unlabeled", "zh",
                 "--self-train-keep", "first")
    assert bad.exit_code != 0 and "self_train_keep must be best or last" in bad.output


def test_self_training_refuses_the_labelled_language(tiny_bert_dir, tmp_path):
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", tmp_path, "--max-steps", 2,
                 "--unlabeled", "en")
    assert out.exit_code == 1 and "the training language has labels" in out.output


# ---------------------------------------------------------------- ensembles

@pytest.fixture
def two_runs(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    for seed in (5, 6):
        out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 3,
                     "--prompt-length", 2, "--dtype", "fp32", "--lr", 0.3, "--seed", seed, "--run-name", f"s{seed}")
        assert out.exit_code == 0, out.output
    return runs


def _predictions(run, lang="de"):
    lines = (run / "predictions" / f"xnli.dev.{lang}.tsv").read_text().splitlines()[1:]
    return [line.split("\t")[1] for line in lines]


def test_an_ensemble_of_one_run_is_that_run(two_runs, tiny_bert_dir):
    from xprompt.backbones import load_backbone
    from xprompt.model import EnsembleModel, load_run_model

    run = two_runs / "s5"
    single = json.loads(invoke("eval", "--run", run, "--langs", "de", "--data-dir", TEST_DATA, "--dtype", "fp32",
                               "--json").stdout)["results"]["de"]
    bb = load_backbone(str(tiny_bert_dir), two_runs / "cache")
    model, _ = load_run_model(run, bb)
    batch = {"input_ids": torch.tensor([[0, 100, 200, 250001, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "mask_pos": torch.tensor([3])}
    with torch.no_grad():
        torch.testing.assert_close(EnsembleModel([model])(batch).exp(), torch.softmax(model(batch), -1))
    from xprompt.workflows.evaluations import evaluate_ensemble

    done = evaluate_ensemble([run, run], bb, load_task_xnli(), ["de"], data_dirs=[TEST_DATA], dtype="fp32")
    assert done.results["de"]["accuracy"] == single["accuracy"]
    assert _predictions(done.run_dir) == _predictions(run)


def load_task_xnli():
    from xprompt.tasks import load_task

    return load_task("xnli")


def test_an_ensemble_of_two_is_the_mean_of_their_probabilities(two_runs, tiny_bert_dir):
    from xprompt.backbones import load_backbone
    from xprompt.data import encode, load_split
    from xprompt.evaluation import probabilities
    from xprompt.model import load_run_model
    from xprompt.registry import list_runs
    from xprompt.reports import leaderboard

    out = invoke("eval", "--run", f"{two_runs / 's5'},{two_runs / 's6'}", "--langs", "de,zh", "--data-dir", TEST_DATA,
                 "--dtype", "fp32", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    folder = two_runs / result["run"].rsplit("/", 1)[-1]
    config = json.loads((folder / "config.json").read_text())
    assert config["train"]["method"] == "ensemble" and config["train"]["members"] == ["s5", "s6"]
    xnli = load_task_xnli()
    bb = load_backbone(str(tiny_bert_dir), two_runs / "cache")
    rows = load_split(xnli, "de", "dev", [TEST_DATA])
    encoded = encode(rows, xnli.template, bb.tokenizer)
    mean = np.mean([probabilities(load_run_model(two_runs / r, bb)[0], encoded, 64, bb.tokenizer.pad_token_id)
                    for r in ("s5", "s6")], axis=0)
    expected = [xnli.labels[i] for i in mean.argmax(1)]
    assert _predictions(folder) == expected
    assert result["results"]["de"]["accuracy"] == pytest.approx(float((mean.argmax(1) == np.asarray(rows["label"])).mean()))
    board = leaderboard(list_runs(two_runs), xnli)
    assert [(r["method"], r["runs"]) for r in board] == [("ensemble", [folder.name])]  # a row of its own


# ---------------------------------------------------------------- neighbour-swap augmentation

def test_neighbours_are_of_another_script_and_swaps_are_seeded(backbone, xnli):
    from xprompt.augment import NeighbourSwap, neighbour_table, script_of
    from xprompt.data import batches, encode, load_split

    tok = backbone.tokenizer
    assert (script_of("▁house"), script_of("猫"), script_of("▁Katze"), script_of("▁,")) == ("LATIN", "CJK", "LATIN", None)
    ids = tok("the house river", add_special_tokens=False)["input_ids"]
    table = neighbour_table(backbone.input_embeddings().weight, tok, ids, candidates=20_000)
    assert set(table) == set(ids)
    for piece, neighbour in table.items():
        a, b = tok.convert_ids_to_tokens([piece, neighbour])
        assert script_of(b) is not None and script_of(b) != script_of(a)
        weight = backbone.input_embeddings().weight.float()
        sims = torch.nn.functional.normalize(weight[:20_000], dim=-1) @ torch.nn.functional.normalize(weight[piece], dim=-1)
        others = [i for i in range(20_000) if script_of(tok.convert_ids_to_tokens(i) or "") not in (None, script_of(a))
                  and i not in tok.all_special_ids]
        assert neighbour == others[int(sims[others].argmax())]  # the nearest of the other scripts
    rows = encode(load_split(xnli, "en", "train", [TEST_DATA]), xnli.template, tok)
    used = sorted({i for r in rows["input_ids"] for i in r})
    swap = NeighbourSwap(neighbour_table(backbone.input_embeddings().weight, tok, used[:50], candidates=20_000),
                         backbone.input_embeddings().weight.shape[0], rate=0.5, seed=3)
    batch = next(batches(rows, 16, tok.pad_token_id))
    first, again, later = swap(batch, 7), swap(batch, 7), swap(batch, 8)
    assert torch.equal(first["input_ids"], again["input_ids"]) and not torch.equal(first["input_ids"], later["input_ids"])
    changed = first["input_ids"] != batch["input_ids"]
    assert changed.any() and (batch["attention_mask"][changed] == 1).all()
    assert swap.replaceable[batch["input_ids"][changed]].all()
    for row in range(batch["input_ids"].shape[0]):  # a piece is swapped at all its positions of an input or at none
        real = batch["attention_mask"][row] == 1
        for piece in batch["input_ids"][row][real].unique():
            at = (batch["input_ids"][row] == piece) & real
            assert changed[row][at].all() or not changed[row][at].any()


def test_augmented_training_from_the_cli(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
                 "--prompt-length", 2, "--dtype", "fp32", "--augment", "neighbours", "--augment-rate", 0.3,
                 "--run-name", "aug")
    assert out.exit_code == 0, out.output
    info = json.loads((runs / "aug" / "prompt" / "xprompt.json").read_text())["selection"]["augment"]
    assert info["replaceable_pieces"] > 100 and info["rate"] == 0.3 and " -> " in info["examples"][0]
