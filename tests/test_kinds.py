"""Backbone kinds: a masked LM scores the task card's label words at <mask> (hard verbalizer)."""

import json

import pytest
import torch

from conftest import TEST_DATA, train_losses
from xprompt.backbones import load_backbone
from xprompt.config import TrainConfig
from xprompt.data import batches, encode, load_split
from xprompt.model import load_run_model
from xprompt.tasks import load_task
from xprompt.workflows.runs import train
from xprompt.verbalizers import WordVerbalizer, label_pieces


@pytest.fixture(scope="module")
def mlm(tiny_xlmr_mlm_dir, tmp_path_factory):
    return load_backbone(str(tiny_xlmr_mlm_dir), tmp_path_factory.mktemp("cache"))


def test_masked_lm_kind_keeps_its_head(mlm):
    assert mlm.kind == "masked_lm" and mlm.lm_head is not None
    assert type(mlm.model).__name__ == "XLMRobertaModel"
    assert all(not p.requires_grad for p in [*mlm.model.parameters(), *mlm.lm_head.parameters()])


@pytest.mark.parametrize("reduce", ["mean", "first", "max"])
def test_word_verbalizer_reduces_multi_piece_words(mlm, reduce):
    pieces = {"en": [[5, 6], [7], [8, 9, 10]], "de": [[11], [12, 13], [14]]}
    verbalizer = WordVerbalizer(mlm.lm_head, pieces, "en", reduce)
    states = torch.randn(4, 32)
    with torch.no_grad():
        logp = torch.log_softmax(mlm.lm_head(states), -1)
        got = verbalizer(states)
        verbalizer.use_language("de")
        german = verbalizer(states)
        verbalizer.use_language("sw")  # no words for sw: the training language's
        fallback = verbalizer(states)
    pick = {"mean": lambda x: x.mean(-1), "first": lambda x: x[:, 0], "max": lambda x: x.max(-1).values}[reduce]
    torch.testing.assert_close(got, torch.stack([pick(logp[:, ids]) for ids in pieces["en"]], -1))
    torch.testing.assert_close(german, torch.stack([pick(logp[:, ids]) for ids in pieces["de"]], -1))
    torch.testing.assert_close(fallback, got)


def test_label_pieces_drop_a_lone_word_start(mlm):
    tok = mlm.tokenizer
    pieces = label_pieces(tok, {"zh": {"0": "不同", "1": "相同"}}, ["0", "1"])
    for ids in pieces["zh"]:
        assert ids and "▁" not in tok.convert_ids_to_tokens(ids)


def test_hard_verbalizer_trains_the_prompt_only_and_evaluates_per_language(mlm, tiny_xlmr_mlm_dir, tmp_path):
    xnli = load_task("xnli")
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(method="soft", prompt_length=3, max_steps=6, eval_every=3, batch_size=8, dtype="fp32", lr=0.3)
    summary = train(cfg, mlm, xnli, run, [TEST_DATA])
    assert summary["trainable_parameters"] == 3 * 32  # no label vectors: the words are the verbalizer
    card = json.loads((run / "prompt" / "xprompt.json").read_text())
    assert card["verbalizer"] == "hard" and card["label_words"]["de"]["entailment"] == "Ja"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log)

    model, _ = load_run_model(run, mlm)
    assert isinstance(model.verbalizer, WordVerbalizer)
    ds = encode(load_split(xnli, "de", "dev", [TEST_DATA]), xnli.template, mlm.tokenizer)
    batch = next(batches(ds, 8, mlm.tokenizer.pad_token_id))
    model.verbalizer.use_language("de")
    with torch.no_grad():
        states = model.states(batch)
        logp = torch.log_softmax(mlm.lm_head(states), -1)
        pieces = label_pieces(mlm.tokenizer, {"de": card["label_words"]["de"]}, xnli.labels)["de"]
        expected = torch.stack([logp[:, ids].mean(-1) for ids in pieces], -1)
        torch.testing.assert_close(model(batch), expected)


