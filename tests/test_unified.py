"""UniPrompt's two-tower prompt: the towers, the fusion, the cached prompt states."""

import json

import pytest
import torch

from conftest import TEST_DATA, train_losses
from xprompt.config import TrainConfig
from xprompt.data import batches, encode, load_split
from xprompt.model import build_model, load_run_model
from xprompt.workflows.runs import train


def _model(backbone, length=3):
    model = build_model(backbone, 3, "unified", length, "mask", tower_layers=1)
    model.prompt.embeddings.data.copy_(backbone.input_embeddings().weight[200 : 200 + length])
    torch.manual_seed(0)
    model.verbalizer.weight.data.normal_()
    return model.eval()


def _batch(backbone, xnli, n=6):
    ds = encode(load_split(xnli, "de", "dev", [TEST_DATA]).select(range(n)), xnli.template, backbone.tokenizer)
    return next(batches(ds, n, backbone.tokenizer.pad_token_id))


def test_tower_starts_as_copies_of_the_lower_layers(backbone):
    model = _model(backbone)
    lower = backbone.layers()[0].state_dict()
    assert all(torch.equal(v, lower[k]) for k, v in model.prompt.tower[0].state_dict().items())
    assert all(p.requires_grad for p in model.prompt.tower.parameters())
    assert not any(p.requires_grad for p in backbone.model.parameters())
    trainable = sum(p.numel() for p in model.prompt.parameters())
    assert trainable == 3 * 32 + sum(p.numel() for p in backbone.layers()[0].parameters())


def test_fusion_equals_running_the_towers_by_hand(backbone, xnli):
    model = _model(backbone)
    batch = _batch(backbone, xnli, 1)  # one row: no padding
    ids = batch["input_ids"]
    layers = backbone.layers()
    with torch.no_grad():
        got = model.encode(ids, batch["attention_mask"])
        hidden = backbone.model.embeddings(input_ids=ids)  # the context tower: the input alone
        hidden = layers[0](hidden, None)
        hidden = torch.cat([hidden[:, :1], model.prompt.tower_states().unsqueeze(0), hidden[:, 1:]], dim=1)
        hidden = layers[1](hidden, None)
    torch.testing.assert_close(got, hidden)


def test_padding_does_not_change_a_row(backbone, xnli):
    model = _model(backbone)
    batch = _batch(backbone, xnli)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch is padded
    with torch.no_grad():
        together = model.encode(batch["input_ids"], batch["attention_mask"])
        for row in range(len(lengths)):
            n = int(lengths[row])
            alone = model.encode(batch["input_ids"][row : row + 1, :n], batch["attention_mask"][row : row + 1, :n])
            torch.testing.assert_close(together[row, : n + 3], alone[0], atol=1e-5, rtol=1e-4)


def test_cached_prompt_states_give_the_same_logits_and_never_go_stale(backbone, xnli):
    model = _model(backbone)
    batch = _batch(backbone, xnli)
    calls = []
    real = model.prompt.tower[0].forward
    model.prompt.tower[0].forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    with torch.inference_mode():
        first = model(batch)
        again = model(batch)  # from the cache
    assert len(calls) == 1
    model.prompt.cache_enabled = False
    with torch.inference_mode():
        recomputed = model(batch)
    assert len(calls) == 2
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(recomputed, first)
    model.prompt.cache_enabled = True
    with torch.no_grad():
        model.prompt.embeddings.add_(torch.randn_like(model.prompt.embeddings))  # as an optimizer step would, in place
    with torch.inference_mode():
        changed = model(batch)
    assert len(calls) == 3 and not torch.allclose(changed, first)


def test_unified_trains_saves_and_loads(backbone, xnli, tmp_path):
    run = tmp_path / "u"
    run.mkdir()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    cfg = TrainConfig(method="unified", prompt_length=3, max_steps=6, eval_every=3, batch_size=8, dtype="fp32",
                      lr=1e-3, tower_layers=1)
    summary = train(cfg, backbone, xnli, run, [TEST_DATA])
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert summary["trainable_parameters"] > sum(p.numel() for p in backbone.layers()[0].parameters())
    model, card = load_run_model(run, backbone)
    assert card["method"] == "unified" and card["tower_layers"] == 1
    from safetensors.torch import load_file

    saved = load_file(str(run / "prompt" / "prompt.safetensors"))
    assert any(k.startswith("tower.") for k in saved)
    for name, tensor in model.prompt.tower.state_dict().items():
        assert torch.equal(tensor, saved[f"tower.{name}"])


