"""Run lineage (issue 30): every figure knows what its run and every run it came from read.

Each test reproduces one way a figure could lie when runs start from other runs (adaptation,
--init-from, library starts, self-training, ensembles), on the tiny BERT and the tiny data."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TEST_DATA
from xprompt.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def scores(*args) -> dict:
    return json.loads(ok("eval", *args, "--data-dir", TEST_DATA, "--dtype", "fp32", "--json").stdout)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_bert_dir):
    """A zero-shot run A, a run ST self-trained on zh test inputs, and A adapted on 2 zh dev rows per
    class (A-adapt), each with zh test predictions."""
    runs = tmp_path_factory.mktemp("lineage") / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 3,
              "--eval-every", 3, "--prompt-length", 2, "--batch-size", 8, "--dtype", "fp32"]
    ok("train", *common, "--run-name", "A")
    ok("train", *common, "--run-name", "ST", "--unlabeled", "zh", "--unlabeled-rows", 12, "--self-train-steps", 2,
       "--lr", 0.3)
    ok("eval", "--run", runs / "A", "--langs", "zh", "--shots", 2, "--adapt-steps", 2, "--data-dir", TEST_DATA,
       "--dtype", "fp32")
    adapted = runs / "A-adapt-zh-k2-t2-s42"
    for run in (runs / "A", runs / "ST", adapted):
        scores("--run", run, "--langs", "zh", "--split", "test")
    return {"runs": runs, "A": runs / "A", "ST": runs / "ST", "adapt": adapted, "common": common}


def test_every_run_records_an_id_and_what_it_read(family):
    lineage = json.loads((family["A"] / "lineage.json").read_text())
    config = json.loads((family["A"] / "config.json").read_text())
    assert lineage["run_id"] == config["run_id"] and len(lineage["run_id"]) == 16
    assert lineage["protocol"] == "zero-shot" and lineage["parents"] == []
    train, select = lineage["reads"]
    assert (train["task"], train["split"], train["lang"], train["use"], train["role"]) == ("xnli", "train", "en", "train", "source")
    assert train["rows"] == 96 and select["rows"] == 24 and not set(train["ids"]) & set(select["ids"])
    adapted = json.loads((family["adapt"] / "lineage.json").read_text())
    assert adapted["protocol"] == "few-shot-target" and adapted["kind"] == "adapt"
    assert [p["relation"] for p in adapted["parents"]] == ["adapted-from"]
    assert adapted["parents"][0]["lineage"]["run_id"] == lineage["run_id"]
    assert [(r["use"], r["split"], r["lang"], r["rows"]) for r in adapted["reads"]] == [
        ("train", "dev", "zh", 6), ("select", "dev", "zh", 6)]  # 2 rows per class each, of 3 classes
    st = json.loads((family["ST"] / "lineage.json").read_text())
    assert st["protocol"] == "transductive"
    assert [(r["split"], r["lang"], r["labels"]) for r in st["reads"] if r["use"] == "pseudo-label"] == [("test", "zh", False)]


def test_xtreme_submission_takes_the_zero_shot_run_by_source_held_out_accuracy(family, tmp_path):
    """Defect 1: the submission was picked by target-dev average, and could be an adapted or a
    self-trained (transductive) run."""
    runs = family["runs"]
    out = ok("report", "--task", "xnli", "--runs-dir", runs, "--xtreme", tmp_path / "sub")
    assert "from A:" in out.output and "held-out accuracy" in out.output and "passed over" in out.output
    expected = [line.split("\t")[1] for line in (family["A"] / "predictions" / "xnli.test.zh.tsv").read_text().splitlines()[1:]]
    assert (tmp_path / "sub" / "xnli" / "test-zh.tsv").read_text().split() == expected
    # without A, nothing zero-shot is left: the adapted and the self-trained runs are refused, not taken
    alone = tmp_path / "alone"
    for name in ("ST", family["adapt"].name):
        shutil.copytree(runs / name, alone / name)
    refused = invoke("report", "--task", "xnli", "--runs-dir", alone, "--xtreme", tmp_path / "sub2")
    assert refused.exit_code == 1 and "no zero-shot run of xnli with test predictions" in refused.output
    assert "2 other run(s)" in refused.output and not (tmp_path / "sub2").exists()
    # named explicitly, a run is taken whatever it read, and its protocol is said
    named = ok("report", "--task", "xnli", "--runs-dir", alone, "--xtreme", tmp_path / "sub3", "--run", alone / "ST")
    assert "named by --run; its protocol: transductive" in " ".join(named.output.split())


def test_a_run_started_from_an_adapted_run_inherits_its_protocol_and_leaves_its_rows_out(family):
    """Defect 2: --init-from an adapted run recorded zero-shot, was scored on the rows its parent
    trained on, and became eval's default run."""
    runs = family["runs"]
    ok("train", *family["common"], "--run-name", "child", "--init-from", family["adapt"])
    child = runs / "child"
    lineage = json.loads((child / "lineage.json").read_text())
    assert lineage["protocol"] == "few-shot-target"
    assert [p["relation"] for p in lineage["parents"]] == ["init-from"]
    zh = scores("--run", child, "--langs", "zh,de")["results"]
    parent_rows = 12  # the adapted parent's 2 + 2 rows per class of zh dev (24 rows)
    assert zh["zh"]["n"] == 24 - parent_rows and zh["zh"]["excluded"] == parent_rows
    assert zh["zh"]["protocol"] == "few-shot-target" and zh["de"]["protocol"] == "few-shot-target"
    assert zh["de"]["n"] == 24  # no de rows were read
    # never eval's default run: that stays the latest run whose lineage read no target rows
    default = invoke("eval", "--runs-dir", runs, "--langs", "de", "--data-dir", TEST_DATA, "--dtype", "fp32", "--json")
    assert default.exit_code == 0 and json.loads(default.stdout)["run"] != str(child)


