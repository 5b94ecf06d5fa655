"""P-tuning's prompt encoder and the prompt initialisations."""

import json

import pytest
import torch
from conftest import TEST_DATA, train_losses
from safetensors.torch import load_file

from xprompt.config import TrainConfig
from xprompt.data import batches, encode, load_split
from xprompt.errors import XPromptError
from xprompt.model import build_model, load_run_model
from xprompt.prompts import PTuningConfig, PTuningPrompt
from xprompt.tasks import load_task
from xprompt.start import initial_vectors
from xprompt.workflows.runs import train


def _cfg(**kw):
    base = dict(method="ptuning", prompt_length=3, max_steps=8, eval_every=4, batch_size=8, dtype="fp32", seed=5, lr=3e-2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("reparam", ["mlp", "lstm"])
def test_ptuning_starts_at_its_seed_and_its_encoder_learns(reparam, backbone, xnli, tokenizer):
    prompt = PTuningPrompt(PTuningConfig(prompt_length=3, reparam=reparam), 32, 2)
    prompt.embeddings.data.normal_()
    torch.testing.assert_close(prompt.vectors(), prompt.embeddings)  # zero last layer: the soft start
    model = build_model(backbone, 3, "ptuning", 3, "mask", reparam)
    model.prompt.embeddings.data.copy_(backbone.input_embeddings().weight[10:13])
    ds = encode(load_split(xnli, "en", "train", [TEST_DATA]).select(range(16)), xnli.template, tokenizer)
    batch = next(batches(ds, 16, tokenizer.pad_token_id))
    losses = train_losses(model, batch, 3e-2, 6)
    assert losses[-1] < losses[0]
    assert model.prompt.mlp[2].weight.abs().sum() > 0  # the encoder itself trained
    if reparam == "lstm":
        assert any(p.grad is None and p.abs().sum() > 0 for p in model.prompt.lstm.parameters())
    assert all(not p.requires_grad for p in backbone.model.parameters())


def test_ptuning_run_saves_resulting_vectors_and_resumes_exactly(backbone, xnli, tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    summary = train(_cfg(reparam="lstm"), backbone, xnli, whole, [TEST_DATA])
    saved = load_file(str(whole / "prompt" / "prompt.safetensors"))
    assert set(saved) == {"prompt_embeddings", "verbalizer.weight", "verbalizer.center"}  # not the encoder
    card = json.loads((whole / "prompt" / "xprompt.json").read_text())
    assert card["method"] == "ptuning" and card["reparam"] == "lstm" and summary["trainable_parameters"] > 3 * 32

    # loaded as a P-tuning prompt or as a plain soft prompt: the same logits
    model, card = load_run_model(whole, backbone)
    from xprompt.verbalizers import vector_verbalizer

    soft = build_model(backbone, 3, "soft", 3, card["readout"], verbalizer=vector_verbalizer(card, 3, 32))
    soft.prompt.load_tensors(saved, "x")
    soft.verbalizer.load_tensors(saved, "x")
    ds = encode(load_split(xnli, "en", "dev", [TEST_DATA]), xnli.template, backbone.tokenizer)
    batch = next(batches(ds, 8, backbone.tokenizer.pad_token_id))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), soft(batch))

    # interrupted at step 5 and resumed: the encoder's weights came back from the checkpoint
    parts = tmp_path / "parts"
    parts.mkdir()

    def stop(step, total, loss, rate):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(reparam="lstm", eval_every=5), backbone, xnli, parts, [TEST_DATA], on_step=stop)
    checkpoint = load_file(str(next((parts / "checkpoint").glob("state-*.safetensors"))))
    assert any(k.startswith("model.encoder.lstm") for k in checkpoint)
    again = tmp_path / "again"
    again.mkdir()
    train(_cfg(reparam="lstm", eval_every=5), backbone, xnli, again, [TEST_DATA])
    train(_cfg(reparam="lstm", eval_every=5), backbone, xnli, parts, [TEST_DATA])
    a, b = (load_file(str(d / "prompt" / "prompt.safetensors")) for d in (again, parts))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_initialisations(backbone, xnli):
    table = backbone.input_embeddings().weight
    tok = backbone.tokenizer
    vocab = initial_vectors(backbone, 5, TrainConfig(seed=1), xnli)
    assert any(torch.equal(vocab[0], row) for row in table[5:5005])
    random = initial_vectors(backbone, 400, TrainConfig(init="random", seed=1), xnli)
    assert random.std().item() == pytest.approx(table.std().item(), rel=0.1)
    assert not any(torch.equal(random[0], row) for row in table)

    text = initial_vectors(backbone, 5, TrainConfig(init="text", init_text="Is it true?"), xnli)
    ids = tok("Is it true?", add_special_tokens=False)["input_ids"]
    rows = (ids * 5)[:5]
    torch.testing.assert_close(text, table[torch.tensor(rows)])

    words = initial_vectors(backbone, 5, TrainConfig(init="label-words", lang="fr"), xnli)
    for i, label in enumerate(xnli.labels):
        expected = table[torch.tensor(tok(xnli.languages["fr"].label_words[label], add_special_tokens=False)["input_ids"])].mean(0)
        torch.testing.assert_close(words[i], expected)
    assert words.shape == (5, table.shape[1])
    short = initial_vectors(backbone, 2, TrainConfig(init="label-words"), xnli)
    assert short.shape == (2, table.shape[1])

    with pytest.raises(ValueError, match="needs init_text"):
        TrainConfig(init="text")
    with pytest.raises(ValueError, match="init must be"):
        TrainConfig(init="bogus")
    with pytest.raises(XPromptError, match="declares no languages.xx.label_words"):
        initial_vectors(backbone, 2, TrainConfig(init="label-words", lang="xx"), xnli)


