import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_DATA
from xprompt.config import TrainConfig
from xprompt.errors import XPromptError
from xprompt.workflows.runs import train


def _cfg(**kw):
    base = dict(method="deep", prompt_length=3, max_steps=8, eval_every=3, batch_size=8, dtype="fp32", seed=5)
    return TrainConfig(**{**base, **kw})


def _prompt(run_dir):
    return load_file(str(run_dir / "prompt" / "prompt.safetensors"))


def _final_state(run_dir):
    """What an uninterrupted and a resumed run must share bit for bit: the saved prompt, the last
    checkpoint's trainable tensors, best tensors and AdamW moments, and the selection record."""
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    tensors = load_file(str(run_dir / "checkpoint" / state["tensors"]))
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train = json.loads((run_dir / "metrics.json").read_text())["train"]
    return {
        "prompt": _prompt(run_dir),
        "checkpoint": {k: v for k, v in tensors.items() if not k.startswith("rng.")},
        "record": {"selections": [(r["step"], r["select_accuracy"]) for r in log if "select_accuracy" in r],
                   "losses": [(r["step"], r["loss"], r["lr"]) for r in log if "loss" in r],
                   "best": (state["best_step"], state["best_accuracy"], train["best_step"], train["select_accuracy"]),
                   "step": state["step"]},
    }


def _assert_same_run(a, b):
    for part in ("prompt", "checkpoint"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name, (a[part][name] - b[part][name]).abs().max())
    assert a["record"] == b["record"]


@pytest.fixture(scope="module")
def uninterrupted(_backbone, xnli, tmp_path_factory):
    """The uninterrupted run of each method, once per module."""
    runs = {}

    def get(method):
        if method not in runs:
            run = tmp_path_factory.mktemp(f"whole-{method}")
            train(_cfg(method=method), copy.deepcopy(_backbone), xnli, run, [TEST_DATA])
            runs[method] = _final_state(run)
        return runs[method]

    return get


@pytest.mark.parametrize("method,stop_at", [("deep", 2), ("deep", 3), ("deep", 7), ("unified", 4)])
def test_interrupted_run_resumes_exactly(backbone, xnli, tmp_path, uninterrupted, method, stop_at):
    parts = tmp_path / "parts"
    parts.mkdir()

    def interrupt(step, total, loss, rate):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(method=method), backbone, xnli, parts, [TEST_DATA], on_step=interrupt)
    state = json.loads((parts / "checkpoint" / "state.json").read_text())
    assert state["step"] == stop_at and not (parts / "prompt").exists()
    summary = train(_cfg(method=method), copy.deepcopy(backbone), xnli, parts, [TEST_DATA])
    assert summary["steps"] == 8
    _assert_same_run(uninterrupted(method), _final_state(parts))
    log = [json.loads(line) for line in (parts / "log.jsonl").read_text().splitlines()]
    assert {"step": stop_at, "resumed": True} in log


class _Interrupter:
    """Interrupts the ``at``-th call of what it wraps (counted in this process): ``how`` is a signal
    sent to this process (``SIGINT``, ``SIGTERM``, ``SIGINT x2``) or ``raise`` (a KeyboardInterrupt
    raised there); ``after`` interrupts when the wrapped call has returned instead of before it."""

    def __init__(self, real, at, how, after=False):
        self.real, self.at, self.how, self.after, self.calls = real, at, how, after, 0

    def fire(self):
        if self.how == "raise":
            raise KeyboardInterrupt
        for _ in range(2 if self.how.endswith("x2") else 1):
            os.kill(os.getpid(), getattr(signal, self.how.split()[0]))

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at and not self.after:
            self.fire()
        out = self.real(*args, **kwargs)
        if self.calls == self.at and self.after:
            self.fire()
        return out


