"""Numbers that cannot mislead: one leaderboard row per configuration and row set, one named language
set per average, protocols that keep adapted runs apart, and the bugs that changed figures."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_DATA
from test_cli import invoke
from xprompt.config import TrainConfig
from xprompt.registry import index_run, list_runs
from xprompt.reports import leaderboard, render, summarize
from xprompt.tasks import load_task

XNLI_ALL = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur"]


def _fake_run(runs: Path, name: str, seed: int, scores: dict, limit=None, compute="bf16", **changes):
    """A finished run folder as xprompt writes it: config.json, metrics.json (n rows per language)."""
    run = runs / name
    run.mkdir(parents=True)
    cfg = TrainConfig(seed=seed, **changes).to_dict()
    (run / "config.json").write_text(json.dumps({"train": cfg, "compute": {"dtype": compute},
                                                 "backbone": {"sha256": "abc"}, "task_version": 2}))
    n = limit or 2490
    dev = {lang: {"n": n, "limit": limit, "rows": f"rows-{n}-{lang}", "accuracy": acc, "macro_f1": acc,
                  "labeled": True} for lang, acc in scores.items()}
    (run / "metrics.json").write_text(json.dumps({"train": {"select_accuracy": 0.5}, "eval": {"xnli": {"dev": dev}}}))
    index_run(runs, run)
    return run


def _scores(value: float, langs=XNLI_ALL, **override) -> dict:
    return {**{lang: value for lang in langs}, **override}


VARIANTS = {  # one field changed each: every one changes results, so each is a row of its own
    "verbalizer": {"verbalizer": "soft"}, "readout": {"readout": "mask"}, "init": {"init": "random"},
    "position": {"prompt_position": "first"}, "batch": {"batch_size": 32}, "tower": {"tower_layers": 3},
    "template": {"template": "native"}, "steps": {"max_steps": 600}, "select": {"select_size": 300},
    "warmup": {"warmup_ratio": 0.1}, "eval_every": {"eval_every": 100},
}


def test_a_sweep_never_merges_configurations(tmp_path):
    xnli = load_task("xnli")
    _fake_run(tmp_path, "base-13", 13, _scores(0.60))
    _fake_run(tmp_path, "base-42", 42, _scores(0.64))
    for name, change in VARIANTS.items():
        _fake_run(tmp_path, f"{name}-42", 42, _scores(0.5), **change)
    _fake_run(tmp_path, "fp32-42", 42, _scores(0.5), compute="fp32")  # auto ran in another dtype
    _fake_run(tmp_path, "adapted-42", 42, _scores(0.5), protocol="few-shot-target")
    _fake_run(tmp_path, "accum-42", 42, _scores(0.66), grad_accum=4)  # the same gradients: the same sweep
    rows = leaderboard(list_runs(tmp_path), xnli)
    assert len(rows) == 1 + len(VARIANTS) + 2
    base = next(r for r in rows if "base-13" in r["runs"])
    assert base["seeds"] == [13, 42, 42] and sorted(base["runs"]) == ["accum-42", "base-13", "base-42"]
    labels = {r["runs"][0]: r["label"] for r in rows}
    assert "verbalizer=soft" in labels["verbalizer-42"] and "tower_layers=3" in labels["tower-42"]
    assert "compute_dtype=fp32" in labels["fp32-42"]
    assert next(r for r in rows if r["runs"] == ["adapted-42"])["protocol"] == "few-shot-target"


def test_row_sets_and_language_sets_are_never_averaged_together(tmp_path):
    xnli = load_task("xnli")
    _fake_run(tmp_path, "full-13", 13, _scores(0.6, ko=0.9))
    _fake_run(tmp_path, "first300-42", 42, _scores(0.8), limit=300)  # same config, other rows
    _fake_run(tmp_path, "four-42", 42, {"en": 0.99, "de": 0.99, "zh": 0.99, "ar": 0.99, "sw": 0.99}, lr=0.01)
    rows = leaderboard(list_runs(tmp_path), xnli)
    assert [r["runs"] for r in rows] == [["first300-42"], ["full-13"], ["four-42"]]  # complete sets first
    full = next(r for r in rows if r["runs"] == ["full-13"])
    assert full["average_over"] == "14 official targets" and full["complete"]
    assert full["avg_target"][0] == pytest.approx(0.6)  # Korean (0.9) is not in it
    assert full["extra"] == ["ko"] and full["languages"]["ko"][0] == 0.9
    partial = rows[-1]
    assert not partial["complete"] and partial["average_over"] == "partial: de, ar, zh, sw"  # the card's order
    md = render(rows, [{"model": "XLM-R base", "backbone": "xlm-roberta-base", "method": "full fine-tuning",
                        "avg_all": 76.2, "languages": 15}], "md")
    header = md.splitlines()[0]
    assert "ko (extra)" in header and "average over" in header
    assert "14 official targets" in md and "partial: de, ar, zh, sw" in md
    published = md.splitlines()[md.splitlines().index("| published | source | protocol | backbone | method | split | "
                                                       "metric | average over | avg with source | "
                                                       "comparable measured rows |") + 2]
    assert published.startswith("| published: XLM-R base |") and "| test |" in published
    assert published.endswith("| 15 languages incl. the source | 76.2 | none: no measured test row over 15 "
                              "languages incl. the source |")  # never beside the dev rows' averages
    assert "300 per language" in md and "2490 per language" in md


def test_summary_uses_the_official_set_and_names_it():
    xnli = load_task("xnli")
    assert xnli.official_targets == XNLI_ALL[1:] and xnli.extra_languages == ["ko"]
    pawsx = load_task("pawsx")
    assert pawsx.official_targets == ["de", "es", "fr", "ja", "ko", "zh"]
    results = {lang: {"labeled": True, "accuracy": 0.5, "n": 1} for lang in XNLI_ALL}
    results["ko"] = {"labeled": True, "accuracy": 1.0, "n": 1}
    results["en"]["accuracy"] = 0.7
    s = summarize(results, "en", "accuracy", xnli.official_languages)
    assert s["complete"] and len(s["target_set"]) == 14 and s["avg_target"] == pytest.approx(0.5)
    assert s["avg_all"] == pytest.approx((0.7 + 14 * 0.5) / 15) and s["extra"] == {"ko": 1.0}
    assert s["gap"] == pytest.approx(0.2)


def test_report_cli_shows_one_row_per_config(tmp_path):
    _fake_run(tmp_path, "base-13", 13, _scores(0.6))
    _fake_run(tmp_path, "soft-13", 13, _scores(0.5), verbalizer="soft")
    out = invoke("report", "--task", "xnli", "--runs-dir", tmp_path, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["rows"]
    assert len(rows) == 2 and {r["average_over"] for r in rows} == {"14 official targets"}


# ---------------------------------------------------------------- protocols and adapted runs

@pytest.fixture
def base_run(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
                 "--prompt-length", 2, "--dtype", "fp32", "--run-name", "base")
    assert out.exit_code == 0, out.output
    return runs / "base"


def test_adapted_runs_stay_apart(base_run, tiny_bert_dir):
    from xprompt.library import library_prompts
    from xprompt.store import latest_run

    runs = base_run.parent
    out = invoke("eval", "--run", base_run, "--langs", "zh", "--shots", 2, "--adapt-steps", 2, "--data-dir", TEST_DATA)
    assert out.exit_code == 0, out.output
    adapted = runs / "base-adapt-zh-k2-t2-s42"
    assert json.loads((adapted / "config.json").read_text())["train"]["protocol"] == "few-shot-target"
    assert latest_run(runs) == base_run  # the newest finished run, but adapted: never the default to evaluate
    out = invoke("eval", "--runs-dir", runs, "--langs", "de", "--data-dir", TEST_DATA, "--json")
    assert json.loads(out.stdout)["run"] == str(base_run)
    sha = json.loads((base_run / "prompt" / "xprompt.json").read_text())["backbone_sha256"]
    assert [c.run.name for c in library_prompts(runs, sha)] == ["base"]
    assert {c.run.name for c in library_prompts(runs, sha, include_adapted=True)} == {"base", adapted.name}
    # evaluating the adapted run itself never scores the rows it trained on
    out = invoke("eval", "--run", adapted, "--langs", "zh", "--data-dir", TEST_DATA, "--json")
    zh = json.loads(out.stdout)["results"]["zh"]
    used = json.loads((adapted / "metrics.json").read_text())["train"]["used_ids"]
    assert zh["n"] == 24 - len(used) and zh["excluded"] == len(used)
    rows = leaderboard(list_runs(runs), load_task("xnli"))
    assert {r["protocol"] for r in rows} == {"zero-shot", "few-shot-target"}


def test_adaptation_with_other_steps_is_another_run(base_run):
    runs = base_run.parent
    for steps in (2, 3):
        out = invoke("eval", "--run", base_run, "--langs", "zh", "--shots", 2, "--adapt-steps", steps,
                     "--data-dir", TEST_DATA)
        assert out.exit_code == 0, out.output
    for steps in (2, 3):
        config = json.loads((runs / f"base-adapt-zh-k2-t{steps}-s42" / "config.json").read_text())["train"]
        assert config["max_steps"] == steps


def test_adapting_a_run_started_from_a_weighted_average(base_run, tiny_bert_dir):
    runs = base_run.parent
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
              "--prompt-length", 2, "--dtype", "fp32"]
    assert invoke("train", *common, "--seed", 5, "--run-name", "other").exit_code == 0
    out = invoke("train", *common, "--init-from", f"{base_run},{runs / 'other'}", "--init-weights", "0.7,0.3",
                 "--run-name", "mixed")
    assert out.exit_code == 0, out.output
    out = invoke("eval", "--run", runs / "mixed", "--langs", "zh", "--shots", 2, "--adapt-steps", 2,
                 "--data-dir", TEST_DATA)
    assert out.exit_code == 0, out.output
    config = json.loads((runs / "mixed-adapt-zh-k2-t2-s42" / "config.json").read_text())["train"]
    assert config["init_from"] == str(runs / "mixed") and config["init_weights"] is None


# ---------------------------------------------------------------- starts from other runs

def _cfg(**kw):
    return TrainConfig(**{**dict(method="deep", prompt_length=3, max_steps=2, eval_every=1, batch_size=8,
                                 dtype="fp32", seed=5, verbalizer="soft"), **kw})


def test_cross_task_start_reads_class_means_through_the_prompt_it_starts_from(backbone, tmp_path):
    from xprompt.model import load_run_model
    from xprompt.data import prepare_data
    from xprompt.start import init_sample, set_class_means
    from xprompt.workflows.runs import settle, train

    xnli, pawsx = load_task("xnli"), load_task("pawsx")
    source = tmp_path / "paws"
    source.mkdir()
    train(_cfg(max_steps=3, lr=0.3), backbone, pawsx, source, [TEST_DATA])
    run = tmp_path / "cross"
    run.mkdir()
    cfg = _cfg(max_steps=1, lr=1e-12, init_from=str(source))
    summary = train(cfg, backbone, xnli, run, [TEST_DATA])
    cfg = settle(cfg, backbone, "cpu")  # its auto choices, as training settled them
    assert "class means read through it" in summary["init"]
    saved = load_file(str(run / "prompt" / "prompt.safetensors"))
    # the class means of the same sample, read through the PAWS-X prompt the run started from
    model, _ = load_run_model(run, backbone)
    model.prompt.load_tensors(load_file(str(source / "prompt" / "prompt.safetensors")), "source")
    data = prepare_data(cfg, xnli, backbone.tokenizer, [TEST_DATA])
    set_class_means(model, init_sample(data.train, cfg.init_examples, cfg.seed), backbone.tokenizer.pad_token_id, "fp32")
    torch.testing.assert_close(saved["verbalizer.weight"], model.verbalizer.weight.detach(), atol=1e-5, rtol=1e-4)


def test_cross_task_start_takes_label_vectors_through_the_card_label_map(backbone, tmp_path):
    import shutil

    import yaml

    from xprompt.workflows.runs import train

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(Path(load_task("xnli").path), tasks / "xnli.yaml")
    card = yaml.safe_load(Path(load_task("ocnli").path).read_text())
    card["labels"] = ["contradiction", "entailment", "neutral"]  # another order than XNLI's
    card["splits"]["train"] = {"file": "ocnli/dev.{lang}.jsonl"}  # the tiny test rows
    (tasks / "ocnli.yaml").write_text(yaml.safe_dump(card, allow_unicode=True))
    xnli, ocnli = load_task("xnli", tasks), load_task("ocnli", tasks)
    source = tmp_path / "xnli"
    source.mkdir()
    train(_cfg(max_steps=3, lr=0.3), backbone, xnli, source, [TEST_DATA])
    run = tmp_path / "mapped"
    run.mkdir()
    summary = train(_cfg(max_steps=1, lr=1e-12, init_from=str(source), lang="zh", select_size=4),
                    backbone, ocnli, run, [TEST_DATA])
    assert "through the card's label map" in summary["init"]
    want = load_file(str(source / "prompt" / "prompt.safetensors"))["verbalizer.weight"]
    got = load_file(str(run / "prompt" / "prompt.safetensors"))["verbalizer.weight"]
    order = [xnli.labels.index(label) for label in ocnli.labels]  # contradiction, entailment, neutral
    torch.testing.assert_close(got, want[order], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- loaders and caches

def test_hub_rows_without_a_gold_label_are_dropped(monkeypatch):
    import datasets

    from xprompt.data import NO_LABEL, _load_from_hub

    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    labelled = datasets.Dataset.from_dict({"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"],
                                           "label": [0, -1, 2]}, features=features)
    test = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["x", "y"], "label": [-1, -1]},
                                      features=features)
    ocnli = load_task("ocnli")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split, **k: labelled if split == "validation" else test)
    dev = _load_from_hub(ocnli, "zh", "dev")
    assert dev["label"] == [0, 2] and dev["sentence1"] == ["a", "c"]  # the "-" row (hub label -1) is gone
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split, **k: test)
    assert _load_from_hub(ocnli, "zh", "dev")["label"] == [NO_LABEL, NO_LABEL]  # an unlabelled split keeps its rows


def test_encoding_cache_never_keys_a_tokenizer_by_its_id(tokenizer, tiny_mt5_dir, monkeypatch):
    import xprompt.data as data
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_mt5_dir)
    monkeypatch.setattr(data, "id", lambda obj: 0, raising=False)  # as if the second object reused the first's id
    assert data._tokenizer_key(tokenizer) != data._tokenizer_key(other)


def test_library_transfer_follows_the_flags(tiny_bert_dir, tmp_path, monkeypatch):
    import xprompt.workflows.catalogue as catalogue

    runs = tmp_path / "runs"
    out = invoke("train", "--task", "pawsx", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 1, "--prompt-length", 2, "--dtype", "fp32", "--run-name", "p")
    assert out.exit_code == 0, out.output
    seen = []
    real = catalogue.init_sample
    monkeypatch.setattr(catalogue, "init_sample", lambda rows, n, seed: (seen.append((n, seed)), real(rows, n, seed))[1])
    out = invoke("library", "transfer", "--task", "xnli", "--backbone", tiny_bert_dir, "--runs-dir", runs,
                 "--data-dir", TEST_DATA, "--init-examples", 30, "--seed", 7, "--max-length", 64, "--dtype", "fp32",
                 "--json")
    assert out.exit_code == 0, out.output
    assert seen == [(30, 7)]
