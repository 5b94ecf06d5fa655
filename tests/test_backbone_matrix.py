"""Every method x every verbalizer kind on the realistic XLM-R and mT5 folders (laid out as the hub
ships them), through the CLI as a user runs it: train, eval, library similar (all three measures),
library transfer, --init-from library with every transfer mode, and the PEFT export where a twin
exists. Backbones are loaded once per folder (conftest memoises the CLI's loader)."""

import json

import pytest

from conftest import TEST_DATA
from test_cli import invoke

METHODS = ["soft", "ptuning", "deep", "prefix", "unified"]
VERBALIZERS = {"xlmr": ["soft", "centered", "hard", "soft-words"], "mt5": ["soft", "centered", "hard"]}
CASES = [(bb, m, v) for bb, kinds in VERBALIZERS.items() for m in METHODS for v in kinds]
STEPS = ["--max-steps", 2, "--eval-every", 2, "--prompt-length", 2, "--batch-size", 8]


@pytest.fixture(scope="module")
def folders(tiny_xlmr_mlm_dir, tiny_mt5_dir):
    return {"xlmr": tiny_xlmr_mlm_dir, "mt5": tiny_mt5_dir}


@pytest.fixture(scope="module")
def library(folders, tmp_path_factory):
    """Per backbone, a library of PAWS-X (en) prompts: one for every method x verbalizer."""
    runs = {}
    for bb, folder in folders.items():
        runs[bb] = tmp_path_factory.mktemp(f"lib-{bb}")
        for method in METHODS:
            for kind in VERBALIZERS[bb]:
                out = invoke("train", "--task", "pawsx", "--backbone", folder, "--data-dir", TEST_DATA,
                             "--runs-dir", runs[bb], "--method", method, "--verbalizer", kind, *STEPS,
                             "--run-name", f"pawsx-{method}-{kind}")
                assert out.exit_code == 0, out.output
    return runs


def _card(run):
    return json.loads((run / "prompt" / "xprompt.json").read_text())


@pytest.mark.parametrize("bb, method, kind", CASES)
def test_train_eval_similar_and_library_starts(bb, method, kind, folders, library, tmp_path):
    folder, lib = folders[bb], library[bb]
    common = ["--backbone", folder, "--data-dir", TEST_DATA]
    runs = tmp_path / "runs"
    out = invoke("train", *common, "--runs-dir", runs, "--method", method, "--verbalizer", kind, *STEPS,
                 "--run-name", "x")
    assert out.exit_code == 0, out.output
    card = _card(runs / "x")
    assert (card["method"], card["verbalizer"]) == (method, kind)
    assert card["template_style"] == ("native" if kind in ("hard", "soft-words") else "agnostic")
    assert card["position"] == ("first" if bb == "mt5" else "after-bos")

    out = invoke("eval", "--run", runs / "x", "--langs", "en,de,zh", "--data-dir", TEST_DATA, "--json")
    assert out.exit_code == 0, out.output
    results = json.loads(out.stdout)["results"]
    assert {lang: r["n"] for lang, r in results.items()} == {"en": 24, "de": 24, "zh": 24}

    # similarity to the library's prompts of the same shape (soft and ptuning prompts are both saved
    # as input vectors), whatever their verbalizer
    out = invoke("library", "similar", runs / "x", "--runs-dir", lib, "--json", "--top-k", 100)
    assert out.exit_code == 0, out.output
    similar = json.loads(out.stdout)["similar"]
    same_shape = ("soft", "ptuning") if method in ("soft", "ptuning") else (method,)
    assert {r["run"] for r in similar} == {f"pawsx-{m}-{v}" for m in same_shape for v in VERBALIZERS[bb]}
    for r in similar:  # (the prompts moved little in 2 steps from the same seeded start: cosines near 1)
        assert abs(r["flat"]) <= 1 + 1e-5 and abs(r["mean"]) <= 1 + 1e-5 and 0 <= r["neurons"] <= 1

    # --init-from library, every transfer mode (the library holds other-task prompts of this method)
    for mode in ("best", "average", "mixture"):
        name = f"lib-{mode}"
        out = invoke("train", *common, "--runs-dir", runs, "--method", method, "--verbalizer", kind, *STEPS,
                     "--init-from", "library", "--library", lib, "--transfer", mode, "--top-k", 2,
                     "--mixture-steps", 2, "--run-name", name)
        assert out.exit_code == 0, out.output
        choice = json.loads((runs / name / "library_init.json").read_text())
        assert choice["transfer"] == mode and len(choice["sources"]) == 2
        assert all(_card(lib / s.rsplit("/", 1)[-1])["method"] == method for s in choice["sources"])
        assert f"library ({mode} of top 2" in _card(runs / name)["selection"]["init"]


