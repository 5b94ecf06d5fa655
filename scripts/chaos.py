"""Kill-and-resume chaos test: SIGKILL `xprompt train` at random moments, resume it, and check
that the final prompt equals an uninterrupted run's, byte for byte.

Runs on a tiny random BERT (the embedded tokenizer's vocabulary) and the test data, so each
training takes seconds on 2 CPU cores:

    python scripts/chaos.py --kills 10 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 300, 10
TRAIN_FLAGS = ["--max-steps", str(STEPS), "--eval-every", str(EVERY), "--prompt-length", "3", "--batch-size", "4",
               "--dtype", "fp32", "--seed", "7"]


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


def train_cmd(backbone: Path, runs: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "xprompt", "train", "--backbone", str(backbone), "--data-dir",
            str(ROOT / "tests" / "data"), "--runs-dir", str(runs), "--run-name", name, *TRAIN_FLAGS]


def killed_then_resumed(backbone: Path, runs: Path, name: str, kill_after_step: int, extra: float) -> dict:
    """Start a run; once its checkpoint has passed ``kill_after_step``, wait ``extra`` seconds more
    (so the kill lands between checkpoints, losing some steps) and SIGKILL it; then run the same
    command again until the run is done."""
    proc = subprocess.Popen(train_cmd(backbone, runs, name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = runs / name / "checkpoint" / "state.json"

    def checkpoint_step() -> int | None:
        try:
            return json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            return None

    deadline = time.time() + 600
    while proc.poll() is None and (checkpoint_step() or 0) < kill_after_step and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(extra)
    killed = proc.poll() is None
    if killed:
        proc.kill()
    proc.wait()
    at = checkpoint_step()
    if killed and (runs / name / "prompt" / "prompt.safetensors").exists():
        killed = False  # the kill came after the run had finished (while the process was exiting)
    if killed:  # the same command again continues the run
        done = subprocess.run(train_cmd(backbone, runs, name), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"resume failed after a kill past step {kill_after_step}:\n{done.stdout}\n{done.stderr}")
    return {"killed": killed, "checkpoint_step": at}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="xprompt-chaos-"))
    try:
        backbone = make_backbone(work / "backbone")
        runs = work / "runs"
        started = time.perf_counter()
        subprocess.run(train_cmd(backbone, runs, "reference"), check=True, capture_output=True)
        reference_seconds = time.perf_counter() - started
        reference = (runs / "reference" / "prompt" / "prompt.safetensors").read_bytes()
        rng = random.Random(args.seed)
        failures = 0
        print(f"reference run: {reference_seconds:.1f}s for {STEPS} steps, a checkpoint every {EVERY}")
        for i in range(args.kills):
            name = f"kill{i}"
            info = killed_then_resumed(backbone, runs, name, rng.randrange(EVERY, STEPS - 4 * EVERY), rng.uniform(0, 0.3))
            same = (runs / name / "prompt" / "prompt.safetensors").read_bytes() == reference
            failures += not same
            print(f"kill {i}: SIGKILL {'after the checkpoint of step ' + str(info['checkpoint_step']) if info['killed'] else 'missed (run had finished)'}, "
                  f"resumed -> final prompt {'identical' if same else 'DIFFERENT'} to the uninterrupted run's")
        print(f"{args.kills - failures} passed, {failures} failed")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
