"""Measure the foundation end to end on the embedded backbone, through the CLI a user runs.

For each task: `xprompt train` with the defaults (or the flags given after --), then `xprompt eval
--langs all` on the full dev sets, optionally test predictions for every language, and a Markdown
summary (per-language dev accuracy, averages, gap, train time, eval pairs/s) read back from the
run's metrics.json.

    python scripts/foundation.py --tasks xnli,pawsx --test-data ../shared/data --out runs/foundation.md
    python scripts/foundation.py --tasks xnli --runs-dir runs/soft -- --method soft --lr 3e-2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

XPROMPT = [sys.executable, "-m", "xprompt"]


def run(args: list[str]) -> None:
    print("+ xprompt " + shlex.join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([*XPROMPT, *args], check=True)
    print(f"  ({time.perf_counter() - started:.0f}s)", flush=True)


def summary(run_dir: Path, task: str) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = metrics["train"]
    dev = metrics["eval"][task]["dev"]
    source = "en"
    targets = {lang: r["accuracy"] for lang, r in dev.items() if lang != source}
    pairs = sum(r["n"] for r in dev.values())
    seconds = sum(r["seconds"] for r in dev.values())
    lines = [
        f"### {task} ({run_dir.name})",
        "",
        f"train: {train['data']}; {train['steps']} steps, best step {train['best_step']} "
        f"(held-out en accuracy {100 * train['select_accuracy']:.1f}); {train['train_seconds']:.0f}s, "
        f"{train['train_examples_per_s']:.1f} examples/s; {train['trainable_parameters']:,} trainable parameters",
        f"eval: full dev, {len(dev)} languages, {pairs:,} pairs in {seconds:.0f}s = {pairs / seconds:.1f} pairs/s",
        "",
        "| " + " | ".join(["en", *targets, "avg targets", "avg all", "gap"]) + " |",
        "|" + "---|" * (len(targets) + 4),
        "| " + " | ".join(
            [f"{100 * dev[source]['accuracy']:.1f}", *(f"{100 * v:.1f}" for v in targets.values()),
             f"**{100 * mean(targets.values()):.1f}**", f"{100 * mean([dev[source]['accuracy'], *targets.values()]):.1f}",
             f"{100 * (dev[source]['accuracy'] - mean(targets.values())):.1f}"]) + " |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="xnli,pawsx")
    parser.add_argument("--runs-dir", default="runs/foundation")
    parser.add_argument("--test-data", help="a data root with the test files: also write test predictions")
    parser.add_argument("--out", help="write the Markdown summary here too")
    parser.add_argument("train_args", nargs="*", help="extra flags for xprompt train (after --)")
    args = parser.parse_args()
    parts = []
    for task in args.tasks.split(","):
        name = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.runs_dir) / name
        run(["train", "--task", task, "--runs-dir", args.runs_dir, "--run-name", name, *args.train_args])
        run(["eval", "--run", str(run_dir), "--langs", "all", "--split", "dev"])
        if args.test_data:
            run(["eval", "--run", str(run_dir), "--langs", "all", "--split", "test", "--data-dir", args.test_data])
        parts.append(summary(run_dir, task))
        print(parts[-1], flush=True)
    text = "\n".join(parts)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