def test_the_protocol_of_a_score_is_derived_the_same_whatever_the_order():
    """Defect 3: an ensemble's protocol came from set.pop() and changed with PYTHONHASHSEED."""
    from xprompt.lineage import make_lineage, read_record, score_protocol

    dev_st = make_lineage("a", "dev-st", "train", "xnli", "en", "deep",
                          [read_record("xnli", "dev", "zh", "pseudo-label", labels=False, rows=12)], [])
    test_st = make_lineage("b", "test-st", "train", "xnli", "en", "deep",
                           [read_record("xnli", "test", "zh", "pseudo-label", labels=False, rows=12)], [])
    seen = set()
    for members in ([dev_st, test_st], [test_st, dev_st]):
        ensemble = make_lineage("e", "e", "ensemble", "xnli", "en", "ensemble", [], [("ensembled", m) for m in members])
        seen.add((ensemble["protocol"], *(score_protocol(ensemble, "xnli", split, lang)
                                          for split in ("dev", "test") for lang in ("zh", "de"))))
    assert seen == {("transductive", "transductive", "zero-shot", "transductive", "zero-shot")}


def test_ensembles_are_named_by_member_ids_and_their_config_matches_their_members(family, tiny_bert_dir, tmp_path):
    """Defect 4: an ensemble folder was named by its members' folder names and its config.json never
    rewritten, so ensembling e1/A,e3/B after e1/A,e2/B wrote results under a config listing e2/B."""
    root = tmp_path / "ens"
    for folder in ("e1", "e2"):
        ok("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", root / folder, "--max-steps", 1,
           "--eval-every", 1, "--prompt-length", 2, "--dtype", "fp32", "--run-name", "A" if folder == "e1" else "B",
           "--seed", 1 if folder == "e1" else 2)
    ok("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", root / "e3", "--max-steps", 1,
       "--eval-every", 1, "--prompt-length", 2, "--dtype", "fp32", "--run-name", "B", "--seed", 3)
    first = scores("--run", f"{root / 'e1' / 'A'},{root / 'e2' / 'B'}", "--langs", "de")
    second = scores("--run", f"{root / 'e1' / 'A'},{root / 'e3' / 'B'}", "--langs", "de")
    assert first["run"] != second["run"]
    for done, other in ((first, "e2"), (second, "e3")):
        config = json.loads((Path(done["run"]) / "config.json").read_text())
        ids = sorted(json.loads((root / x / "config.json").read_text())["run_id"]
                     for x in ("e1/A", f"{other}/B"))
        assert config["train"]["member_ids"] == ids and config["ensemble"][1] == str(root / other / "B")
    again = scores("--run", f"{root / 'e2' / 'B'},{root / 'e1' / 'A'}", "--langs", "de")  # order does not matter
    assert again["run"] == first["run"]