def test_unified_loss_falls(backbone, xnli):
    model = _model(backbone)
    ds = encode(load_split(xnli, "en", "train", [TEST_DATA]).select(range(16)), xnli.template, backbone.tokenizer)
    batch = next(batches(ds, 16, backbone.tokenizer.pad_token_id))
    model.train()
    losses = train_losses(model, batch, 1e-2, 6)
    assert losses[-1] < losses[0]


@pytest.fixture
def mt5(tiny_mt5_dir, tmp_path):
    from xprompt.backbones import load_backbone

    return load_backbone(str(tiny_mt5_dir), tmp_path)


def test_seq2seq_fusion_equals_running_the_towers_by_hand(mt5, xnli):
    """mT5's relative position bias is made by its first layer and passed on: the prompt joins in
    front (mT5 inputs have no <s>) and sees no relative position (zero bias); the tower runs its own bias."""
    from xprompt.prompts import widen_mask

    model = _model(mt5)
    batch = _batch(mt5, xnli, 1)
    ids = batch["input_ids"]
    layers, n = mt5.layers(), ids.shape[1]
    with torch.no_grad():
        got = model.encode(ids, batch["attention_mask"])
        tok = mt5.tokenizer  # mT5 as the hub ships it: no <s>, so the prompt leads
        assert tok.bos_token_id is None and tok.cls_token_id is None and model.prompt.offset == 0
        eos = mt5.input_embeddings()(torch.tensor([tok.eos_token_id]))
        tower = model.prompt.tower[0](torch.cat([model.prompt.embeddings, eos]).unsqueeze(0), None, None)[0]
        hidden, bias = layers[0](mt5.input_embeddings()(ids), None, None)[:2]
        hidden = torch.cat([tower[:, :3], hidden], dim=1)
        hidden = layers[1](hidden, None, widen_mask(bias, n, 3, at=0))[0]
        hidden = mt5.model.final_layer_norm(hidden)
    torch.testing.assert_close(got, hidden)
    torch.testing.assert_close(model.prompt.tower_states(), tower[0, :3])
    assert bias.shape[-1] == n and torch.count_nonzero(widen_mask(bias, n, 3, at=0)[..., :3]) == 0


def test_seq2seq_cached_states_and_padding(mt5, xnli):
    model = _model(mt5)
    batch = _batch(mt5, xnli)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()
    with torch.no_grad():
        hidden, mask = model.sequence(batch["input_ids"], batch["attention_mask"])
        assert mask.shape == hidden.shape[:2] and torch.equal(mask.sum(1), lengths + 3)
        for row in (int(lengths.argmin()), int(lengths.argmax())):
            k = int(lengths[row])
            alone = model.encode(batch["input_ids"][row : row + 1, :k], batch["attention_mask"][row : row + 1, :k])
            torch.testing.assert_close(hidden[row, : k + 3], alone[0], atol=1e-5, rtol=1e-4)
        cached = model(batch)
        model.prompt.cache_enabled = False
        torch.testing.assert_close(model(batch), cached)


def test_unified_on_seq2seq_and_masked_lm_from_the_cli(tiny_mt5_dir, tiny_xlmr_mlm_dir, tmp_path):
    from test_cli import invoke

    for folder in (tiny_mt5_dir, tiny_xlmr_mlm_dir):
        runs = tmp_path / folder.name
        common = ["--backbone", folder, "--data-dir", TEST_DATA, "--runs-dir", runs]
        ok = invoke("train", *common, "--method", "unified", "--tower-layers", "1", "--max-steps", "2",
                    "--prompt-length", "3", "--dtype", "fp32", "--run-name", "r")
        assert ok.exit_code == 0, ok.output
        ev = invoke("eval", "--run", runs / "r", "--langs", "en,de,zh", *common[:4])
        assert ev.exit_code == 0, ev.output
        dev = json.loads((runs / "r" / "metrics.json").read_text())["eval"]["xnli"]["dev"]
        assert set(dev) == {"en", "de", "zh"} and all(0 <= r["accuracy"] <= 1 for r in dev.values())
        card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
        assert card["method"] == "unified" and card["verbalizer"] == "hard"