def test_method_and_init_flags_from_the_cli(tiny_bert_dir, tmp_path):
    from test_cli import invoke

    runs = tmp_path / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
              "--prompt-length", "3", "--dtype", "fp32"]
    ok = invoke("train", *common, "--run-name", "p", "--method", "ptuning", "--reparam", "lstm",
                "--init", "text", "--init-text", "Is it true?")
    assert ok.exit_code == 0, ok.output
    card = json.loads((runs / "p" / "prompt" / "xprompt.json").read_text())
    assert (card["method"], card["reparam"], card["init"]) == ("ptuning", "lstm", "text")
    ev = invoke("eval", "--run", runs / "p", "--langs", "en,de", "--data-dir", TEST_DATA, "--backbone", tiny_bert_dir)
    assert ev.exit_code == 0, ev.output
    bad = invoke("train", *common, "--run-name", "q", "--init", "text")
    assert bad.exit_code == 2 and "init_text" in bad.output
    lw = invoke("train", *common, "--run-name", "r", "--method", "soft", "--init", "label-words")
    assert lw.exit_code == 0, lw.output
    assert json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())["init"] == "label-words"


@pytest.mark.parametrize("method", ["soft", "ptuning", "prefix", "prefix-projection"])
def test_peft_round_trip_gives_the_same_outputs(method, tiny_bert_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from test_cli import invoke
    from transformers import AutoModel

    from xprompt.backbones import load_backbone

    runs = tmp_path / "runs"
    method, *projection = method.split("-")  # prefix-projection: exported as the MLP's resulting table
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "3",
              "--prompt-length", "4", "--dtype", "fp32", "--method", method, "--prompt-position", "first",
              "--readout", "mask", *(["--prefix-projection"] if projection else [])]
    assert invoke("train", *common, "--run-name", "src").exit_code == 0
    folder = runs / "src" / "prompt"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    bb = load_backbone(str(tiny_bert_dir), tmp_path / "cache")
    model, card = load_run_model(runs / "src", bb)
    assert card["position"] == "first"
    base = AutoModel.from_pretrained(tiny_bert_dir)
    twin = peft.PeftModel.from_pretrained(base, folder)
    twin.eval()
    model.eval()
    xnli = load_task("xnli")
    ds = encode(load_split(xnli, "de", "dev", [TEST_DATA]), xnli.template, bb.tokenizer)
    batch = next(batches(ds, 8, bb.tokenizer.pad_token_id))
    with torch.no_grad():
        ours = model.encode(batch["input_ids"], batch["attention_mask"])
        theirs = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if method == "prefix":  # PEFT returns the input's positions only (the prefix lives in the cache)
            theirs = torch.cat([ours[:, :4], theirs], dim=1)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
        # and the verbalizer on PEFT's <mask> states gives xprompt's logits
        rows = torch.arange(len(batch["labels"]))
        torch.testing.assert_close(model.verbalizer(theirs[rows, batch["mask_pos"] + 4]), model(batch), atol=1e-5, rtol=1e-4)

    # a PEFT adapter folder starts a new run: its vectors are the start
    again = invoke("train", *common, "--run-name", "dst", "--init-from", folder, "--lr", "1e-12", "--max-steps", "1",
                   "--eval-every", "1")
    assert again.exit_code == 0, again.output
    start = load_file(str(runs / "dst" / "prompt" / "prompt.safetensors"))
    exported = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
    if method == "prefix":  # PEFT's rows: per virtual token, layer by layer, key then value
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
        saved = load_file(str(folder / "prompt.safetensors"))
        assert exported.shape == (4, 2 * 2 * 32)
        torch.testing.assert_close(exported[2, 32 * 3 : 32 * 4], saved["values"][1, 2])
        for key in ("keys", "values"):
            torch.testing.assert_close(start[key], saved[key], atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(start["prompt_embeddings"], exported, atol=1e-6, rtol=1e-5)


def test_peft_adapters_xprompt_cannot_use_are_refused(tmp_path):
    from xprompt.peft_io import read_adapter

    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(XPromptError, match="peft_type 'LORA' is not a prompt"):
        read_adapter(folder, 32)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(4, 16)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(XPromptError, match=r"shape \(4, 16\); this backbone needs \(N, 32\)"):
        read_adapter(folder, 32)


@pytest.mark.parametrize("method", ["deep", "prefix"])
def test_prefix_projection_starts_at_the_tables_learns_and_saves_the_resulting_tables(method, backbone, xnli, tokenizer):
    """P-tuning v2's reparameterisation: at the start the same outputs as the plain method; the MLP
    trains; the saved tables reproduce the trained model without it; checkpoints resume it."""
    from xprompt.start import init_prompt_and_verbalizer

    ds = encode(load_split(xnli, "en", "train", [TEST_DATA]).select(range(16)), xnli.template, tokenizer)
    batch = next(batches(ds, 16, tokenizer.pad_token_id))
    cfg = TrainConfig(method=method, prompt_length=3, dtype="fp32", readout="mask", prefix_projection=True)
    model = build_model(backbone, 3, method, 3, "mask", projection=True)
    init_prompt_and_verbalizer(model, backbone, ds, cfg)
    plain = build_model(backbone, 3, method, 3, "mask")
    plain.prompt.load_tensors(model.prompt.tensors(), "x")
    plain.verbalizer.load_tensors(model.verbalizer.tensors(), "x")
    with torch.no_grad():
        torch.testing.assert_close(model(batch), plain(batch))  # the MLP's last layer starts at zero
    n_tables = {"deep": backbone.num_layers - 1, "prefix": 2 * backbone.num_layers}[method]
    extra = 32 * 32 + 32 + 32 * n_tables * 32 + n_tables * 32
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(p.numel() for p in plain.trainable_parameters()) + extra

    losses = train_losses(model, batch, 3e-2, 6)
    assert losses[-1] < losses[0]
    assert model.prompt.projection.mlp[2].weight.abs().sum() > 0  # the MLP itself trained
    saved = model.prompt.tensors()
    assert not any(k.startswith("projection") for k in saved)
    plain.prompt.load_tensors(saved, "x")
    plain.verbalizer.load_tensors(model.verbalizer.tensors(), "x")
    resumed = build_model(backbone, 3, method, 3, "mask", projection=True)
    resumed.prompt.load_state_tensors(model.prompt.state_tensors(), "x")
    resumed.verbalizer.load_tensors(model.verbalizer.tensors(), "x")
    reloaded = build_model(backbone, 3, method, 3, "mask", projection=True)  # --init-from a saved run
    reloaded.prompt.load_tensors(saved, "x")
    reloaded.verbalizer.load_tensors(model.verbalizer.tensors(), "x")
    with torch.no_grad():
        expected = model(batch)
        for other in (plain, resumed, reloaded):
            torch.testing.assert_close(other(batch), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(resumed.prompt.projection.mlp[2].weight, model.prompt.projection.mlp[2].weight)
    with pytest.raises(XPromptError, match="ckpt: projection.mlp.0.weight, .* missing; was it saved with --prefix-projection"):
        resumed.prompt.load_state_tensors(plain.prompt.state_tensors(), "ckpt")


def test_prefix_projection_flag_from_the_cli(tiny_bert_dir, tmp_path):
    from test_cli import invoke

    runs = tmp_path / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
              "--prompt-length", "3", "--dtype", "fp32"]
    ok = invoke("train", *common, "--run-name", "d", "--method", "deep", "--prefix-projection")
    assert ok.exit_code == 0, ok.output
    card = json.loads((runs / "d" / "prompt" / "xprompt.json").read_text())
    assert card["method"] == "deep" and card["prefix_projection"] is True
    summary = json.loads((runs / "d" / "metrics.json").read_text())["train"]
    # input prompt, one layer's vectors, 3 label vectors, and the MLP (32 -> 32 -> 1 layer x 32)
    assert summary["trainable_parameters"] == 3 * 32 + 3 * 32 + 3 * 32 + (32 * 32 + 32) * 2
    ev = invoke("eval", "--run", runs / "d", "--langs", "en,de", "--data-dir", TEST_DATA, "--backbone", tiny_bert_dir)
    assert ev.exit_code == 0, ev.output
    bad = invoke("train", *common, "--run-name", "s", "--method", "soft", "--prefix-projection")
    assert bad.exit_code != 0 and "--prefix-projection needs --method deep or prefix, not soft" in bad.output
    assert "Traceback" not in bad.output and not (runs / "s").exists()


def test_a_peft_prefix_trained_with_prefix_projection_starts_a_run(tiny_bert_dir, tmp_path):
    """PEFT saves a prefix_projection adapter as the MLP's resulting table; xprompt reads it and
    gives PEFT's hidden states."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    from xprompt.backbones import load_backbone
    from xprompt.peft_io import read_adapter

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(tiny_bert_dir)
    config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4, prefix_projection=True,
                                     encoder_hidden_size=16)
    theirs = peft.get_peft_model(base, config)
    for param in theirs.prompt_encoder.default.transform.parameters():
        param.data.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    bb = load_backbone(str(tiny_bert_dir), tmp_path / "cache")
    tensors, _ = read_adapter(tmp_path / "adapter", 32)
    model = build_model(bb, 3, "prefix", 4, "mask", position="first")
    model.prompt.load_tensors(tensors, "adapter")
    model.eval()
    xnli = load_task("xnli")
    ds = encode(load_split(xnli, "en", "dev", [TEST_DATA]), xnli.template, bb.tokenizer)
    batch = next(batches(ds, 8, bb.tokenizer.pad_token_id))
    with torch.no_grad():
        ours = model.encode(batch["input_ids"], batch["attention_mask"])[:, 4:]
        peft_states = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(peft_states, ours, atol=1e-5, rtol=1e-4)