def test_hard_verbalizer_loss_falls(mlm):
    from xprompt.model import build_model
    from xprompt.verbalizers import make_verbalizer, task_label_words

    xnli = load_task("xnli")
    verbalizer = make_verbalizer(mlm, "auto", list(xnli.labels), task_label_words(xnli), "en")
    model = build_model(mlm, 3, "deep", 3, "mask", verbalizer=verbalizer)
    model.prompt.embeddings.data.copy_(mlm.input_embeddings().weight[100:103])
    ds = encode(load_split(xnli, "en", "train", [TEST_DATA]).select(range(16)), xnli.template, mlm.tokenizer)
    batch = next(batches(ds, 16, mlm.tokenizer.pad_token_id))
    losses = train_losses(model, batch, 1.0, 8)
    # a random tiny LM head is nearly flat over 250k pieces, so the steps are small but every one falls
    assert all(after < before for before, after in zip(losses, losses[1:]))
    assert all(p.grad is None for p in mlm.lm_head.parameters())


def test_hard_verbalizer_on_an_encoder_is_refused(tiny_bert_dir, tmp_path):
    from test_cli import invoke

    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", tmp_path,
                 "--max-steps", "1", "--verbalizer", "hard")
    text = out.output.replace("\n", "")
    assert out.exit_code == 1 and "needs a masked-LM or seq2seq backbone" in text and "kind encoder" in text
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-made left behind


@pytest.fixture(scope="module")
def mt5(tiny_mt5_dir, tmp_path_factory):
    return load_backbone(str(tiny_mt5_dir), tmp_path_factory.mktemp("cache"))


def test_seq2seq_kind_scores_label_strings_by_decoder_likelihood(mt5):
    from xprompt.model import build_model
    from xprompt.verbalizers import make_verbalizer, task_label_words
    from xprompt.verbalizers import DecoderVerbalizer

    assert mt5.kind == "seq2seq" and mt5.seq2seq is not None and type(mt5.model).__name__ == "MT5Stack"
    xnli = load_task("xnli")
    verbalizer = make_verbalizer(mt5, "auto", list(xnli.labels), task_label_words(xnli), "en")
    assert isinstance(verbalizer, DecoderVerbalizer)
    model = build_model(mt5, 3, "deep", 3, "mask", verbalizer=verbalizer)
    model.prompt.embeddings.data.normal_()
    model.prompt.layer_prompts.data.normal_()
    ds = encode(load_split(xnli, "de", "dev", [TEST_DATA]), xnli.template, mt5.tokenizer)
    batch = next(batches(ds, 4, mt5.tokenizer.pad_token_id))
    model.eval()
    model.verbalizer.use_language("de")
    with torch.no_grad():
        scores = model(batch)
        hidden, mask = model.sequence(batch["input_ids"], batch["attention_mask"])
        from transformers.modeling_outputs import BaseModelOutput

        # mT5's span format: the input holds <extra_id_0> (the last piece of its SentencePiece model)
        # at the mask; the target is "<extra_id_0> word <extra_id_1> </s>"; word + <extra_id_1> are scored
        tok = mt5.tokenizer
        first, second = len(tok) - 1, len(tok) - 2
        assert tok.convert_ids_to_tokens([first, second]) == ["<extra_id_0>", "<extra_id_1>"]
        assert (batch["input_ids"][torch.arange(4), batch["mask_pos"]] == first).all()
        for c, label in enumerate(xnli.labels):
            ids = tok(xnli.languages["de"].label_words[label], add_special_tokens=False)["input_ids"]
            word = [i for i in ids if tok.convert_ids_to_tokens(i) != "▁"]
            target = [first, *word, second, tok.eos_token_id]
            assert model.verbalizer.targets["de"][c] == target and tok.eos_token_id == 1
            for row in range(2):
                logits = mt5.seq2seq(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[row : row + 1]),
                                     attention_mask=mask[row : row + 1], labels=torch.tensor([target])).logits
                logp = torch.log_softmax(logits[0].float(), -1)[torch.arange(len(target)), target]
                assert scores[row, c].item() == pytest.approx(logp[1:-1].mean().item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method", ["soft", "ptuning", "deep", "unified"])
def test_every_method_trains_on_seq2seq_and_masked_lm(method, mt5, mlm, tmp_path):
    xnli = load_task("xnli")
    for bb in (mt5, mlm):
        run = tmp_path / f"{bb.kind}-{method}"
        run.mkdir()
        before = {k: v.clone() for k, v in bb.model.state_dict().items()}
        cfg = TrainConfig(method=method, prompt_length=3, max_steps=4, eval_every=2, batch_size=8, dtype="fp32", lr=0.3)
        train(cfg, bb, xnli, run, [TEST_DATA])
        assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
        model, card = load_run_model(run, bb)
        assert card["verbalizer"] == "hard"
        ds = encode(load_split(xnli, "en", "dev", [TEST_DATA]), xnli.template, bb.tokenizer)
        batch = next(batches(ds, 4, bb.tokenizer.pad_token_id))
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(batch)).all()


