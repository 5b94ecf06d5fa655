"""Accuracy tests that can fail: on each backbone kind, a tiny model learns a synthetic task that its
verbalizer can separate (a cue word decides the label), to a stated accuracy on held-out rows; the
same run with a broken verbalizer (label scores in the wrong order at evaluation) does not."""

import json
import random

import numpy as np
import pytest
import torch
import yaml

from xprompt.backbones import load_backbone
from xprompt.config import TrainConfig
from xprompt.data import encode, load_split
from xprompt.evaluation import predict
from xprompt.model import load_run_model
from xprompt.tasks import load_task
from xprompt.workflows.runs import train

FILLERS = ["the", "house", "river", "city", "music", "water", "people", "time", "world", "day", "book", "road"]
CUES = {"a": "good", "b": "bad"}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "a" if i % 2 == 0 else "b"
        words = rng.sample(FILLERS, 3)
        words.insert(rng.randrange(4), CUES[label])
        rows.append({"id": f"{seed}-{i}", "text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A two-class task whose label is the cue word in the text; the label words are the cues."""
    root = tmp_path_factory.mktemp("synthetic")
    card = {"name": "cue", "version": 1, "fields": ["text"], "labels": ["a", "b"], "source_language": "en",
            "template": "{text} . <mask>",
            "splits": {"train": {"file": "cue/train.{lang}.jsonl"}, "dev": {"file": "cue/dev.{lang}.jsonl"}},
            "languages": {"en": {"template": "{text} . <mask>", "label_words": CUES}}}
    (root / "tasks").mkdir()
    (root / "tasks" / "cue.yaml").write_text(yaml.safe_dump(card))
    (root / "data" / "cue").mkdir(parents=True)
    for split, n, seed in (("train", 160, 0), ("dev", 100, 1)):
        lines = [json.dumps(r) for r in _rows(n, seed)]
        (root / "data" / "cue" / f"{split}.en.jsonl").write_text("\n".join(lines) + "\n")
    return load_task("cue", root / "tasks"), root / "data"


@pytest.fixture(scope="module")
def wide_xlmr_mlm_dir(tmp_path_factory, xlmr_spm):
    """The tiny XLM-R masked LM (hub layout), initialised with a wider spread: with the default 0.02
    its random LM head gives every input the same label-word scores (to 1e-4), so no prompt could
    move them; at 0.3 the scores depend on the input, as a pretrained head's do."""
    from hub_layout import save_xlmr
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    torch.manual_seed(2)
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=37, max_position_embeddings=160, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, initializer_range=0.3)
    config.architectures = ["XLMRobertaForMaskedLM"]
    return save_xlmr(XLMRobertaForMaskedLM(config), tmp_path_factory.mktemp("wide_xlmr"), xlmr_spm)


CASES = {  # backbone fixture, verbalizer (what separates the classes), method, lr, steps
    "encoder-label-vectors": ("tiny_bert_dir", "centered", "deep", 0.1, 40),
    "masked-lm-label-words": ("wide_xlmr_mlm_dir", "hard", "deep", 0.1, 120),
    "seq2seq-label-words": ("tiny_mt5_dir", "hard", "deep", 0.1, 60),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_separable_task_is_learned_and_a_broken_verbalizer_is_caught(case, synthetic, request, tmp_path, monkeypatch):
    fixture, verbalizer, method, lr, steps = CASES[case]
    task, data = synthetic
    bb = load_backbone(str(request.getfixturevalue(fixture)), tmp_path / "cache")
    cfg = TrainConfig(task="cue", method=method, verbalizer=verbalizer, prompt_length=4, max_steps=steps,
                      eval_every=steps, batch_size=16, lr=lr, dtype="fp32", select_size=32, seed=3)
    (tmp_path / "run").mkdir()
    torch.manual_seed(0)
    train(cfg, bb, task, tmp_path / "run", [data])
    model, card = load_run_model(tmp_path / "run", bb)
    rows = load_split(task, "en", "dev", [data])
    encoded = encode(rows, task.template_for("en", card["template_style"]), bb.tokenizer)
    labels = np.asarray(rows["label"])
    model.verbalizer.use_language("en")
    accuracy = float((predict(model, encoded, 32, bb.tokenizer.pad_token_id) == labels).mean())
    assert accuracy >= 0.9, f"{case}: {accuracy:.2f} on 100 held-out rows"

    # the same prompt read by a broken verbalizer (its label scores in the wrong order): caught
    real = type(model.verbalizer).forward
    monkeypatch.setattr(type(model.verbalizer), "forward", lambda self, *a: real(self, *a).flip(-1))
    broken = float((predict(model, encoded, 32, bb.tokenizer.pad_token_id) == labels).mean())
    assert broken <= 0.2, f"{case}: a broken verbalizer still scored {broken:.2f}"
