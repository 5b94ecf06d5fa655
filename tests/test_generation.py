"""Generation tasks on a seq2seq backbone: the card, the encoded targets, teacher-forced training,
decoding, and chrF/BLEU through sacrebleu, equal to sacrebleu's own on the written predictions."""

import csv
import io
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


def test_text_scores_on_strings_with_known_scores():
    """sacrebleu's figures on strings worked out by hand: a mended check, since the tiny model's own
    BLEU is 0 (a BLEU that always said 0 would pass any test on it alone)."""
    from xprompt.evaluation import text_scores

    same = text_scores(["the cat sat on the mat"], ["the cat sat on the mat"], "en", ("chrf", "bleu"))
    assert same["chrf"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(1.0)
    # BLEU of "a b c d e" against "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths
    # (brevity penalty 1), so BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25 = 0.6687
    one_off = text_scores(["a b c d e"], ["a b c d f"], "en", ("bleu",))
    assert one_off["bleu"] == pytest.approx(0.2 ** 0.25)
    # chrF of "abc" against "abd": character 1-, 2-, 3-grams match 2/3, 1/2 and 0 (precision and
    # recall alike; no 4- to 6-grams, so three orders count): F = (2/3 + 1/2 + 0) / 3 = 7/18
    chrf = text_scores(["abc"], ["abd"], "en")
    assert chrf["chrf"] == pytest.approx(7 / 18) and set(chrf) == {"chrf", "signature"}
    assert "nc:6|nw:0" in chrf["signature"]["chrf"] and "tok:13a" in one_off["signature"]["bleu"]
    # Chinese is scored with sacrebleu's zh tokenizer (each character a word): the same case as
    # "a b c d e" (13a would see one word each, wrong: BLEU 0)
    zh = text_scores(["甲乙丙丁戊"], ["甲乙丙丁己"], "zh", ("bleu",))
    assert "tok:zh" in zh["signature"]["bleu"] and zh["bleu"] == pytest.approx(0.2 ** 0.25)


@pytest.fixture(scope="module")
def gen_run(tiny_mt5_dir, tmp_path_factory):
    """A tiny mT5 run trained on xnli_gen and evaluated on en, de and zh (chrF and BLEU)."""
    runs = tmp_path_factory.mktemp("gen") / "runs"
    out = invoke("train", "--task", "xnli_gen", "--backbone", tiny_mt5_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 4, "--eval-every", 2, "--prompt-length", 2, "--dtype", "fp32", "--run-name", "g")
    assert out.exit_code == 0, out.output
    out = invoke("eval", "--run", runs / "g", "--langs", "en,de,zh", "--data-dir", TEST_DATA, "--max-new-tokens", 8,
                 "--metrics", "chrf,bleu", "--json")
    assert out.exit_code == 0, out.output
    return runs / "g", json.loads(out.stdout)["results"]


def _written(run, lang):
    lines = (run / "predictions" / f"xnli_gen.dev.{lang}.tsv").read_text().splitlines()[1:]
    predictions = [line.split("\t", 1)[1] for line in lines]
    references = [json.loads(x)["hypothesis"] for x in (TEST_DATA / "xnli" / f"dev.{lang}.jsonl").read_text().splitlines()]
    return predictions, references


def test_generation_end_to_end_and_chrf_equals_sacrebleus(gen_run):
    from sacrebleu.metrics import BLEU, CHRF

    run, results = gen_run
    card = json.loads((run / "prompt" / "xprompt.json").read_text())
    assert card["verbalizer"] == "generate" and card["labels"] == []
    stored = json.loads((run / "metrics.json").read_text())["eval"]["xnli_gen"]["dev"]
    for lang in ("en", "de", "zh"):
        predictions, references = _written(run, lang)
        assert len(predictions) == len(references) and any(predictions)
        chrf_metric, bleu_metric = CHRF(), BLEU(tokenize="zh" if lang == "zh" else "13a")
        chrf = chrf_metric.corpus_score(predictions, [references])
        bleu = bleu_metric.corpus_score(predictions, [references])
        for figures in (results[lang], stored[lang]):  # what eval printed and what the run folder keeps
            assert figures["chrf"] * 100 == pytest.approx(chrf.score, abs=1e-9)
            assert figures["bleu"] * 100 == pytest.approx(bleu.score, abs=1e-9)
            assert figures["signature"] == {"chrf": str(chrf_metric.get_signature()),
                                            "bleu": str(bleu_metric.get_signature())}
    assert "tok:zh" in stored["zh"]["signature"]["bleu"] and "nc:6|nw:0" in stored["de"]["signature"]["chrf"]


def _near_references(model, encoded, tokenizer, *args, **kwargs):
    """A stand-in for what the model writes: each row's reference (its target ids, decoded), every
    other row short of its last word, so chrF and BLEU land well inside (0, 1)."""
    texts = tokenizer.batch_decode(list(encoded["target_ids"]), skip_special_tokens=True)
    return [" ".join(t.split()[:-1] if i % 2 else t.split()) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def written_run(gen_run, tmp_path_factory):
    """gen_run's prompt evaluated again in a runs folder of its own, the model's writing replaced by
    near-references: figures far from 0, so a score that dropped to 0 or drifted would show."""
    import shutil

    import xprompt.evaluation

    run = tmp_path_factory.mktemp("written") / "runs" / "g"
    shutil.copytree(gen_run[0], run)
    shutil.rmtree(run / "predictions")
    (run / "metrics.json").write_text(json.dumps({**json.loads((run / "metrics.json").read_text()), "eval": {}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xprompt.evaluation, "generate_texts", _near_references)
        out = invoke("eval", "--run", run, "--langs", "en,de,zh", "--data-dir", TEST_DATA, "--metrics", "chrf,bleu",
                     "--json")
    assert out.exit_code == 0, out.output
    return run, json.loads(out.stdout)["results"]


def test_stored_figures_are_sacrebleus_on_the_written_strings(written_run):
    from sacrebleu.metrics import BLEU, CHRF

    run, results = written_run
    stored = json.loads((run / "metrics.json").read_text())["eval"]["xnli_gen"]["dev"]
    for lang in ("en", "de", "zh"):
        predictions, references = _written(run, lang)
        chrf = CHRF().corpus_score(predictions, [references]).score / 100
        bleu = BLEU(tokenize="zh" if lang == "zh" else "13a").corpus_score(predictions, [references]).score / 100
        assert 0.3 < chrf < 0.999 and 0.1 < bleu < 0.999, (lang, chrf, bleu)  # real figures, not 0 against 0
        for figures in (results[lang], stored[lang]):
            assert figures["chrf"] == pytest.approx(chrf, abs=1e-12) and figures["bleu"] == pytest.approx(bleu, abs=1e-12)


def test_generation_scores_reach_the_index_and_the_report(written_run):
    from xprompt.registry import list_runs
    from xprompt.reports import leaderboard

    run, _ = written_run
    stored = json.loads((run / "metrics.json").read_text())["eval"]["xnli_gen"]["dev"]
    out = invoke("report", "--task", "xnli_gen", "--runs-dir", run.parent, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["rows"]
    assert len(rows) == 1 and rows[0]["metric"] == "chrf" and rows[0]["runs"] == ["g"]
    for lang in ("en", "de", "zh"):
        assert rows[0]["languages"][lang] == [stored[lang]["chrf"], 0.0]  # one seed: its figure, exactly
        assert rows[0]["signatures"][lang] == stored[lang]["signature"]["chrf"]
    targets = [stored[lang]["chrf"] for lang in ("de", "zh")]
    assert rows[0]["avg_target"][0] == pytest.approx(sum(targets) / 2) and rows[0]["ci95"] == {}
    # the table names chrF with its signature, and its cells are the run's chrF per language
    out = invoke("report", "--task", "xnli_gen", "--runs-dir", run.parent, "--format", "csv")
    assert out.exit_code == 0, out.output
    header, row = list(csv.reader(io.StringIO(out.stdout)))[:2]
    assert row[header.index("metric")] == f"chrF ({stored['en']['signature']['chrf']})"
    for lang in ("en", "de", "zh"):
        assert row[header.index(lang)] == f"{100 * stored[lang]['chrf']:.1f}"
    # BLEU is tokenised per language: each signature is named with the languages it scored
    bleu = leaderboard(list_runs(run.parent), "xnli_gen", metric="bleu")[0]
    assert {lang: bleu["languages"][lang][0] for lang in stored} == {lang: stored[lang]["bleu"] for lang in stored}
    assert f"{stored['zh']['signature']['bleu']}: zh" in bleu["metric_label"]
    assert f"{stored['de']['signature']['bleu']}: de, en" in bleu["metric_label"]
    # and the classification report of the same folder stays empty: no chrF among accuracies
    assert leaderboard(list_runs(run.parent), "xnli") == []


def test_an_encoder_only_backbone_refuses_a_generation_task(tiny_bert_dir, tmp_path):
    out = invoke("train", "--task", "xnli_gen", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA,
                 "--runs-dir", tmp_path / "runs", "--max-steps", 2)
    assert out.exit_code == 1 and "a generation task needs a seq2seq backbone" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "runs").exists()