def test_seq2seq_loss_falls(mt5):
    from xprompt.model import build_model
    from xprompt.verbalizers import make_verbalizer, task_label_words

    xnli = load_task("xnli")
    model = build_model(mt5, 3, "soft", 3, "mask",
                        verbalizer=make_verbalizer(mt5, "auto", list(xnli.labels), task_label_words(xnli), "en"))
    model.prompt.embeddings.data.copy_(mt5.input_embeddings().weight[100:103])
    ds = encode(load_split(xnli, "en", "train", [TEST_DATA]).select(range(16)), xnli.template, mt5.tokenizer)
    batch = next(batches(ds, 16, mt5.tokenizer.pad_token_id))
    losses = train_losses(model, batch, 0.3, 6)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in mt5.seq2seq.parameters())


def test_seq2seq_and_masked_lm_from_the_cli(tiny_mt5_dir, tiny_xlmr_mlm_dir, tmp_path):
    from test_cli import invoke

    for folder, reduce in ((tiny_mt5_dir, "mean"), (tiny_xlmr_mlm_dir, "max")):
        runs = tmp_path / folder.name
        common = ["--backbone", folder, "--data-dir", TEST_DATA, "--runs-dir", runs]
        ok = invoke("train", *common, "--max-steps", "2", "--prompt-length", "3", "--dtype", "fp32",
                    "--run-name", "r", "--label-reduce", reduce)
        assert ok.exit_code == 0, ok.output
        ev = invoke("eval", "--run", runs / "r", "--langs", "en,de,zh", *common[:4])
        assert ev.exit_code == 0, ev.output
        dev = json.loads((runs / "r" / "metrics.json").read_text())["eval"]["xnli"]["dev"]
        assert set(dev) == {"en", "de", "zh"} and all(0 <= r["accuracy"] <= 1 for r in dev.values())
        assert json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())["label_reduce"] == reduce


def test_soft_words_verbalizer_starts_at_the_label_words(mlm, tmp_path):
    from xprompt.verbalizers import make_verbalizer, task_label_words
    from xprompt.verbalizers import OutputWordsVerbalizer

    xnli = load_task("xnli")
    words = task_label_words(xnli)
    pieces = label_pieces(mlm.tokenizer, words, list(xnli.labels))["en"]
    assert all(len(ids) == 1 for ids in pieces)  # "Yes", "Maybe", "No": one piece each
    soft = make_verbalizer(mlm, "soft-words", list(xnli.labels), words, "en")
    hard = make_verbalizer(mlm, "hard", list(xnli.labels), words, "en")
    assert isinstance(soft, OutputWordsVerbalizer) and soft.weight.requires_grad
    states = torch.randn(5, 32)
    with torch.no_grad():
        diff = soft(states) - hard(states)  # hard = the same scores minus the softmax normaliser
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-4, rtol=1e-4)

    run = tmp_path / "sw"
    run.mkdir()
    cfg = TrainConfig(method="soft", prompt_length=3, max_steps=3, eval_every=3, batch_size=8, dtype="fp32",
                      verbalizer="soft-words")
    summary = train(cfg, mlm, xnli, run, [TEST_DATA])
    assert summary["trainable_parameters"] == 3 * 32 + 3 * 32 + 3
    model, card = load_run_model(run, mlm)
    assert card["verbalizer"] == "soft-words"
    from safetensors.torch import load_file

    saved = load_file(str(run / "prompt" / "prompt.safetensors"))
    assert torch.equal(model.verbalizer.weight, saved["verbalizer.weight"])
    assert torch.equal(model.verbalizer.bias, saved["verbalizer.bias"])
