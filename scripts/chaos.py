"""Kill-and-resume chaos test: SIGKILL `xprompt train` at random moments, resume it, and check
that the final prompt equals an uninterrupted run's, byte for byte.

Runs on a tiny random BERT (the embedded tokenizer's vocabulary) and the test data, so each
training takes seconds on 2 CPU cores:

    python scripts/chaos.py --kills 10 --seed 0
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FLAGS = ["--max-steps", "60", "--eval-every", "4", "--prompt-length", "3", "--batch-size", "4",
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


def killed_then_resumed(backbone: Path, runs: Path, name: str, delay: float) -> dict:
    """Start a run, SIGKILL it after ``delay`` seconds, then re-run the same command until done."""
    proc = subprocess.Popen(train_cmd(backbone, runs, name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.kill()
    proc.wait()
    state = runs / name / "checkpoint" / "state.json"
    import json

    checkpoint_step = json.loads(state.read_text())["step"] if state.exists() else None
    done = subprocess.run(train_cmd(backbone, runs, name), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"resume failed after a kill at {delay:.2f}s:\n{done.stdout}\n{done.stderr}")
    return {"delay": round(delay, 2), "killed": killed, "checkpoint_step": checkpoint_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=None, help="latest kill moment (s); default: the reference run's time")
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
        latest = args.max_delay or reference_seconds
        failures = 0
        print(f"reference run: {reference_seconds:.1f}s; killing between 2s and {latest:.1f}s")
        for i in range(args.kills):
            name = f"kill{i}"
            info = killed_then_resumed(backbone, runs, name, rng.uniform(2.0, latest))
            same = (runs / name / "prompt" / "prompt.safetensors").read_bytes() == reference
            failures += not same
            print(f"kill {i}: SIGKILL at {info['delay']}s (killed: {info['killed']}, last checkpoint at step "
                  f"{info['checkpoint_step']}) -> final prompt {'identical' if same else 'DIFFERENT'}")
        print(f"{args.kills - failures} passed, {failures} failed")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
