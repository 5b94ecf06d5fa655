"""``--method unified --prompt-text``: UniPrompt's model-based prompt. The prompt tower reads the
text's own tokens, every tower position joins first, the readout is the prompt's ``<mask>``, the
input takes the card's template without its ``<mask>``; cached states, saving, reloading, resuming,
the three backbone kinds, and the combinations refused."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_DATA
from test_cli import invoke
from xprompt.config import TrainConfig
from xprompt.data import batches, encode, load_split
from xprompt.mixed import MixedModel
from xprompt.model import build_model, load_run_model
from xprompt.prompts import widen_mask
from xprompt.tasks import load_task
from xprompt.workflows.runs import train

TEXT = "It's <mask>."


@pytest.fixture(scope="module")
def marc():
    return load_task("marc")


@pytest.fixture
def mt5(tiny_mt5_dir, tmp_path):
    from xprompt.backbones import load_backbone

    return load_backbone(str(tiny_mt5_dir), tmp_path)


def _model(backbone, text=TEXT, labels=5):
    model = build_model(backbone, labels, "unified", 8, "mask", tower_layers=1, prompt_text=text)
    torch.manual_seed(0)
    model.verbalizer.weight.data.normal_()
    return model.eval()


def _batch(backbone, task, n=6, lang="de"):
    template = task.template_for(lang, "unmasked")
    ds = encode(load_split(task, lang, "dev", [TEST_DATA]).select(range(n)), template, backbone.tokenizer)
    return next(batches(ds, n, backbone.tokenizer.pad_token_id))


def _out(out):
    return out[0] if isinstance(out, tuple) else out


def test_the_tower_reads_exactly_the_text_tokens(backbone):
    model = _model(backbone)
    prompt, tok = model.prompt, backbone.tokenizer
    assert prompt.prompt_ids == [0, 1650, 25, 7, 250001, 6, 5, 2]
    assert tok.convert_ids_to_tokens(prompt.prompt_ids) == ["<s>", "▁It", "'", "s", "<mask>", "▁", ".", "</s>"]
    assert (prompt.mask_index, prompt.length, prompt.offset, prompt.embeddings.numel()) == (4, 8, 0, 0)
    with torch.no_grad():  # the backbone's embedding module on those ids, then the tower: every position kept
        by_hand = _out(prompt.tower[0](backbone.model.embeddings(input_ids=torch.tensor([prompt.prompt_ids])), None))
    assert prompt.tower_states().shape == (8, 32)
    torch.testing.assert_close(prompt.tower_states(), by_hand[0], atol=1e-6, rtol=0)
    # what trains: the tower and the label vectors; no free vectors, the embedding module stays frozen
    assert set(prompt.tensors()) == {f"tower.{k}" for k in prompt.tower.state_dict()}
    tower = sum(p.numel() for p in prompt.tower.parameters())
    assert sum(p.numel() for p in model.trainable_parameters()) == tower + 5 * 32
    assert not any(p.requires_grad for p in backbone.model.parameters())
    card = prompt.card_fields()
    assert (card["prompt_text"], card["prompt_length"], card["prompt_position"]) == (TEXT, 8, "first")


def test_the_prompt_leads_the_joint_sequence_and_its_mask_is_read(backbone, marc):
    assert marc.template_for("en", "unmasked") == "{text}" and marc.template_for("en", "agnostic") == "{text} <mask>"
    model = _model(backbone)
    batch = _batch(backbone, marc)
    assert (batch["mask_pos"] == -1).all()  # the input holds no <mask>
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # padded
    layers = backbone.layers()
    with torch.no_grad():
        hidden, mask = model.sequence(batch["input_ids"], batch["attention_mask"])
        logits = model(batch)
        for row in range(len(lengths)):
            n = int(lengths[row])
            ids = batch["input_ids"][row : row + 1, :n]
            context = _out(layers[0](backbone.model.embeddings(input_ids=ids), None))  # the input alone
            joint = torch.cat([model.prompt.tower_states().unsqueeze(0), context], dim=1)  # <s> It's <mask> . </s> ; <s> text </s>
            final = _out(layers[1](joint, None))
            torch.testing.assert_close(hidden[row, : 8 + n], final[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(logits[row], model.verbalizer(final[:, 4])[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(mask.sum(1), lengths + 8) and bool(mask[:, :8].all())
    torch.testing.assert_close(model.states(batch), hidden[:, 4], atol=0, rtol=0)


def test_cached_prompt_states_equal_recomputing_and_never_go_stale(backbone, marc):
    model = _model(backbone)
    batch = _batch(backbone, marc)
    calls = []
    real = model.prompt.tower[0].forward
    model.prompt.tower[0].forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    with torch.inference_mode():
        first, again = model(batch), model(batch)
    model.prompt.cache_enabled = False
    with torch.inference_mode():
        recomputed = model(batch)
    assert len(calls) == 2 and first.dtype == torch.float32
    assert torch.equal(again, first)
    torch.testing.assert_close(recomputed, first, atol=1e-6, rtol=0)
    model.prompt.cache_enabled = True
    with torch.no_grad():  # the embedding module is read too: a changed one is never served stale
        backbone.input_embeddings().weight.mul_(1.5)
    with torch.inference_mode():
        changed = model(batch)
    assert len(calls) == 3 and not torch.allclose(changed, first)


def test_mt5_text_prompt_by_hand_and_cached(mt5, marc):
    """mT5: no <s>, the mask is <extra_id_0>; the tower runs its own relative bias, the prompt joins
    first with zero bias to the input, as the free vectors do."""
    model = _model(mt5)
    tok, prompt = mt5.tokenizer, model.prompt
    words = tok("It's", add_special_tokens=False)["input_ids"]
    sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
    assert prompt.prompt_ids == [*words, sentinel, *tok(".", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert prompt.mask_index == len(words) and prompt.offset == 0
    length, layers, embed = prompt.length, mt5.layers(), mt5.input_embeddings()
    batch = _batch(mt5, marc, 1)
    ids = batch["input_ids"]
    with torch.no_grad():
        got = model.encode(ids, batch["attention_mask"])
        tower = prompt.tower[0](embed(torch.tensor([prompt.prompt_ids])), None, None)[0]
        hidden, bias = layers[0](embed(ids), None, None)[:2]
        hidden = layers[1](torch.cat([tower, hidden], dim=1), None, widen_mask(bias, ids.shape[1], length, at=0))[0]
        hidden = mt5.model.final_layer_norm(hidden)
        torch.testing.assert_close(got, hidden, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.states(batch), hidden[:, len(words)], atol=1e-6, rtol=0)
        batch = _batch(mt5, marc)
        cached = model(batch)
        prompt.cache_enabled = False
        torch.testing.assert_close(model(batch), cached, atol=1e-6, rtol=0)


def test_mixed_batch_of_text_and_vector_prompts(backbone, marc):
    """A text prompt runs in a mixed batch beside others: each row as its member alone."""
    members = [_model(backbone), _model(backbone, "Es war <mask>!"), build_model(backbone, 5, "unified", 3, "mask",
                                                                                tower_layers=1).eval()]
    batch = _batch(backbone, marc)
    member = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        mixed = MixedModel(members)(batch, member)
        for row, m in enumerate(member.tolist()):
            alone = members[m]({k: v[row : row + 1] for k, v in batch.items()})
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)


def test_train_and_eval_from_the_cli_give_the_same_logits_after_reload(tiny_bert_dir, marc, tmp_path, monkeypatch):
    import xprompt.workflows.runs as runs

    built = []
    monkeypatch.setattr(runs, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", tmp_path]
    ok = invoke("train", *common, "--task", "marc", "--shots", "4", "--seed", "13", "--method", "unified",
                "--prompt-text", TEXT, "--tower-layers", "1", "--max-steps", "4", "--eval-every", "2", "--batch-size",
                "4", "--lr", "1e-2", "--dtype", "fp32", "--run-name", "t")
    assert ok.exit_code == 0, ok.output
    run = tmp_path / "t"
    card = json.loads((run / "prompt" / "xprompt.json").read_text())
    assert {k: card[k] for k in ("method", "prompt_text", "prompt_length", "position", "tower_layers", "readout",
                                 "template", "template_style", "verbalizer")} == {
        "method": "unified", "prompt_text": TEXT, "prompt_length": 8, "position": "first", "tower_layers": 1,
        "readout": "mask", "template": "{text}", "template_style": "unmasked", "verbalizer": "centered"}
    saved = load_file(str(run / "prompt" / "prompt.safetensors"))
    assert "prompt_embeddings" not in saved and any(k.startswith("tower.") for k in saved)
    trained = built[0].eval()  # the model training built, with the saved (best) tensors
    trained.prompt.load_tensors(saved, "saved")
    trained.verbalizer.load_tensors(saved, "saved")
    from xprompt.backbones import load_backbone

    backbone = load_backbone(str(tiny_bert_dir), tmp_path / "cache")
    reloaded, _ = load_run_model(run, backbone)
    assert reloaded.prompt.prompt_ids == trained.prompt.prompt_ids and reloaded.prompt.mask_index == 4
    batch = _batch(backbone, marc, 8)
    with torch.inference_mode():
        want, got = trained.eval()(batch), reloaded.eval()(batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    ev = invoke("eval", "--run", run, "--langs", "de", "--limit", "8", "--dtype", "fp32", *common[:4])
    assert ev.exit_code == 0, ev.output
    lines = (run / "predictions" / "marc.dev.de.tsv").read_text().splitlines()[1:]
    order = batch["index"].argsort()  # batches() groups rows by length: back to the split's order
    assert [line.split("\t")[1] for line in lines] == [marc.labels[i] for i in want[order].argmax(-1).tolist()]


def test_text_prompt_resumes_exactly(backbone, xnli, tmp_path):
    from test_training import _assert_same_run, _final_state

    cfg = TrainConfig(method="unified", prompt_text=TEXT, tower_layers=1, max_steps=6, eval_every=3, batch_size=8,
                      dtype="fp32", seed=5, lr=1e-2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    train(cfg, copy.deepcopy(backbone), xnli, whole, [TEST_DATA])

    def interrupt(step, total, loss, rate):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, copy.deepcopy(backbone), xnli, parts, [TEST_DATA], on_step=interrupt)
    assert json.loads((parts / "checkpoint" / "state.json").read_text())["step"] == 4
    train(cfg, copy.deepcopy(backbone), xnli, parts, [TEST_DATA])
    a, b = _final_state(whole), _final_state(parts)
    _assert_same_run(a, b)
    assert not any(k.startswith("prompt_embeddings") for k in a["prompt"])
    start = backbone.layers()[0].state_dict()
    assert any(not torch.equal(a["checkpoint"][f"model.tower.0.{k}"], v) for k, v in start.items())  # the tower trained


def test_text_prompt_on_masked_lm_and_seq2seq_from_the_cli(tiny_mt5_dir, tiny_xlmr_mlm_dir, tmp_path):
    for folder in (tiny_xlmr_mlm_dir, tiny_mt5_dir):
        runs = tmp_path / folder.name
        common = ["--backbone", folder, "--data-dir", TEST_DATA, "--runs-dir", runs]
        ok = invoke("train", *common, "--task", "marc", "--shots", "4", "--seed", "13", "--method", "unified",
                    "--prompt-text", TEXT, "--tower-layers", "1", "--max-steps", "2", "--dtype", "fp32", "--run-name", "r")
        assert ok.exit_code == 0, ok.output
        ev = invoke("eval", "--run", runs / "r", "--langs", "en,ja", "--limit", "6", *common[:4])
        assert ev.exit_code == 0, ev.output
        dev = json.loads((runs / "r" / "metrics.json").read_text())["eval"]["marc"]["dev"]
        assert set(dev) == {"en", "ja"} and all(r["n"] == 6 and 0 <= r["accuracy"] <= 1 for r in dev.values())
        card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
        assert (card["verbalizer"], card["prompt_text"], card["template_style"]) == ("hard", TEXT, "unmasked")


@pytest.mark.parametrize("args, code, message", [
    (["--method", "soft", "--prompt-text", TEXT], 2, "--prompt-text needs --method unified, not soft"),
    (["--prompt-text", TEXT, "--template", "native"], 1, "use --template auto or unmasked, not native"),
    (["--prompt-text", "It's good.", "--template", "unmasked", "--readout", "mask"], 1,
     "--readout mask reads a <mask>, and neither the input (--template unmasked) nor --prompt-text holds one"),
    (["--template", "unmasked", "--readout", "both"], 1, "--readout both reads a <mask>"),
    (["--prompt-text", "<mask> or <mask>"], 1, "may hold one <mask> and no {field}"),
    (["--prompt-text", "{text} <mask>"], 1, "may hold one <mask> and no {field}"),
    (["--prompt-text", TEXT, "--prompt-length", "3"], 1, "a --prompt-text prompt has none"),
    (["--prompt-text", TEXT, "--init", "random"], 1, "a --prompt-text prompt has none"),
])
def test_inconsistent_combinations_are_one_line_errors(tiny_bert_dir, tmp_path, args, code, message):
    method = [] if "--method" in args else ["--method", "unified"]
    result = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", tmp_path / "runs",
                    "--task", "marc", "--shots", "4", "--max-steps", "2", "--dtype", "fp32", *method, *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    if code == 1:  # an XPromptError: one line, and no run folder left behind
        assert [line for line in result.output.splitlines() if message in line] == [
            line for line in result.output.splitlines() if "error" in line]
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_without_prompt_text_the_unified_prompt_is_as_before(backbone):
    model = build_model(backbone, 3, "unified", 3, "mask", tower_layers=1)
    prompt = model.prompt
    assert (prompt.prompt_ids, prompt.mask_index, prompt.offset, prompt.length) == (None, None, 1, 3)
    assert list(prompt.tensors())[0] == "prompt_embeddings" and "prompt_text" not in prompt.card_fields()
    assert len(prompt.param_groups(1.0)) == 2 and prompt.shape_key()[1:] == (3, 1, 1, None)
