"""--tune: what a run trains of the backbone. Each mode changes exactly what it names (every other
backbone tensor stays bit for bit), stores only what changed, and is applied again when the run is
loaded; LoRA is PEFT's own adapter; a full run resumes exactly; the prompt-only default is unchanged."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TEST_DATA
from xprompt.cli import app
from xprompt.config import TrainConfig
from xprompt.errors import XPromptError
from xprompt.tuning import ADAPTER_DIR, BACKBONE_FILE, BackboneTuning, every_root, named_parameters
from xprompt.workflows.runs import train

runner = CliRunner()


def _cfg(**kw):
    # average_checkpoints=1: the run keeps its last step (a tiny run's best selection step may be step 0)
    base = dict(method="soft", prompt_length=2, max_steps=4, eval_every=2, batch_size=8, dtype="fp32", seed=5,
                average_checkpoints=1)
    return TrainConfig(**{**base, **kw})


def _state(backbone) -> dict:
    """Every backbone tensor by name (under LoRA: the adapted layers' own weights, without the adapters)."""
    return {k.replace(".base_layer.", "."): v.detach().clone()
            for k, v in named_parameters(every_root(backbone), once=False).items() if ".lora_" not in k}


def _trained(cfg, backbone, task, run, monkeypatch, **kw):
    """Train ``cfg`` into ``run``; returns (summary, the run's BackboneTuning or None)."""
    made = []
    real = BackboneTuning.start
    monkeypatch.setattr(BackboneTuning, "start", classmethod(lambda cls, c, b: made.append(real(c, b)) or made[-1]))
    run.mkdir(exist_ok=True)
    summary = train(cfg, backbone, task, run, [TEST_DATA], **kw)
    return summary, made[0] if made else None


def _changed(before: dict, backbone) -> set:
    after = _state(backbone)
    assert after.keys() == before.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("mode", ["full", "bitfit", "lora", "head", "probe"])
def test_each_mode_changes_exactly_what_it_names(backbone, xnli, tmp_path, monkeypatch, mode):
    base = _state(backbone)
    cfg = _cfg(tune=mode, method="deep" if mode in ("head", "probe") else "soft")
    summary, tuning = _trained(cfg, backbone, xnli, tmp_path / "run", monkeypatch)
    assert _changed(base, backbone) == set()  # the caller's backbone: untouched (a sweep's next seed starts from it)
    prompt = tmp_path / "run" / "prompt"
    saved = load_file(str(prompt / "prompt.safetensors"))
    card = json.loads((prompt / "xprompt.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    files = sorted(str(p.relative_to(prompt)) for p in prompt.rglob("*") if p.is_file())
    assert metrics["stored_bytes"] == sum((prompt / f).stat().st_size for f in files)
    assert card["tune"]["mode"] == metrics["tune"]["mode"] == mode
    if mode == "probe":  # the frozen backbone and a linear head on the first token
        assert tuning is None and card["method"] == "none" and card["verbalizer"] == "linear"
        assert card["readout"] == "first" and set(saved) == {"verbalizer.weight", "verbalizer.bias"}
        assert files == ["prompt.safetensors", "xprompt.json"] and summary["trainable_parameters"] == 3 * 32 + 3
        return
    trained = set(tuning.params)
    changed = _changed({k: base[k] for k in base}, tuning.backbone)
    if mode == "lora":  # the base weights stay; PEFT's adapters are new tensors
        assert changed == set()
        assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
        assert {k.split(".")[-4] for k in trained} == {"query", "value"}
        assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "prompt.safetensors",
                         "xprompt.json"]
        assert not any(torch.equal(p, tuning._start[k]) for k, p in tuning.params.items() if ".lora_B." in k)
        assert card["tune"]["lora_targets"] == ["query", "value"] and card["tune"]["lora_rank"] == 8
        assert summary["trainable_parameters"] == 2 * 2 * (8 * 32 + 32 * 8) + 2 * 32 + 3 * 32  # 2 layers x q,v + prompt + labels
        return
    # every other tensor bit for bit; the pooler (its output never read) gets no gradient
    assert changed == trained - {"model.pooler.dense.weight", "model.pooler.dense.bias"}
    if mode == "bitfit":
        assert all(k.endswith("bias") for k in trained) and len(trained) == 18
        assert summary["trainable_parameters"] == sum(base[k].numel() for k in trained) + 2 * 32 + 3 * 32
    else:
        assert len(trained) == len(base)  # every weight of the encoder
    stored = load_file(str(prompt / BACKBONE_FILE))
    assert set(stored) == changed  # only what changed, by name
    assert all(torch.equal(stored[k], p) for k, p in named_parameters(tuning.roots).items() if k in stored)
    assert files == [BACKBONE_FILE, "prompt.safetensors", "xprompt.json"]  # no PEFT prompt twin: it would miss them
    assert card["tune"]["stored_bytes"] == (prompt / BACKBONE_FILE).stat().st_size
    assert card["tune"]["backbone_lr"] == {"full": 1e-5, "bitfit": 1e-4, "head": 1e-5}[mode]
    if mode == "head":
        assert card["method"] == "none" and set(saved) == {"verbalizer.weight", "verbalizer.bias"}


def _select_accuracy(model, cfg, backbone, task) -> float:
    from xprompt.data import prepare_data
    from xprompt.evaluation import predict
    from xprompt.workflows.runs import settle

    data = prepare_data(settle(cfg, backbone, torch.device("cpu")), task, backbone.tokenizer, [TEST_DATA])
    preds = predict(model, data.select, 16, backbone.tokenizer.pad_token_id)
    return float((preds == np.asarray(data.select["label"])).mean())


@pytest.mark.parametrize("mode,method", [("full", "soft"), ("bitfit", "soft"), ("lora", "soft"), ("head", "deep"),
                                         ("lora", "unified"), ("full", "unified")])
def test_a_loaded_run_is_the_trained_model(backbone, xnli, tmp_path, monkeypatch, mode, method):
    """Loading a tuned run (eval, predict) applies its stored weights to a copy of the base backbone: the
    kept step's tensors bit for bit, and the held-out accuracy the run recorded for it."""
    from xprompt.model import load_run_model

    fresh = copy.deepcopy(backbone)
    base = _state(fresh)
    cfg = _cfg(tune=mode, lr=0.05, backbone_lr=1e-3, method=method)
    summary, tuning = _trained(cfg, backbone, xnli, tmp_path / "run", monkeypatch)
    model, card = load_run_model(tmp_path / "run", fresh)
    assert _changed(base, fresh) == set() and model.own_backbone == mode
    kept = named_parameters(tuning.roots)  # the live copy holds the kept (last) step
    loaded = named_parameters({"model": model.backbone})
    assert kept.keys() == loaded.keys() and all(torch.equal(loaded[k], kept[k]) for k in kept)
    assert round(_select_accuracy(model, cfg, fresh, xnli), 4) == summary["select_accuracy"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (transformers, read by PEFT)
@pytest.mark.parametrize("which", ["bert", "xlmr", "mt5"])
def test_lora_adapter_round_trips_through_peft(which, backbone, tiny_xlmr_mlm_dir, tiny_mt5_dir, xnli, tmp_path,
                                              monkeypatch):
    """``PeftModel.from_pretrained(base, run/prompt/adapter)`` on the backbone as transformers loads it gives the
    states the trained run's encoder gives (fp32, within 1e-5)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    from xprompt.backbones import load_backbone

    folder = {"xlmr": tiny_xlmr_mlm_dir, "mt5": tiny_mt5_dir}.get(which)
    bb = backbone if folder is None else load_backbone(str(folder), tmp_path / "cache")
    verbalizer = "hard" if which == "mt5" else "soft"  # mT5: the decoder scores the label words (adapted too)
    cfg = _cfg(tune="lora", backbone_lr=1e-2, verbalizer=verbalizer)
    _, tuning = _trained(cfg, bb, xnli, tmp_path / "run", monkeypatch)
    adapter = tmp_path / "run" / "prompt" / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == (["q", "v"] if which == "mt5" else ["query", "value"])
    if which == "mt5":
        base = AutoModelForSeq2SeqLM.from_pretrained(folder)
    else:
        base = AutoModel.from_pretrained(folder or bb.path, add_pooling_layer=False)
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[5, 17, 99, 1000, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if which == "mt5":
            decoder = torch.tensor([[0, 12, 7]])
            ours = tuning.backbone.seq2seq(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
            theirs = peft(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        else:
            ours = tuning.backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state
            theirs = peft(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-5
    assert any(".lora_B." in k and p.abs().sum() > 0 for k, p in tuning.params.items())  # it did train


def test_an_interrupted_full_run_resumes_exactly(backbone, xnli, tmp_path, monkeypatch):
    """Backbone tensors, their AdamW moments and the kept step included: bit for bit."""
    from test_training import _assert_same_run, _final_state

    cfg = _cfg(tune="full", max_steps=6, eval_every=2, average_checkpoints=0, backbone_lr=1e-3)
    whole = tmp_path / "whole"
    whole.mkdir()
    train(cfg, copy.deepcopy(backbone), xnli, whole, [TEST_DATA])
    parts = tmp_path / "parts"
    parts.mkdir()

    def interrupt(step, total, loss, rate):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, copy.deepcopy(backbone), xnli, parts, [TEST_DATA], on_step=interrupt)
    state = json.loads((parts / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    checkpoint = load_file(str(parts / "checkpoint" / state["tensors"]))
    assert any(k.startswith("model.backbone.model.encoder.") for k in checkpoint)
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in checkpoint)
    train(cfg, copy.deepcopy(backbone), xnli, parts, [TEST_DATA])
    a, b = _final_state(whole), _final_state(parts)
    _assert_same_run(a, b)
    assert sum(k.startswith("model.backbone.") for k in a["checkpoint"]) == 39
    assert (whole / "prompt" / BACKBONE_FILE).read_bytes() == (parts / "prompt" / BACKBONE_FILE).read_bytes()


def test_the_prompt_default_is_unchanged(backbone, xnli, tmp_path):
    """No --tune and --tune prompt are one run: the same tensors, files and selection record, and a
    config without the --tune fields (as before they existed)."""
    runs = []
    for name, extra in (("plain", {}), ("prompt", {"tune": "prompt"})):
        run = tmp_path / name
        run.mkdir()
        summary = train(_cfg(average_checkpoints=0, **extra), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
        runs.append((run, summary))
    (a, sa), (b, sb) = runs
    files = sorted(p.name for p in (a / "prompt").iterdir())
    assert files == sorted(p.name for p in (b / "prompt").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "prompt.safetensors", "xprompt.json",
        "xprompt_head.json", "xprompt_head.safetensors"]
    for name in files:
        if name != "xprompt.json":  # (the card holds the run's id and times)
            assert (a / "prompt" / name).read_bytes() == (b / "prompt" / name).read_bytes()
    assert "tune" not in json.loads((a / "prompt" / "xprompt.json").read_text()) and "tune" not in sa
    assert [sa[k] for k in ("select_accuracy", "best_step", "trainable_parameters")] == \
           [sb[k] for k in ("select_accuracy", "best_step", "trainable_parameters")]
    assert TrainConfig().to_dict() == TrainConfig(tune="prompt").to_dict()
    assert not {"tune", "backbone_lr", "lora_rank", "lora_alpha", "lora_targets"} & set(TrainConfig().to_dict())
    assert TrainConfig.from_dict(TrainConfig(tune="lora", lora_rank=4).to_dict()).lora_rank == 4


def test_config_checks_of_tune():
    assert TrainConfig(tune="full").backbone_lr == 1e-5 and TrainConfig(tune="bitfit").backbone_lr == 1e-4
    assert TrainConfig(tune="lora").backbone_lr == 5e-4 and TrainConfig(tune="full", backbone_lr=3e-5).backbone_lr == 3e-5
    head = TrainConfig(tune="head")
    assert (head.method, head.verbalizer, head.backbone_lr) == ("none", "linear", 1e-5)
    for bad, match in (({"tune": "partial"}, "tune must be"), ({"backbone_lr": 1e-4}, "backbone_lr needs"),
                       ({"tune": "probe", "backbone_lr": 1e-4}, "backbone_lr needs"),
                       ({"tune": "full", "lora_rank": 4}, "need tune='lora'"),
                       ({"tune": "head", "method": "soft"}, "trains no prompt"), ({"method": "none"}, "trains no prompt"),
                       ({"tune": "probe", "verbalizer": "hard"}, "has none"),
                       ({"tune": "lora", "average_checkpoints": 3}, "apart")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


TINY = ("--data-dir", TEST_DATA, "--max-steps", 4, "--eval-every", 2, "--batch-size", 8, "--dtype", "fp32")


@pytest.mark.parametrize("mode", ["head", "probe"])
def test_head_and_probe_train_and_eval_from_the_cli(mode, tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    result = _invoke("train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--run-name", mode, "--tune", mode,
                     "--lr", 0.05, *TINY)
    assert result.exit_code == 0, result.output
    result = _invoke("eval", "--run", runs / mode, "--langs", "en,de", "--data-dir", TEST_DATA)
    assert result.exit_code == 0, result.output
    metrics = json.loads((runs / mode / "metrics.json").read_text())
    dev = metrics["eval"]["xnli"]["dev"]
    assert dev["en"]["n"] == dev["de"]["n"] == 24 and 0 <= dev["en"]["accuracy"] <= 1
    assert f"{100 * dev['de']['accuracy']:.1f}" in result.output
    train_record = metrics["train"]
    assert train_record["tune"]["mode"] == mode and train_record["stored_bytes"] > 0
    config = json.loads((runs / mode / "config.json").read_text())["train"]
    assert (config["method"], config["verbalizer"], config["backbone_lr"]) == ("none", "linear", 1e-5 if mode == "head" else None)
    assert (runs / mode / "prompt" / BACKBONE_FILE).is_file() == (mode == "head")


def _one_line_error(result, exit_code=1) -> str:
    assert result.exit_code == exit_code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_bad_combinations_are_refused_in_one_line(tiny_bert_dir, tiny_mt5_dir, tmp_path, xnli, backbone, monkeypatch):
    runs = tmp_path / "runs"
    line = _one_line_error(_invoke("train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--tune", "lora",
                                   "--method", "prefix", *TINY))
    assert "--tune lora cannot be combined with --method prefix" in line and not runs.exists()
    result = _invoke("train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--backbone-lr", 1e-4, *TINY)
    assert result.exit_code == 2 and "backbone_lr needs tune full, bitfit, lora or head" in result.output
    line = _one_line_error(_invoke("train", "--backbone", tiny_mt5_dir, "--runs-dir", runs, "--tune", "bitfit",
                                   "--method", "soft", *TINY))
    assert "has no bias parameters" in line
    line = _one_line_error(_invoke("train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--tune", "full",
                                   "--init-from", "library", *TINY))
    assert "cannot be combined with --init-from library" in line
    # a tuned run is refused where the one base backbone would run its prompt
    for name in ("full", "plain"):
        cfg = _cfg(tune=name) if name == "full" else _cfg()
        (runs / name).mkdir(parents=True)
        train(cfg, copy.deepcopy(backbone), xnli, runs / name, [TEST_DATA])
    line = _one_line_error(_invoke("eval", "--run", f"{runs / 'full'},{runs / 'plain'}", "--langs", "en",
                                   "--data-dir", TEST_DATA))
    assert "full was trained with --tune full" in line and "an ensemble of several runs" in line
    line = _one_line_error(_invoke("train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--init-from",
                                   runs / "full", *TINY))
    assert "was trained with --tune full" in line
    line = _one_line_error(_invoke("eval", "--run", runs / "full", "--langs", "de", "--shots", 2, "--data-dir", TEST_DATA))
    assert "was trained with --tune full" in line
    from xprompt.workflows.serving import check_runs

    with pytest.raises(XPromptError, match="serve"):
        check_runs([runs / "full"])
    from xprompt.library import library_prompts

    assert [c.run.name for c in library_prompts(runs, backbone.sha256)] == ["plain"]


def test_the_uniprompt_table_flags_train(tiny_bert_dir, tmp_path):
    """Every configuration of scripts/uniprompt_table.py parses and trains (two steps on the tiny model, on the
    published 4-shot MARC split of seed 13; the paper's 9-layer prompt tower cut to the tiny model's 1)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("uniprompt_table", ROOT / "scripts" / "uniprompt_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    runs = tmp_path / "runs"
    for name, (_, flags) in table.METHODS.items():
        tiny = ["--max-steps", 2, "--eval-every", 2, "--dtype", "fp32", *(["--tower-layers", 1] if "--tower-layers" in flags else [])]
        result = _invoke("train", "--task", "marc", "--shots", 4, "--seed", 13, "--backbone", tiny_bert_dir,
                         "--runs-dir", runs, "--run-name", name, *flags, *tiny)
        assert result.exit_code == 0, (name, result.output)
        config = json.loads((runs / name / "config.json").read_text())["train"]
        tune = flags[flags.index("--tune") + 1] if "--tune" in flags else "prompt"
        assert config.get("tune", "prompt") == tune and config["max_steps"] == 2
        assert (runs / name / "prompt" / "prompt.safetensors").is_file()
        if "--backbone-lr" in flags:
            assert config["backbone_lr"] == float(flags[flags.index("--backbone-lr") + 1])
    assert set(table.METHODS) == {p.name for p in runs.iterdir() if p.is_dir()}


def test_the_uniprompt_table_leaves_out_english_where_the_run_selected_on_it(tmp_path):
    """marc/dev is the K = 256, seed 13 k-shot dev split: a run whose lineage selected on every English dev row is
    scored on the targets alone (read from its lineage, not from its K and seed), one that read some of them keeps
    English, and the table's English cell and gap average over the seeds that have an English figure."""
    import importlib.util

    from conftest import ROOT

    from xprompt.data import load_split
    from xprompt.tasks import load_task

    spec = importlib.util.spec_from_file_location("uniprompt_table", ROOT / "scripts" / "uniprompt_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    task = load_task("marc")
    langs = ["de", "en", "es", "fr", "ja", "zh"]
    en_dev = list(load_split(task, "en", "dev")["id"])

    def run(name, selected):
        folder = tmp_path / name
        folder.mkdir()
        reads = [{"task": "marc", "split": "dev", "lang": "en", "labels": True, "role": "source", "use": "select",
                  "rows": len(selected), "ids": selected}] if selected else []
        (folder / "lineage.json").write_text(json.dumps({"run_id": name, "name": name, "kind": "train", "task": "marc",
                                                         "lang": "en", "reads": reads, "parents": []}))
        return folder

    assert table.scorable(run("all", [*en_dev, "extra-row"]), task, langs) == ["de", "es", "fr", "ja", "zh"]
    assert table.scorable(run("some", en_dev[:-1]), task, langs) == langs
    assert table.scorable(run("none", []), task, langs) == langs

    def rec(seed, en, target):
        dev = {lang: {"accuracy": target} for lang in ["de", "es", "fr", "ja", "zh"]}
        if en is not None:
            dev["en"] = {"accuracy": en}
        return {"run": f"r{seed}", "method": "head", "shots": 256, "seed": seed, "dev": dev, "stored_bytes": 0,
                "train": {"train_seconds": 60, "trainable_parameters": 5, "dtype": "bf16"}, "compute": {}}

    row = [line for line in table.render([rec(42, 0.5, 0.4), rec(13, None, 0.3), rec(21, 0.7, 0.4)]).splitlines()
           if line.startswith("| vanilla")][0].split(" | ")
    assert row[2] == "3" and row[3].startswith("60.0 ± 14.1 (2 seeds")  # English over seeds 42 and 21
    assert row[9] == "**36.7 ± 5.8**"  # the target average over all three
    assert row[10] == "20.0 ± 14.1"  # gaps of seeds 42 (10) and 21 (30)


def test_the_safety_net_restarts_a_tuned_backbone_from_its_start(backbone, xnli, tmp_path, monkeypatch):
    """A restart puts the backbone back to the base as it puts the prompt back, and scales its rate as the
    prompt's: twice restarted, a bitfit run ends where one trained from the start at a ninth of both rates does."""
    from test_training import _forced_net

    _forced_net(monkeypatch)
    cfg = dict(tune="bitfit", max_steps=8, eval_every=3)
    summary = train(_cfg(lr=0.09, backbone_lr=9e-3, **cfg), copy.deepcopy(backbone), xnli, tmp_path, [TEST_DATA])
    assert [(r["lr"], r["new_lr"]) for r in summary["restarts"]] == [(0.09, pytest.approx(0.03)),
                                                                      (pytest.approx(0.03), pytest.approx(0.01))]
    plain = tmp_path / "plain"
    plain.mkdir()
    train(_cfg(lr=0.01, backbone_lr=1e-3, restart_check=0, **cfg), copy.deepcopy(backbone), xnli, plain, [TEST_DATA])
    for name in ("prompt.safetensors", BACKBONE_FILE):
        a, b = load_file(str(tmp_path / "prompt" / name)), load_file(str(plain / "prompt" / name))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("mode,rate", [("full", 1e-3), ("lora", 0.05 * 3e-3), ("prompt", 0.05 * 3e-3)])
def test_a_full_run_trains_the_unified_tower_at_the_backbone_rate(backbone, xnli, tmp_path, monkeypatch, mode, rate):
    """UniPrompt's authors train the whole model at one rate: under --tune full the prompt tower (copies of
    backbone layers) takes --backbone-lr; elsewhere it keeps --lr x 3e-3."""
    from xprompt.training import fit as real_fit
    import xprompt.workflows.runs as runs_module

    seen = {}

    def fit(model, *args, **kwargs):
        tower = {id(p) for p in model.prompt.tower.parameters()}
        seen["rates"] = {g["lr"] for g in model.param_groups(0.05) if {id(p) for p in g["params"]} & tower}
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(runs_module, "fit", fit)
    extra = {"backbone_lr": 1e-3} if mode != "prompt" else {}
    _trained(_cfg(tune=mode, method="unified", lr=0.05, max_steps=2, **extra), backbone, xnli, tmp_path / "run", monkeypatch)
    (got,) = seen["rates"]
    assert got == pytest.approx(rate)


def test_a_run_config_written_before_new_fields_continues(tmp_path):
    """The same command continues a run whose config.json an earlier version wrote: without the fields added
    since (tune's, prompt_text) or with prompt_text written empty; another config is still refused."""
    from xprompt.workflows.runs import plan_runs

    cfg = TrainConfig(task="xnli", seed=5)
    assert "prompt_text" not in cfg.to_dict() and "tune" not in cfg.to_dict()
    for name, stored in (("old", cfg.to_dict()), ("empty", {**cfg.to_dict(), "prompt_text": ""})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"train": stored}))
        assert plan_runs([cfg], tmp_path, name) == [(cfg, tmp_path / name)]
    with pytest.raises(XPromptError, match="another config"):
        plan_runs([TrainConfig(task="xnli", seed=5, lr=0.5)], tmp_path, "old")


def test_the_uniprompt_table_pairs_methods_seed_by_seed():
    """--paired A:B renders A's paired z against B per common seed and K with close_gap's formula (wins − losses
    over the target rows, English never counted), a seed one of them lacks left out, and an unknown method refused."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("uniprompt_table", ROOT / "scripts" / "uniprompt_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    targets = ["de", "es", "fr", "ja", "zh"]

    def rec(method, seed, bits):
        dev = {lang: {"accuracy": b.count("1") / len(b), "correct": b, "rows": f"h-{lang}"} for lang, b in bits.items()}
        return {"run": f"{method}-{seed}", "method": method, "shots": 16, "seed": seed, "dev": dev, "stored_bytes": 0,
                "train": {"train_seconds": 60, "trainable_parameters": 5, "dtype": "bf16"}, "compute": {}}

    base = {lang: "1100" for lang in ["en", *targets]}
    # seed 42: de 2 wins, es 1 loss, English 2 wins that must not count; seed 13: every target row lost where B won
    records = [rec("head", 42, base), rec("uniprompt", 42, {**base, "de": "1111", "es": "0100", "en": "1111"}),
               rec("head", 13, base), rec("uniprompt", 13, {**base, **{lang: "0000" for lang in targets}}),
               rec("uniprompt", 21, base)]  # no vanilla run of seed 21: not paired
    rows = [line for line in table.render(records, ["uniprompt:head"]).splitlines() if line.startswith("| uniprompt | head")]
    assert rows == [f"| uniprompt | head | 16 | 42: {1 / 3 ** 0.5:+.1f}, 13: {-10 / 10 ** 0.5:+.1f} | 1 of 2 | "
                    f"{(5 - 50) / 2:.1f} ± {((5 + 50) ** 2 / 2) ** 0.5:.1f} |"]
    assert "Paired z" not in table.render(records, [])
    with pytest.raises(SystemExit, match="lora:nosuch"):
        table.render(records, ["lora:nosuch"])


def test_the_uniprompt_table_merges_its_runs_into_what_other_lanes_stored():
    """Two lanes sharing one --out: a lane's store write keeps the runs the other stored meanwhile, replaces a
    run it redid in place, and appends its new ones."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("uniprompt_table", ROOT / "scripts" / "uniprompt_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    stored = [{"run": "a", "v": 1}, {"run": "b", "v": 1}]  # b: written by the other lane after this one started
    mine = {"a": {"run": "a", "v": 2}, "c": {"run": "c", "v": 2}}
    assert table.stored_runs(stored, mine) == [{"run": "a", "v": 2}, {"run": "b", "v": 1}, {"run": "c", "v": 2}]
