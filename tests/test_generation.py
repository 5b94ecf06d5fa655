"""Generation tasks on a seq2seq backbone: the card, the encoded targets, teacher-forced training,
decoding, and chrF/BLEU through sacrebleu, equal to sacrebleu's own on the written predictions."""

import json

import pytest
import torch

from conftest import TEST_DATA
from test_cli import invoke
from xprompt.data import batches, encode, load_split
from xprompt.tasks import load_task


@pytest.fixture(scope="module")
def gen():
    return load_task("xnli_gen")


def test_the_generation_card(gen):
    assert gen.kind == "generation" and gen.target == "hypothesis" and gen.metric == "chrf" and gen.labels == ()
    row = load_split(gen, "de", "dev", [TEST_DATA])[0]
    source = json.loads((TEST_DATA / "xnli" / "dev.de.jsonl").read_text().splitlines()[0])
    assert row["premise"] == source["premise"] and row["relation"] == source["label"]
    assert row["target"] == source["hypothesis"] and row["label"] == -1


def test_targets_are_encoded_with_eos_and_padded_for_the_loss(gen, tiny_mt5_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_mt5_dir)
    ds = encode(load_split(gen, "en", "train", [TEST_DATA]).select(range(4)), gen.template, tok)
    first = ds[0]
    assert first["target_ids"] == tok(load_split(gen, "en", "train", [TEST_DATA])[0]["target"],
                                      add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first["mask_pos"] == -1 and tok.convert_ids_to_tokens(first["input_ids"][-1]) == "</s>"
    batch = next(batches(ds, 4, tok.pad_token_id))
    lengths = [len(t) for t in ds["target_ids"]]
    assert ((batch["target_ids"] == -100).sum(1) == torch.tensor([max(lengths) - lengths[i] for i in batch["index"]])).all()


def test_teacher_forced_loss_falls_and_the_decoder_writes(gen, tiny_mt5_dir, tmp_path):
    from xprompt.backbones import load_backbone
    from xprompt.model import build_model
    from xprompt.generation import generation_head

    bb = load_backbone(str(tiny_mt5_dir), tmp_path)
    model = build_model(bb, 0, "soft", 4, "mask", verbalizer=generation_head(bb))
    model.prompt.embeddings.data.copy_(bb.input_embeddings().weight[100:104])
    ds = encode(load_split(gen, "en", "train", [TEST_DATA]).select(range(8)), gen.template, bb.tokenizer)
    batch = next(batches(ds, 8, bb.tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.3)
    losses = []
    for _ in range(8):
        loss = model.loss(batch) / 8
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in bb.seq2seq.parameters())
    out = model.generate(batch, max_new_tokens=5)
    assert out.shape[0] == 8 and out.shape[1] <= 6


def test_generation_end_to_end_and_chrf_equals_sacrebleus(gen, tiny_mt5_dir, tmp_path):
    from sacrebleu.metrics import BLEU, CHRF

    runs = tmp_path / "runs"
    out = invoke("train", "--task", "xnli_gen", "--backbone", tiny_mt5_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 4, "--eval-every", 2, "--prompt-length", 2, "--dtype", "fp32", "--run-name", "g")
    assert out.exit_code == 0, out.output
    card = json.loads((runs / "g" / "prompt" / "xprompt.json").read_text())
    assert card["verbalizer"] == "generate" and card["labels"] == []
    out = invoke("eval", "--run", runs / "g", "--langs", "en,de,zh", "--data-dir", TEST_DATA, "--max-new-tokens", 8,
                 "--metrics", "chrf,bleu", "--json")
    assert out.exit_code == 0, out.output
    results = json.loads(out.stdout)["results"]
    for lang in ("en", "de", "zh"):
        lines = (runs / "g" / "predictions" / f"xnli_gen.dev.{lang}.tsv").read_text().splitlines()[1:]
        predictions = [line.split("\t", 1)[1] for line in lines]
        references = [json.loads(x)["hypothesis"] for x in (TEST_DATA / "xnli" / f"dev.{lang}.jsonl").read_text().splitlines()]
        chrf = CHRF().corpus_score(predictions, [references])
        assert results[lang]["chrf"] * 100 == pytest.approx(chrf.score)
        bleu = BLEU(tokenize="zh" if lang == "zh" else "13a").corpus_score(predictions, [references])
        assert results[lang]["bleu"] * 100 == pytest.approx(bleu.score)
        assert "tok:zh" in results["zh"]["signature"]["bleu"] and "nc:6|nw:0" in results[lang]["signature"]["chrf"]
    assert json.loads((runs / "g" / "metrics.json").read_text())["eval"]["xnli_gen"]["dev"]["de"]["chrf"] >= 0


def test_an_encoder_only_backbone_refuses_a_generation_task(tiny_bert_dir, tmp_path):
    out = invoke("train", "--task", "xnli_gen", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA,
                 "--runs-dir", tmp_path / "runs", "--max-steps", 2)
    assert out.exit_code == 1 and "a generation task needs a seq2seq backbone" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "runs").exists()
