import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_DATA
from xprompt.config import TrainConfig
from xprompt.errors import XPromptError
from xprompt.training import train


def _cfg(**kw):
    base = dict(method="deep", prompt_length=3, max_steps=8, eval_every=3, batch_size=8, dtype="fp32", seed=5)
    return TrainConfig(**{**base, **kw})


def _prompt(run_dir):
    return load_file(str(run_dir / "prompt" / "prompt.safetensors"))


@pytest.mark.parametrize("stop_at", [2, 3, 7])
def test_interrupted_run_resumes_exactly(backbone, xnli, tmp_path, stop_at):
    whole = tmp_path / "whole"
    whole.mkdir()
    train(_cfg(), backbone, xnli, whole, [TEST_DATA])

    parts = tmp_path / "parts"
    parts.mkdir()

    def interrupt(step, total, loss, rate):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), backbone, xnli, parts, [TEST_DATA], on_step=interrupt)
    state = json.loads((parts / "checkpoint" / "state.json").read_text())
    assert state["step"] == stop_at and not (parts / "prompt").exists()
    summary = train(_cfg(), backbone, xnli, parts, [TEST_DATA])
    assert summary["steps"] == 8
    a, b = _prompt(whole), _prompt(parts)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (parts / "log.jsonl").read_text().splitlines()]
    assert {"step": stop_at, "resumed": True} in log


def test_same_seed_same_prompt_other_seed_differs(backbone, xnli, tmp_path):
    outs, summaries = [], []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        (tmp_path / name).mkdir()
        summaries.append(train(_cfg(max_steps=3, seed=seed), backbone, xnli, tmp_path / name, [TEST_DATA]))
        outs.append((tmp_path / name / "prompt" / "prompt.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    same = ("select_accuracy", "best_step", "train_rows")
    assert [summaries[0][k] for k in same] == [summaries[1][k] for k in same]
    logs = [[line for line in (tmp_path / n / "log.jsonl").read_text().splitlines() if "loss" not in line] for n in "ab"]
    assert logs[0] == logs[1]


def test_nan_loss_stops_with_the_step(backbone, xnli, tmp_path):
    with pytest.raises(XPromptError, match=r"loss became nan at step 1; lower --lr"):
        backbone.model.embeddings.LayerNorm.weight.data[:] = float("nan")
        train(_cfg(max_steps=2), backbone, xnli, tmp_path, [TEST_DATA])


def test_shots_train_and_selection_are_disjoint(backbone, xnli, tmp_path):
    summary = train(_cfg(shots=4, max_steps=2), backbone, xnli, tmp_path, [TEST_DATA])
    assert summary["train_rows"] == 12
    assert summary["data"] == "4 shots per class from en train; selection on 12 other en rows"
