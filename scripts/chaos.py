"""Kill-and-resume chaos test: interrupt `xprompt train` at random points with SIGKILL, SIGTERM,
SIGINT and a double SIGINT, resume it (the same command again), and check that the *final* state
equals an uninterrupted run's bit for bit: the saved prompt, the last checkpoint's tensors (trainable
tensors, best tensors, AdamW moments, generator states) and the selection record (best step and
accuracy, every ``select_accuracy`` line of the log).

Each kill is a random point of a run, hit with every signal in turn (a table of kills x signals):

- ``step N``: inside step N, before its forward pass (the signal is sent from inside the loss);
- ``optimizer N``: inside step N, between ``optimizer.step()`` and ``scheduler.step()``;
- ``selection N``: inside the selection pass of step N;
- ``timed T``: from outside, T seconds after the run's first log line (wherever the run then is).

The first three are sent by the training process to itself at that very point (a child started by
this script, which wraps the loop's functions and then runs the ordinary CLI), so they land where
they say; the resumed run is the plain CLI. It runs on a tiny random BERT (the embedded tokenizer's
vocabulary) and the test data, so each training takes seconds on 2 CPU cores:

    python scripts/chaos.py --kills 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 40, 5
TRAIN_FLAGS = ["--max-steps", str(STEPS), "--eval-every", str(EVERY), "--prompt-length", "3", "--batch-size", "4",
               "--dtype", "fp32", "--seed", "7"]
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGINTx2")
PLACES = ("step", "optimizer", "selection", "timed")


def make_backbone(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from xprompt.backbones.embedded import embedded_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=160, pad_token_id=1)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    embedded_tokenizer().save_pretrained(folder)
    return folder


def train_args(backbone: Path, runs: Path, name: str) -> list[str]:
    return ["train", "--backbone", str(backbone), "--data-dir", str(ROOT / "tests" / "data"), "--runs-dir", str(runs),
            "--run-name", name, *TRAIN_FLAGS]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def send(how: str) -> None:
    """``how`` to this process: a signal, or ``SIGINTx2`` (two SIGINTs in a row)."""
    for _ in range(2 if how.endswith("x2") else 1):
        os.kill(os.getpid(), getattr(signal, how.removesuffix("x2")))


def child(place: str, at: int, how: str, args: list[str]) -> None:
    """The training process of a kill: wraps the loop's functions so that ``how`` is sent at
    ``place`` ``at`` (a fresh run counts from step 0), then runs the CLI with ``args``."""
    import runpy

    import torch

    import xprompt.training as training
    import xprompt.workflows.runs as runs

    def counting(real, number, after=False):
        calls = [0]

        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == number and not after:
                send(how)
            out = real(*a, **k)
            if calls[0] == number and after:
                send(how)
            return out

        return wrapped

    if place == "step":
        training.accumulate_gradients = counting(training.accumulate_gradients, at)
    elif place == "optimizer":
        step = counting(torch.optim.AdamW.step, at, after=True)
        torch.optim.AdamW.step = lambda self, *a, **k: step(self, *a, **k)
    elif place == "selection":  # the selection passes: step 0's, then every EVERY steps
        runs.predict = counting(runs.predict, at // EVERY + 1)
    sys.argv = ["xprompt", *args]
    runpy.run_module("xprompt", run_name="__main__")


def final_state(run: Path) -> dict:
    """What the uninterrupted run and a resumed one must share."""
    from safetensors.torch import load_file

    meta = json.loads((run / "checkpoint" / "state.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = json.loads((run / "metrics.json").read_text())["train"]
    return {"prompt": (run / "prompt" / "prompt.safetensors").read_bytes(),
            "checkpoint": load_file(str(run / "checkpoint" / meta["tensors"])),
            "selection": {"best": (train["best_step"], train["select_accuracy"], meta["best_step"], meta["best_accuracy"]),
                          "lines": [(r["step"], r["select_accuracy"]) for r in log if "select_accuracy" in r]}}


def differences(a: dict, b: dict) -> list[str]:
    import torch

    out = []
    if a["prompt"] != b["prompt"]:
        out.append("prompt")
    ca, cb = a["checkpoint"], b["checkpoint"]
    wrong = sorted(k for k in ca.keys() | cb.keys() if k not in ca or k not in cb or not torch.equal(ca[k], cb[k]))
    for part in ("model.", "best.", "optim.", "rng."):
        if any(k.startswith(part) for k in wrong):
            out.append({"model.": "tensors", "best.": "best tensors", "optim.": "AdamW moments", "rng.": "generators"}[part])
    if a["selection"] != b["selection"]:
        out.append("selection record")
    return out


def killed_then_resumed(backbone: Path, runs: Path, name: str, place: str, at: float, how: str) -> dict:
    """Start a run that is interrupted by ``how`` at ``place`` ``at``; then run the same command
    again until the run is done. Returns where the first process stopped and how."""
    args = train_args(backbone, runs, name)
    if place == "timed":
        proc = subprocess.Popen([sys.executable, "-m", "xprompt", *args], env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        log = runs / name / "log.jsonl"
        deadline = time.time() + 600
        while proc.poll() is None and not log.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(at)
        if proc.poll() is None:
            for _ in range(2 if how.endswith("x2") else 1):
                proc.send_signal(getattr(signal, how.removesuffix("x2")))
    else:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", place, str(at), how, "--", *args],
                                env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    finished = (runs / name / "prompt" / "prompt.safetensors").exists()
    if not finished and (proc.returncode not in (1, -signal.SIGKILL) or (proc.returncode == 1 and "interrupted" not in out)):
        raise SystemExit(f"{name}: unexpected exit {proc.returncode}:\n{out}")
    state = runs / name / "checkpoint" / "state.json"
    meta = json.loads(state.read_text()) if state.is_file() else {}
    stopped = "finished" if finished else (f"{meta['step']}{'+owed' if meta.get('selection_owed') else ''}"
                                            if meta else "none")
    if not finished:
        done = subprocess.run([sys.executable, "-m", "xprompt", *args], env=env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"resume of {name} failed:\n{done.stdout}\n{done.stderr}")
    return {"checkpoint": stopped, "exit": proc.returncode, "one_line": "Traceback" not in out}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        place, at, how = argv[1], int(argv[2]), argv[3]
        child(place, at, how, argv[argv.index("--") + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=4, help="random points, each hit with every signal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signals", default=",".join(SIGNALS), help=f"comma-separated, of {', '.join(SIGNALS)}")
    parser.add_argument("--places", default=",".join(PLACES), help=f"comma-separated, of {', '.join(PLACES)}")
    args = parser.parse_args(argv)
    signals = [s for s in args.signals.split(",") if s]
    places = [p for p in args.places.split(",") if p]
    if not set(signals) <= set(SIGNALS) or not set(places) <= set(PLACES):
        parser.error(f"--signals takes {', '.join(SIGNALS)}; --places takes {', '.join(PLACES)}")
    work = Path(tempfile.mkdtemp(prefix="xprompt-chaos-"))
    try:
        backbone = make_backbone(work / "backbone")
        runs = work / "runs"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "xprompt", *train_args(backbone, runs, "reference")], env=env(),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the reference run failed:\n{done.stdout}\n{done.stderr}")
        reference_seconds = time.perf_counter() - started
        reference = final_state(runs / "reference")
        log = [json.loads(line) for line in (runs / "reference" / "log.jsonl").read_text().splitlines()]
        training_seconds = json.loads((runs / "reference" / "metrics.json").read_text())["train"]["train_seconds"]
        print(f"reference run: {reference_seconds:.1f}s for {STEPS} steps, a selection every {EVERY} "
              f"(best step {reference['selection']['best'][0]}, {sum('select_accuracy' in r for r in log)} selections)")
        rng = random.Random(args.seed)
        rows, failures, cells = [], 0, 0
        for i in range(args.kills):
            place = places[rng.randrange(len(places))]
            if place == "selection":
                at = rng.randrange(1, STEPS // EVERY + 1) * EVERY
            elif place == "timed":
                at = round(rng.uniform(0, training_seconds), 2)
            else:
                at = rng.randrange(1, STEPS + 1)
            row = [f"{place} {at}"]
            for how in signals:
                name = f"kill{i}-{how}"
                info = killed_then_resumed(backbone, runs, name, place, at, how)
                wrong = differences(reference, final_state(runs / name))
                cells += 1
                failures += bool(wrong) or not info["one_line"]
                verdict = "identical" if not wrong else "DIFFERENT: " + ", ".join(wrong)
                if not info["one_line"]:
                    verdict += " (traceback)"
                row.append(f"{verdict} (stopped at {info['checkpoint']})")
            rows.append(row)
            print(f"kill {i}: " + " | ".join(f"{h}: {c}" for h, c in zip(["at", *signals], row)), flush=True)
        width = [max(len(r[c]) for r in rows + [["kill at", *signals]]) for c in range(len(signals) + 1)]
        print()
        for r in [["kill at", *signals], *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(r, width)))
        print(f"\n{args.kills} kills x {len(signals)} signals: {cells - failures} identical, {failures} different; "
              f"final prompt, checkpoint tensors (AdamW moments included) and selection record compared")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