def test_close_gap_keep_last_copy_is_its_own_configuration(tmp_path):
    """Defect 4: close_gap copied config.json into <run>-last, so keep-best and keep-last of one seed
    were averaged as two seeds."""
    import importlib.util

    from conftest import ROOT
    from xprompt.reports import sweep_key

    spec = importlib.util.spec_from_file_location("close_gap", ROOT / "scripts" / "close_gap.py")
    close_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(close_gap)
    source = tmp_path / "st"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"run_id": "abc", "train": {"task": "xnli", "lang": "en", "seed": 1,
                                                                               "self_train_keep": "best"}}))
    folder = tmp_path / "st-last"
    close_gap.last_step_config(source, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["train"]["self_train_keep"] == "last" and config["run_id"] != "abc"
    best = {"config": json.dumps(json.loads((source / "config.json").read_text())["train"])}
    assert sweep_key(best) != sweep_key({"config": json.dumps(config["train"])})
    lineage = json.loads((folder / "lineage.json").read_text())
    assert [p["relation"] for p in lineage["parents"]] == ["last-step-of"]


def test_adapting_a_self_trained_run_does_not_self_train_again(family):
    """Defect 5: eval --shots copied the base run's whole config, --unlabeled included."""
    out = ok("eval", "--run", family["ST"], "--langs", "de", "--shots", 1, "--adapt-steps", 1, "--data-dir", TEST_DATA,
             "--dtype", "fp32")
    adapted = family["runs"] / "ST-adapt-de-k1-t1-s42"
    train = json.loads((adapted / "config.json").read_text())["train"]
    assert train["unlabeled"] is None and train["augment"] == "none" and train["init_from"] == str(family["ST"])
    assert not list(adapted.glob("selftrain-*")) and "de" in out.output
    # its lineage still carries what its base read: the zh test inputs
    lineage = json.loads((adapted / "lineage.json").read_text())
    assert lineage["parents"][0]["lineage"]["reads"][-1]["use"] == "pseudo-label"


@pytest.mark.parametrize("flags, message", [
    (["--unlabeled", "zz"], "unknown language"),
    (["--unlabeled", "zh", "--unlabeled-file", "x/{language}.jsonl"], "unknown placeholder(s) {language}"),
    (["--unlabeled", "zh", "--unlabeled-file", "missing/{lang}.jsonl"], "missing/zh.jsonl (for zh) is missing"),
    (["--init-from", "no/such/run"], "--init-from no/such/run: not a finished run folder"),
])
def test_train_options_are_checked_before_anything_is_made(tiny_bert_dir, tmp_path, flags, message):
    """Defect 5: --unlabeled options were checked after the main training (which left its folder)."""
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 1,
                 "--prompt-length", 2, "--dtype", "fp32", *flags)
    assert out.exit_code == 1 and message in " ".join(out.output.split()) and "compute:" not in out.output
    assert not runs.exists()  # no folder made, no backbone loaded


def test_an_unknown_task_is_named_before_runs_are_looked_up(tmp_path):
    """Defect 8: eval --task nosuchtask in a folder with no runs answered 'no finished run'."""
    out = invoke("eval", "--task", "nosuchtask", "--langs", "en", "--runs-dir", tmp_path / "none")
    assert out.exit_code != 0 and "nosuchtask" in out.output and "no finished run" not in out.output


def test_eval_defaults_to_the_latest_run_of_the_named_task(family, tiny_bert_dir):
    runs = family["runs"]
    ok("train", *family["common"], "--task", "pawsx", "--run-name", "paws")
    out = invoke("eval", "--task", "xnli", "--runs-dir", runs, "--langs", "de", "--data-dir", TEST_DATA, "--dtype",
                 "fp32", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["run"] != str(runs / "paws")
    shutil.rmtree(runs / "paws")


def test_three_generations_library_adapted_start_then_adaptation_then_ensemble(family, tiny_bert_dir, tmp_path):
    """Done-when: runs --lineage shows a library-adapted start, its adaptation and an ensemble, with
    every score's protocol derived from the chain."""
    library = tmp_path / "library"
    ok("train", "--task", "pawsx", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", library,
       "--max-steps", 2, "--eval-every", 2, "--prompt-length", 2, "--batch-size", 8, "--dtype", "fp32",
       "--run-name", "P")
    ok("eval", "--run", library / "P", "--langs", "de", "--shots", 2, "--adapt-steps", 1, "--data-dir", TEST_DATA,
       "--dtype", "fp32")
    shutil.rmtree(library / "P")  # an ancestor's folder may be gone: its child's record keeps what it read
    runs = family["runs"]
    ok("train", *family["common"], "--run-name", "L", "--init-from", "library", "--library", library,
       "--library-adapted", "--top-k", 1)
    ok("eval", "--run", runs / "L", "--langs", "zh", "--shots", 2, "--adapt-steps", 1, "--data-dir", TEST_DATA,
       "--dtype", "fp32")
    adapted = runs / "L-adapt-zh-k2-t1-s42"
    ensemble = scores("--run", f"{adapted},{family['A']}", "--langs", "zh,de")
    results = ensemble["results"]
    assert results["zh"]["protocol"] == results["de"]["protocol"] == "few-shot-target"
    assert results["zh"]["excluded"] == 12 and results["de"]["excluded"] == 0  # the adaptation's zh dev rows

    out = ok("runs", "--lineage", ensemble["run"], "--runs-dir", runs)
    lines = out.output.splitlines()
    order = [next(i for i, line in enumerate(lines) if needle in line)
             for needle in ("<- ensembled L-adapt-zh-k2-t1-s42", "<- adapted-from L [", "<- library P-adapt-de-k2-t1-s42",
                            "<- adapted-from P [")]
    assert order == sorted(order)
    assert "reads train: pawsx/dev/de" in out.output and "reads train: xnli/dev/zh" in out.output
    assert "<- ensembled A [train, xnli/en, zero-shot" in out.output
    assert "ensemble-" in lines[1] and "[ensemble, xnli/en, few-shot-target" in lines[1]
    table = " ".join(out.output.split())
    assert "│ xnli │ dev │ zh │ 12 │ 12 │ few-shot-target │" in table
    # the library start itself is few-shot-target: its ancestor trained on German PAWS-X rows
    assert json.loads((runs / "L" / "lineage.json").read_text())["protocol"] == "few-shot-target"