@pytest.mark.parametrize("bb", ["xlmr", "mt5"])
def test_library_transfer_scores_every_prompt(bb, folders, library):
    """Zero-shot task similarity over the whole library: PAWS-X prompts on XNLI (no label map) read
    XNLI's own words (label-word verbalizers) or XNLI's class means (label vectors); on PAWS-X itself
    every prompt uses its own."""
    out = invoke("library", "transfer", "--task", "xnli", "--backbone", folders[bb], "--runs-dir", library[bb],
                 "--data-dir", TEST_DATA, "--json")
    assert out.exit_code == 0, out.output
    rows = {r["run"]: r for r in json.loads(out.stdout)["transfer"]}
    assert len(rows) == len(METHODS) * len(VERBALIZERS[bb])
    for name, r in rows.items():
        words = name.endswith(("-hard", "-soft-words"))
        assert r["label_vectors"] == ("task words" if words else "class means") and 0 <= r["accuracy"] <= 1
    out = invoke("library", "transfer", "--task", "pawsx", "--backbone", folders[bb], "--runs-dir", library[bb],
                 "--data-dir", TEST_DATA, "--json")
    assert out.exit_code == 0, out.output
    assert {r["label_vectors"] for r in json.loads(out.stdout)["transfer"]} == {"own"}


@pytest.mark.parametrize("bb", ["xlmr", "mt5"])
@pytest.mark.parametrize("method", ["soft", "ptuning", "prefix"])
def test_peft_export_where_a_twin_exists(bb, method, folders, library, tmp_path):
    """soft/ptuning (and prefix on XLM-R) runs write a PEFT adapter; trained with --prompt-position
    first, PEFT's model over the same encoder gives the same states. mT5: the prompt sits in the
    encoder, so its twin is a FEATURE_EXTRACTION adapter over MT5EncoderModel; a prefix there has no twin."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, MT5EncoderModel

    from xprompt.backbones import load_backbone
    from xprompt.model import load_run_model

    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", folders[bb], "--data-dir", TEST_DATA, "--runs-dir", runs, "--method", method,
                 "--prompt-position", "first", "--dtype", "fp32", *STEPS, "--run-name", "p")
    assert out.exit_code == 0, out.output
    adapter = runs / "p" / "prompt" / "adapter_config.json"
    if bb == "mt5" and method == "prefix":
        assert not adapter.exists()
        return
    config = json.loads(adapter.read_text())
    assert config["peft_type"] == ("PREFIX_TUNING" if method == "prefix" else "PROMPT_TUNING")
    backbone = load_backbone(str(folders[bb]), tmp_path / "cache")
    model, _ = load_run_model(runs / "p", backbone)
    base = (MT5EncoderModel if bb == "mt5" else AutoModel).from_pretrained(folders[bb])
    peft = PeftModel.from_pretrained(base, runs / "p" / "prompt").eval()
    ids = backbone.tokenizer(["Der Hund schläft.", "A dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.encode(ids["input_ids"], ids["attention_mask"])
        theirs = peft(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    mask = ids["attention_mask"].bool()
    n = 2 if method != "prefix" else 0  # PEFT's prefix adds no positions to the output
    torch.testing.assert_close(ours[:, 2:][mask], theirs[:, n:][mask], atol=1e-4, rtol=1e-4)