def _interrupted_then_resumed(backbone, xnli, run, method, monkeypatch, where, at, how, checkpoint_step, owed=False,
                              cfg=None, fit_dir=None):
    """One interrupted ``train`` (``where``: "loss", "optimizer" (between its step and the
    scheduler's) or "selection"), with SIGTERM handled as ``xprompt train`` handles it; then checks
    the checkpoint it left (in ``fit_dir``: the run's, or a self-training round's)."""
    import xprompt.training as training_module
    import xprompt.workflows.runs as runs_module

    with monkeypatch.context() as patch:
        if where == "loss":
            patch.setattr(training_module, "accumulate_gradients",
                          _Interrupter(training_module.accumulate_gradients, at, how))
        elif where == "optimizer":
            real = torch.optim.AdamW.step
            interrupter = _Interrupter(real, at, how, after=True)
            patch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: interrupter(self, *a, **k))
        else:
            patch.setattr(runs_module, "predict", _Interrupter(runs_module.predict, at, how))
        previous = signal.signal(signal.SIGTERM, runs_module._interrupt)  # as train_run does
        try:
            with pytest.raises(KeyboardInterrupt):
                train(cfg or _cfg(method=method), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
        finally:
            signal.signal(signal.SIGTERM, previous)
    state = json.loads(((fit_dir or run) / "checkpoint" / "state.json").read_text())
    assert (state["step"], state.get("selection_owed", False)) == (checkpoint_step, owed), (where, at, how)
    assert not (run / "prompt").exists()


@pytest.mark.parametrize("method", ["deep", "unified"])
def test_interrupted_during_steps_resumes_exactly(backbone, xnli, tmp_path, uninterrupted, monkeypatch, method):
    """Signals inside a step let it finish (its checkpoint is saved); a KeyboardInterrupt raised inside
    one, or a second signal, drops it (the checkpoint before it stands); every resume is exact."""
    run = tmp_path / "run"
    run.mkdir()
    args = (backbone, xnli, run, method, monkeypatch)
    _interrupted_then_resumed(*args, "loss", 2, "SIGINT", checkpoint_step=2)  # inside step 2: it finishes
    _interrupted_then_resumed(*args, "optimizer", 2, "SIGTERM", checkpoint_step=4)  # step 4, between optimizer and schedule
    _interrupted_then_resumed(*args, "loss", 1, "raise", checkpoint_step=4)  # step 5 dropped
    _interrupted_then_resumed(*args, "loss", 3, "SIGINT x2", checkpoint_step=6)  # step 7 dropped (6 selected, saved)
    train(_cfg(method=method), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    _assert_same_run(uninterrupted(method), _final_state(run))


@pytest.mark.parametrize("method", ["deep", "unified"])
def test_interrupted_during_selection_resumes_exactly(backbone, xnli, tmp_path, uninterrupted, monkeypatch, method):
    """A signal during a selection pass lets it finish; a KeyboardInterrupt raised inside one saves
    the step with its selection owed, and the resumed run selects it first: the same record."""
    run = tmp_path / "run"
    run.mkdir()
    args = (backbone, xnli, run, method, monkeypatch)
    _interrupted_then_resumed(*args, "selection", 2, "SIGTERM", checkpoint_step=3)  # the selection of step 3
    _interrupted_then_resumed(*args, "selection", 1, "raise", checkpoint_step=6, owed=True)  # the one of step 6
    train(_cfg(method=method), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    _assert_same_run(uninterrupted(method), _final_state(run))


def test_self_training_rounds_resume_exactly(backbone, xnli, tmp_path, monkeypatch):
    """Self-training rounds run ``fit`` too: a signal inside a round's step and a KeyboardInterrupt
    inside a round's selection pass resume to the uninterrupted run's prompt, round checkpoints and record."""
    cfg = _cfg(max_steps=3, unlabeled="zh", unlabeled_rows=12, self_train_rounds=2, self_train_steps=4,
               self_train_keep="last")
    whole, run = tmp_path / "whole", tmp_path / "run"
    whole.mkdir()
    run.mkdir()
    train(cfg, copy.deepcopy(backbone), xnli, whole, [TEST_DATA])
    args = (backbone, xnli, run, "deep", monkeypatch)
    # main loop: steps 1-3 (calls 1-3); round 1: the 5th call is its step 2, which finishes
    _interrupted_then_resumed(*args, "loss", 5, "SIGINT", checkpoint_step=2, cfg=cfg, fit_dir=run / "selftrain-1")
    # round 1 selects at its steps 3 and 4, round 2 at 0 and 3: inside that one
    _interrupted_then_resumed(*args, "selection", 4, "raise", checkpoint_step=3, owed=True, cfg=cfg,
                              fit_dir=run / "selftrain-2")
    summary = train(cfg, copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    assert summary["self_training"] == json.loads((whole / "metrics.json").read_text())["train"]["self_training"]
    _assert_same_run(_final_state(whole), _final_state(run))
    for round_ in ("selftrain-1", "selftrain-2"):
        a, b = (json.loads((r / round_ / "checkpoint" / "state.json").read_text()) for r in (whole, run))
        assert (a["step"], a["best_step"], a["best_accuracy"]) == (b["step"], b["best_step"], b["best_accuracy"])
        ta, tb = (load_file(str(r / round_ / "checkpoint" / m["tensors"])) for r, m in ((whole, a), (run, b)))
        for name in ta:
            assert name.startswith("rng.") or torch.equal(ta[name], tb[name]), (round_, name)


def test_checkpoint_keeps_the_random_generators():
    import random

    import numpy as np

    from xprompt.checkpoints import rng_state, set_rng_state

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    tensors, meta = rng_state()
    meta = json.loads(json.dumps(meta))  # as state.json holds it
    drawn = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state({k[len("rng."):]: v for k, v in tensors.items()}, meta)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]


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


def test_init_from_weighted_average_of_runs(backbone, xnli, tmp_path):
    from xprompt.tasks import load_task

    runs = []
    for seed in (5, 6):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        train(_cfg(max_steps=2, seed=seed), backbone, xnli, run, [TEST_DATA])
        runs.append(run)
    a, b = _prompt(runs[0]), _prompt(runs[1])
    # zero steps of training are not allowed, so read the start through a 1-step run at a tiny lr
    start = tmp_path / "avg"
    start.mkdir()
    summary = train(_cfg(max_steps=1, eval_every=1, lr=1e-12, init_from=f"{runs[0]},{runs[1]}", init_weights=[3.0, 1.0]),
                    backbone, xnli, start, [TEST_DATA])
    got = _prompt(start)
    for key in ("prompt_embeddings", "layer_prompts", "verbalizer.weight"):
        torch.testing.assert_close(got[key], 0.75 * a[key] + 0.25 * b[key], atol=1e-6, rtol=1e-5)
    assert "weighted average" in summary["init"] and "(0.75)" in summary["init"]

    # another task's prompt: the prompt transfers, the label vectors come from the new task's class means
    pawsx = load_task("pawsx")
    cross = tmp_path / "cross"
    cross.mkdir()
    summary = train(_cfg(max_steps=1, eval_every=1, lr=1e-12, init_from=str(runs[0])), backbone, pawsx, cross, [TEST_DATA])
    torch.testing.assert_close(_prompt(cross)["prompt_embeddings"], a["prompt_embeddings"], atol=1e-6, rtol=1e-5)
    assert _prompt(cross)["verbalizer.weight"].shape == (2, a["verbalizer.weight"].shape[1])
    assert "class means" in summary["init"]

    with pytest.raises(XPromptError, match="2 values for 1"):
        train(_cfg(max_steps=1, init_from=str(runs[0]), init_weights=[1.0, 2.0]), backbone, xnli, tmp_path / "bad", [TEST_DATA])


def test_init_from_library_ranks_by_zero_shot_score(backbone, xnli, tmp_path, monkeypatch):
    import xprompt.transfer as library_module

    library = tmp_path / "lib"
    for name, seed in (("a", 5), ("b", 6), ("c", 7)):
        (library / name).mkdir(parents=True)
        train(_cfg(max_steps=2, seed=seed), backbone, xnli, library / name, [TEST_DATA])
    # a run of another prompt length is left out of the ranking (another shape)
    (library / "short").mkdir()
    train(_cfg(max_steps=2, prompt_length=2), backbone, xnli, library / "short", [TEST_DATA])

    seen = {}
    real = library_module.zero_shot_scores

    def spy(model, candidates, *args):
        scores = real(model, candidates, *args)
        seen.setdefault("all", dict(zip((c.run.name for c in candidates), scores)))
        return scores

    monkeypatch.setattr(library_module, "zero_shot_scores", spy)
    run = tmp_path / "runs" / "new"
    run.mkdir(parents=True)
    summary = train(_cfg(max_steps=1, eval_every=1, lr=1e-12, init_from="library", library=str(library), top_k=2,
                         transfer="average", same_task=True), backbone, xnli, run, [TEST_DATA])
    assert sorted(seen["all"]) == ["a", "b", "c"]
    choice = json.loads((run / "library_init.json").read_text())
    ranked = sorted(seen["all"].items(), key=lambda item: -item[1])
    assert [Path(x).name for x in choice["sources"]] == [name for name, _ in ranked[:2]]
    assert choice["scores"] == [score for _, score in ranked[:2]] and choice["transfer"] == "average"
    # the start is the score-weighted average of the top two
    w = torch.tensor(choice["scores"], dtype=torch.float64)
    w = (w / w.sum()).tolist()
    first, second = (_prompt(Path(x)) for x in choice["sources"])
    torch.testing.assert_close(_prompt(run)["prompt_embeddings"],
                               (w[0] * first["prompt_embeddings"].double() + w[1] * second["prompt_embeddings"].double()).float(),
                               atol=1e-6, rtol=1e-5)
    assert summary["init"].startswith("library (average of top 2 of 3 by zero-shot")

    # without same_task the run's own task is left out: an all-XNLI library has nothing to give
    with pytest.raises(XPromptError, match="no prompt of another task under"):
        alone = tmp_path / "runs" / "alone"
        alone.mkdir()
        train(_cfg(max_steps=1, init_from="library", library=str(library)), backbone, xnli, alone, [TEST_DATA])
    with pytest.raises(XPromptError, match="no prompt under"):
        empty = tmp_path / "empty" / "r"
        empty.mkdir(parents=True)
        train(_cfg(max_steps=1, init_from="library", same_task=True), backbone, xnli, empty, [TEST_DATA])


def test_checkpoint_averaging_saves_the_mean_of_the_last_selection_points(backbone, xnli, tmp_path, uninterrupted):
    """--average-checkpoints 2: training is the same run (the last checkpoint's trainable tensors equal
    the plain run's), the saved prompt is the element-wise mean of the tensors kept at the last two
    selection points (steps 6 and 8), and both held-out accuracies are recorded."""
    run = tmp_path / "avg"
    summary = train(_cfg(average_checkpoints=2), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    tensors = load_file(str(run / "checkpoint" / state["tensors"]))
    assert state["recent_steps"] == [6, 8]
    plain = uninterrupted("deep")["checkpoint"]
    for name, value in plain.items():
        if name.startswith("model."):
            assert torch.equal(tensors[name], value), name  # averaging never touches training
    prompt = _prompt(run)
    for name, value in prompt.items():
        mean = (tensors[f"recent.0.{name}"] + tensors[f"recent.1.{name}"]) / 2
        assert torch.allclose(value, mean, atol=1e-6), name
    assert not torch.equal(tensors["recent.0.layer_prompts"], tensors["recent.1.layer_prompts"])
    average = summary["checkpoint_average"]
    assert average["steps"] == [6, 8] and 0 <= average["select_accuracy"] <= 1
    assert summary["select_accuracy"] == average["select_accuracy"] and summary["best_step"] == 8
    assert average["best_single"]["select_accuracy"] == round(uninterrupted("deep")["record"]["best"][1], 4)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("average_of_steps") == [6, 8] for r in log)


def test_checkpoint_average_scored_beside_an_unchanged_run(backbone, xnli, uninterrupted, tmp_path):
    """--average-keep best scores the mean of the last selection points on the held-out rows and
    records it, but saves exactly the prompt of a run without averaging (a measurement, not a change);
    every step record carries the collapse diagnostics (gradient, prompt and label-vector norms)."""
    run = tmp_path / "avg-best"
    summary = train(_cfg(average_checkpoints=2, average_keep="best"), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    plain = uninterrupted("deep")
    for name, value in plain["prompt"].items():
        assert torch.equal(_prompt(run)[name], value), name
    average = summary["checkpoint_average"]
    assert average["kept"] == "best" and average["steps"] == [6, 8]
    assert summary["select_accuracy"] == round(plain["record"]["best"][1], 4)
    assert average["best_single"]["select_accuracy"] == summary["select_accuracy"]
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and all(r["grad_norm"] > 0 and r["grad_norm_max"] >= r["grad_norm"] for r in steps)
    assert all(r["prompt_norm"] > 0 and r["label_norm"] > 0 for r in steps)
    # every selection pass records its per-row correctness (for cross-fitted comparisons of selection rules)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    passes = [(r["select_accuracy"], r["select_rows"]) for r in log if "select_accuracy" in r]
    passes.append(next((r["select_accuracy_average"], r["select_rows_average"]) for r in log if "average_of_steps" in r))
    assert len(passes) >= 3 and all(len(rows) == summary["select_rows"] and set(rows) <= {"0", "1"} for _, rows in passes)
    assert all(acc == pytest.approx(rows.count("1") / len(rows)) for acc, rows in passes)


def test_the_average_of_a_finished_run_is_what_average_keep_would_have_kept(backbone, xnli, tmp_path):
    """scripts/average_of_run.py on a run trained with --average-keep best writes a run folder whose prompt
    equals, bit for bit, the prompt of the same run trained with --average-keep average; a run without kept
    points, or an existing output folder, is a one-line error."""
    import importlib.util
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "average_of_run.py"
    spec = importlib.util.spec_from_file_location("average_of_run", script)
    average_of_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(average_of_run)
    best, kept = tmp_path / "best", tmp_path / "average"
    train(_cfg(average_checkpoints=2, average_keep="best"), copy.deepcopy(backbone), xnli, best, [TEST_DATA])
    train(_cfg(average_checkpoints=2), copy.deepcopy(backbone), xnli, kept, [TEST_DATA])
    metrics = json.loads((best / "metrics.json").read_text())  # the best checkpoint scored: not the average's score
    (best / "metrics.json").write_text(json.dumps({**metrics, "eval": {"xnli": {"dev": {"en": {"accuracy": 0.5}}}}}))
    (best / "predictions").mkdir()
    out = tmp_path / "copies" / "best"
    average_of_run.main([str(best), str(out)])
    assert "eval" not in json.loads((out / "metrics.json").read_text()) and not (out / "predictions").exists()
    made, wanted = _prompt(out), _prompt(kept)
    assert sorted(made) == sorted(wanted) and all(torch.equal(made[k], wanted[k]) for k in wanted)
    assert any(not torch.equal(made[k], _prompt(best)[k]) for k in wanted)  # not the best checkpoint
    card = json.loads((out / "prompt" / "xprompt.json").read_text())
    assert card["checkpoint_average"]["steps"] == [6, 8] and not (out / "checkpoint").exists()
    again = subprocess.run([sys.executable, str(script), str(best), str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists; choose a new folder" in again.stderr and "Traceback" not in again.stderr
    plain = tmp_path / "plain"
    train(_cfg(average_checkpoints=0, max_steps=2, eval_every=2), copy.deepcopy(backbone), xnli, plain, [TEST_DATA])
    bare = subprocess.run([sys.executable, str(script), str(plain), str(tmp_path / "x")], capture_output=True, text=True)
    assert bare.returncode != 0 and "no selection points kept" in bare.stderr and "Traceback" not in bare.stderr


def test_gradient_clipping_acts_only_above_its_norm(backbone, xnli, uninterrupted, tmp_path):
    """--max-grad-norm above every gradient's norm leaves the run bit-identical to no clipping; one below
    the norms changes the prompt, and the log still records the norms as they were before clipping."""
    from xprompt.training import clipped

    high = tmp_path / "clip-high"
    train(_cfg(max_grad_norm=1e6), copy.deepcopy(backbone), xnli, high, [TEST_DATA])
    for name, value in uninterrupted("deep")["prompt"].items():
        assert torch.equal(_prompt(high)[name], value), name
    low = tmp_path / "clip-low"
    train(_cfg(max_grad_norm=1e-4), copy.deepcopy(backbone), xnli, low, [TEST_DATA])
    assert any(not torch.equal(_prompt(low)[n], v) for n, v in uninterrupted("deep")["prompt"].items())
    steps = [json.loads(line) for line in (low / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(r["grad_norm"] > 1e-4 for r in steps)  # the norm before clipping
    weights = torch.nn.Parameter(torch.ones(4))
    weights.grad = torch.full((4,), 3.0)
    assert clipped([weights], 2.0) == pytest.approx(6.0) and float(weights.grad.norm()) == pytest.approx(2.0, rel=1e-5)


def test_checkpoint_averaging_resumes_exactly(backbone, xnli, tmp_path):
    """Interrupted after the selection of step 6, the resumed run keeps the tensors of step 6 for the
    average: the same saved prompt as an uninterrupted averaging run."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(_cfg(average_checkpoints=2, eval_every=2), copy.deepcopy(backbone), xnli, whole, [TEST_DATA])

    def interrupt(step, total, loss, rate):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(average_checkpoints=2, eval_every=2), copy.deepcopy(backbone), xnli, parts, [TEST_DATA],
              on_step=interrupt)
    assert json.loads((parts / "checkpoint" / "state.json").read_text())["recent_steps"] == [4, 6]
    train(_cfg(average_checkpoints=2, eval_every=2), copy.deepcopy(backbone), xnli, parts, [TEST_DATA])
    a, b = _prompt(whole), _prompt(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forced_net(monkeypatch):
    """Every held-out accuracy counts as the majority-class level: the safety net fires whenever it looks."""
    import xprompt.workflows.runs as runs_module

    monkeypatch.setattr(runs_module, "majority_share", lambda rows: 0.99)


def test_the_safety_net_restarts_a_run_at_a_third_of_the_rate(backbone, xnli, tmp_path, monkeypatch):
    """At the first selection past a quarter of the steps (step 3 of 8), a run at the majority-class level
    restarts from its start with a fresh optimizer at a third of the rate, at most twice; each restart is
    recorded (metrics.json, the log, the failed attempt's log kept), and the final prompt is the prompt of
    a run trained from the start at a ninth of the rate."""
    _forced_net(monkeypatch)
    run = tmp_path / "net"
    summary = train(_cfg(lr=0.09), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    restarts = summary["restarts"]
    assert [(r["step"], r["lr"], r["new_lr"]) for r in restarts] == [(3, 0.09, pytest.approx(0.03)),
                                                                      (3, pytest.approx(0.03), pytest.approx(0.01))]
    assert all("majority class" in r["why"] for r in restarts)
    assert (run / "log.restart-1.jsonl").is_file() and (run / "log.restart-2.jsonl").is_file()
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert first["restart"]["new_lr"] == pytest.approx(0.01)
    plain = tmp_path / "plain"
    train(_cfg(lr=0.09 / 9, restart_check=0), copy.deepcopy(backbone), xnli, plain, [TEST_DATA])
    a, b = _prompt(run), _prompt(plain)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_restarted_run_resumes_exactly(backbone, xnli, tmp_path, monkeypatch):
    _forced_net(monkeypatch)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(_cfg(lr=0.09), copy.deepcopy(backbone), xnli, whole, [TEST_DATA])
    calls = {"n": 0}

    def interrupt(step, total, loss, rate):  # the second attempt's step 1 (steps 1, 2, restart at 3's selection, 1)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(lr=0.09), copy.deepcopy(backbone), xnli, parts, [TEST_DATA], on_step=interrupt)
    state = json.loads((parts / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and len(state["restarts"]) == 1 and state["lr"] == pytest.approx(0.03)
    summary = train(_cfg(lr=0.09), copy.deepcopy(backbone), xnli, parts, [TEST_DATA])
    assert len(summary["restarts"]) == 2
    a, b = _prompt(whole), _prompt(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _scripted_selection(monkeypatch, accuracies: dict, majority: float = 0.34):
    """Held-out accuracies by selection step (the real pass still runs, its value is replaced), majority 0.34."""
    import xprompt.workflows.runs as runs_module

    monkeypatch.setattr(runs_module, "majority_share", lambda rows: majority)
    real_fit = runs_module.fit

    def fit(model, train_rows, select_accuracy, cfg, run_dir, *args, **kwargs):
        state = Path(run_dir) / "checkpoint" / "state.json"  # a resumed run has made its earlier selections
        passes = [1] * (json.loads(state.read_text())["step"] // cfg.eval_every + 1 if state.is_file() else 0)

        def scripted() -> float:
            select_accuracy()
            passes.append(1)
            return accuracies[(len(passes) - 1) * cfg.eval_every]

        return real_fit(model, train_rows, scripted, cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(runs_module, "fit", fit)


def test_a_collapse_after_learning_rolls_back_to_the_best_tensors(backbone, xnli, tmp_path, monkeypatch):
    """Held-out 0.60 at step 2, then 0.33 (the majority class is 0.34) at step 4: the run goes back to step 2's
    tensors, clears the optimizer's moments, goes on at a third of the rate, and says so; a run interrupted
    after the roll-back resumes it exactly. A run that never falls back is untouched (no record)."""
    _scripted_selection(monkeypatch, {0: 0.30, 2: 0.60, 4: 0.33, 6: 0.50, 8: 0.65})
    seen = {}

    def watch(step, total, loss, rate):
        if step in (2, 4):  # after that step's selection (and roll-back)
            seen[step] = {k: v.clone() for k, v in model_ref["model"].prompt.tensors().items()}

    import xprompt.workflows.runs as runs_module

    model_ref = {}
    real_fit = runs_module.fit
    monkeypatch.setattr(runs_module, "fit", lambda model, *a, **k: model_ref.update(model=model) or real_fit(model, *a, **k))
    whole = tmp_path / "whole"
    summary = train(_cfg(eval_every=2, lr=0.09), copy.deepcopy(backbone), xnli, whole, [TEST_DATA], on_step=watch)
    (record,) = summary["restarts"]
    assert (record["step"], record["rolled_back_to"], record["lr"]) == (4, 2, 0.09)
    assert record["new_lr"] == pytest.approx(0.03) and "fell back" in record["why"]
    assert all(torch.equal(seen[2][k], seen[4][k]) for k in seen[2])  # step 4 ends with step 2's tensors
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [r["rollback"]["rolled_back_to"] for r in log if "rollback" in r] == [2]
    assert summary["best_step"] == 8
    state = json.loads((whole / "checkpoint" / "state.json").read_text())
    assert state["lr"] == pytest.approx(0.03) and len(state["restarts"]) == 1
    full_rates = [group.get("lr", 0.09) for group in model_ref["model"].param_groups(0.09)]
    assert state["scheduler"]["base_lrs"] == pytest.approx([rate / 3 for rate in full_rates])  # the rest of the schedule

    parts = tmp_path / "parts"

    def interrupt(step, total, loss, rate):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(eval_every=2, lr=0.09), copy.deepcopy(backbone), xnli, parts, [TEST_DATA], on_step=interrupt)
    train(_cfg(eval_every=2, lr=0.09), copy.deepcopy(backbone), xnli, parts, [TEST_DATA])
    a, b = _prompt(whole), _prompt(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_stays_above_the_majority_class_is_not_rolled_back(backbone, xnli, tmp_path, monkeypatch):
    """The same run with held-out 0.37 at step 4 (just above 0.34 + 0.02): no roll-back, and its prompt is the
    prompt of a run without the safety net."""
    _scripted_selection(monkeypatch, {0: 0.30, 2: 0.60, 4: 0.37, 6: 0.50, 8: 0.65})
    run, plain = tmp_path / "net", tmp_path / "plain"
    summary = train(_cfg(eval_every=2, lr=0.09), copy.deepcopy(backbone), xnli, run, [TEST_DATA])
    assert "restarts" not in summary or not summary["restarts"]
    train(_cfg(eval_every=2, lr=0.09, restart_check=0), copy.deepcopy(backbone), xnli, plain, [TEST_DATA])
    a, b = _prompt(run), _prompt(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_whose_best_is_its_start_restarts_rather_than_rolls_back(backbone, xnli, tmp_path, monkeypatch):
    """Held-out 0.45 at step 0 (the class-mean start is above the majority class) and 0.33 at step 2, the check:
    training never lifted it, so the run restarts from its start (not a roll-back to step 0's tensors)."""
    _scripted_selection(monkeypatch, {0: 0.45, 2: 0.33, 4: 0.50, 6: 0.50, 8: 0.50})
    summary = train(_cfg(eval_every=2, lr=0.09, max_steps=4), copy.deepcopy(backbone), xnli, tmp_path / "r", [TEST_DATA])
    assert [("rolled_back_to" in r, r["step"]) for r in summary["restarts"]] == [(False, 2)]


def test_a_finished_run_leaves_no_model_for_the_cycle_collector(backbone, xnli, tmp_path):
    """train() frees its model by reference counting alone: nothing (the selection scorer's per-row record
    included) ties the model into a reference cycle, so a process that trains many runs (a test worker, a
    sweep in one process) does not keep every run's model until the cycle collector happens to run."""
    import gc

    from xprompt.model import PromptModel

    gc.collect()
    gc.disable()
    try:  # models other tests of this worker still hold (fixtures) are not this run's
        before = {id(o) for o in gc.get_objects() if isinstance(o, PromptModel)}
        train(_cfg(), copy.deepcopy(backbone), xnli, tmp_path / "run", [TEST_DATA])
        alive = [o for o in gc.get_objects() if isinstance(o, PromptModel) and id(o) not in before]
    finally:
        gc.enable()
    assert alive == []
