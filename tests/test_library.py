"""The prompt library: mixture sampling, similarity ranking through a probe, mixture transfer,
zero-shot task transfer, and the show/remove commands."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_DATA
from safetensors.torch import load_file

from xprompt.config import TrainConfig
from xprompt.transfer import mixture_schedule
from xprompt.tasks import load_task
from xprompt.workflows.runs import train


def _cfg(**kw):
    base = dict(method="deep", prompt_length=3, max_steps=2, eval_every=1, batch_size=8, dtype="fp32", seed=5)
    return TrainConfig(**{**base, **kw})


def _prompt(run_dir):
    return load_file(str(Path(run_dir) / "prompt" / "prompt.safetensors"))


@pytest.fixture
def library(backbone, xnli, tmp_path):
    """Two XNLI prompts (other seeds) and one PAWS-X prompt."""
    lib = tmp_path / "lib"
    for name, task, seed in (("x5", xnli, 5), ("x6", xnli, 6), ("p5", load_task("pawsx"), 5)):
        (lib / name).mkdir(parents=True)
        train(_cfg(seed=seed), backbone, task, lib / name, [TEST_DATA])
    return lib


def test_mixture_schedule_is_examples_proportional_with_a_cap():
    steps = mixture_schedule([100, 300, 50_000], 40_000, seed=0, cap=10_000)
    share = np.bincount(steps, minlength=3) / len(steps)
    np.testing.assert_allclose(share, [100 / 10_400, 300 / 10_400, 10_000 / 10_400], atol=0.005)
    assert steps[:50] == mixture_schedule([100, 300, 50_000], 40_000, seed=0, cap=10_000)[:50]  # seeded
    uncapped = np.bincount(mixture_schedule([1, 3], 20_000, seed=1), minlength=2) / 20_000
    np.testing.assert_allclose(uncapped, [0.25, 0.75], atol=0.01)
    with pytest.raises(Exception, match="needs training rows"):
        mixture_schedule([5, 0], 10, seed=0)


def test_rank_by_similarity_to_a_probe(backbone, library, tmp_path, monkeypatch):
    import xprompt.transfer as lib_module
    from xprompt.similarity import flat_cosine

    probes = []
    real_probe = lib_module.probe_prompt

    def spy(*args, **kwargs):
        probes.append(real_probe(*args, **kwargs))
        return probes[-1]

    monkeypatch.setattr(lib_module, "probe_prompt", spy)
    run = tmp_path / "runs" / "new"
    run.mkdir(parents=True)
    pawsx = load_task("pawsx")
    summary = train(_cfg(max_steps=1, lr=1e-12, init_from="library", library=str(library), rank_by="flat",
                         top_k=2, probe_steps=3), backbone, pawsx, run, [TEST_DATA])
    choice = json.loads((run / "library_init.json").read_text())
    # the PAWS-X prompt is the run's own task: left out; the two XNLI prompts ranked by flat cosine
    assert sorted(Path(s).name for s in choice["sources"]) == ["x5", "x6"] and choice["candidates"] == 2
    expected = [flat_cosine(probes[0], _prompt(s)) for s in choice["sources"]]
    assert choice["scores"] == pytest.approx(expected) and expected == sorted(expected, reverse=True)
    # best: the kept prompt with the higher zero-shot trial accuracy
    best = choice["sources"][int(np.argmax(choice["zero_shot"]))]
    torch.testing.assert_close(_prompt(run)["prompt_embeddings"], _prompt(best)["prompt_embeddings"], atol=1e-6, rtol=1e-5)
    assert "by flat" in summary["init"]
    # the probe trained (it moved away from the fresh start), and the run's label vectors are PAWS-X's 2
    assert _prompt(run)["verbalizer.weight"].shape[0] == 2


def test_mixture_transfer_trains_on_the_sources_and_resumes_without_mixing_again(backbone, library, tmp_path, monkeypatch):
    import xprompt.transfer as lib_module

    run = tmp_path / "runs" / "mix"
    run.mkdir(parents=True)
    pawsx = load_task("pawsx")
    cfg = _cfg(max_steps=1, lr=1e-12, init_from="library", library=str(library), transfer="mixture", top_k=2,
               mixture_steps=4)
    summary = train(cfg, backbone, pawsx, run, [TEST_DATA])
    choice = json.loads((run / "library_init.json").read_text())
    assert choice["mixture"] == ["xnli/en", "xnli/en"] and sum(choice["mixture_steps_per_source"]) == 4
    mixed = load_file(str(run / "library_mixture.safetensors"))
    got = _prompt(run)
    torch.testing.assert_close(got["prompt_embeddings"], mixed["prompt_embeddings"], atol=1e-6, rtol=1e-5)
    assert "on the mixture" in summary["init"]

    # at a real learning rate the mixture moves the prompt away from the sources' average it
    # starts at, and leaves the model as it was
    from xprompt.model import build_model
    from xprompt.library import Candidate
    from xprompt.transfer import train_mixture
    from xprompt.store import load_prompt

    model = build_model(backbone, 2, "deep", 3, "mask")
    before = {k: v.clone() for k, v in model.prompt.tensors().items()}
    sources = [Candidate(Path(s), *load_prompt(Path(s))) for s in choice["sources"]]
    moved, info = train_mixture(model, backbone, _cfg(lr=3e-2), pawsx, sources, [1.0, 1.0], 3, [TEST_DATA],
                                None, None, torch.device("cpu"))
    start = 0.5 * sources[0].tensors["prompt_embeddings"] + 0.5 * sources[1].tensors["prompt_embeddings"]
    assert not torch.allclose(moved["prompt_embeddings"], start, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.prompt.tensors().items())
    assert sum(info["mixture_steps_per_source"]) == 3

    # a rerun of the same run (as --resume does) reuses the stored choice and mixture
    def refuse(*args, **kwargs):
        raise AssertionError("mixed again")

    monkeypatch.setattr(lib_module, "train_mixture", refuse)
    (run / "prompt" / "prompt.safetensors").unlink()
    again = train(cfg, backbone, pawsx, run, [TEST_DATA])
    assert again["init"] == summary["init"]


def test_library_transfer_scores_equal_eval_and_show_remove(tiny_bert_dir, tmp_path):
    from test_cli import invoke

    runs = tmp_path / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
              "--prompt-length", "3", "--dtype", "fp32"]
    assert invoke("train", *common, "--run-name", "x").exit_code == 0
    assert invoke("train", *common, "--run-name", "p", "--task", "pawsx").exit_code == 0
    out = invoke("library", "transfer", "--task", "xnli", "--lang", "de", "--limit", "20", "--backbone", tiny_bert_dir,
                 "--runs-dir", runs, "--data-dir", TEST_DATA, "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    by_run = {r["run"]: r for r in result["transfer"]}
    assert set(by_run) == {"x", "p"} and result["n"] == 20
    assert by_run["x"]["label_vectors"] == "own" and by_run["p"]["label_vectors"] == "class means"
    # the XNLI prompt keeps its own label vectors, so its score is exactly what eval measures
    ev = invoke("eval", "--run", runs / "x", "--langs", "de", "--limit", "20", "--data-dir", TEST_DATA,
                "--backbone", tiny_bert_dir, "--dtype", "fp32")
    assert ev.exit_code == 0, ev.output
    measured = json.loads((runs / "x" / "metrics.json").read_text())["eval"]["xnli"]["dev"]["de"]["accuracy"]
    assert by_run["x"]["accuracy"] == pytest.approx(measured)
    assert 0.0 <= by_run["p"]["accuracy"] <= 1.0

    shown = invoke("library", "show", runs / "p")
    assert shown.exit_code == 0
    card = json.loads(shown.stdout)
    assert card["task"] == "pawsx" and card["tensors"]["verbalizer.weight"] == [2, 32]

    assert invoke("library", "remove", runs / "nothing").exit_code == 1
    gone = invoke("library", "remove", runs / "p", "--yes")
    assert gone.exit_code == 0, gone.output
    assert not (runs / "p").exists() and not list(runs.glob(".removing-*"))
    listed = invoke("runs", "--runs-dir", runs)
    assert " p " not in listed.output and "x" in listed.output
