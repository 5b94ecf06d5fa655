"""The PEFT export as PEFT users meet it (issue 33, part): a portable base model name, a task type
PEFT's Auto classes load, the label head beside it, and the recipe of docs/peft.md giving xprompt's labels;
methods without a twin say so on export."""

import json
import re

import pytest
from typer.testing import CliRunner

from conftest import ROOT, TEST_DATA
from xprompt.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def recipe() -> str:
    text = (ROOT / "docs" / "peft.md").read_text()
    block = re.search(r"<!-- peft-recipe -->\n```python\n(.*?)```\n<!-- end peft-recipe -->", text, re.S)
    return block.group(1)


@pytest.mark.parametrize("readout", ["mean", "mask"])
def test_the_readme_recipe_gives_xprompt_s_labels(tiny_bert_dir, tmp_path, readout):
    pytest.importorskip("peft")
    import torch

    from xprompt.backbones import load_backbone
    from xprompt.data import batches, encode, load_split
    from xprompt.evaluation import predict
    from xprompt.model import load_run_model
    from xprompt.tasks import load_task

    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 3,
                 "--prompt-length", 3, "--dtype", "fp32", "--method", "soft", "--prompt-position", "first",
                 "--readout", readout, "--lr", 0.3, "--run-name", "r")
    assert out.exit_code == 0, out.output
    run = runs / "r"
    config = json.loads((run / "prompt" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir) and config["task_type"] == "FEATURE_EXTRACTION"
    head = json.loads((run / "prompt" / "xprompt_head.json").read_text())
    assert head["verbalizer"] == "centered" and head["virtual_tokens"] == 3

    bb = load_backbone(str(tiny_bert_dir), tmp_path / "cache")
    model, card = load_run_model(run, bb)
    xnli = load_task("xnli")
    rows = encode(load_split(xnli, "de", "dev", [TEST_DATA]), head["template"], bb.tokenizer)
    expected = [card["labels"][i] for i in predict(model, rows, 24, bb.tokenizer.pad_token_id)]
    batch = next(batches(rows, 24, bb.tokenizer.pad_token_id))  # length-sorted: back to row order below
    scope = {"run": str(run), "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "mask_pos": batch["mask_pos"]}
    exec(recipe(), scope)  # the recipe's code, as written
    order = batch["index"].tolist()
    got = [None] * len(order)
    for position, label in zip(order, scope["labels"]):
        got[position] = label
    assert got == expected
    assert torch.is_tensor(scope["scores"]) and scope["scores"].shape == (24, 3)


def test_export_says_whether_a_peft_twin_exists(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    for method in ("soft", "deep"):
        assert invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps",
                      1, "--prompt-length", 2, "--dtype", "fp32", "--method", method, "--run-name", method).exit_code == 0
    soft = invoke("library", "export", runs / "soft", "--out", tmp_path / "out")
    assert soft.exit_code == 0 and "PEFT twin: AutoPeftModelForFeatureExtraction" in " ".join(soft.output.split())
    assert (tmp_path / "out" / "soft" / "prompt" / "xprompt_head.safetensors").is_file()
    deep = invoke("library", "export", runs / "deep", "--out", tmp_path / "out")
    assert deep.exit_code == 0 and "method 'deep' has no PEFT twin" in " ".join(deep.output.split())
