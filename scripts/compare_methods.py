"""Every prompt method on the embedded backbone under one budget, through the CLI a user runs.

    python scripts/compare_methods.py --tasks xnli,pawsx --max-steps 300 --limit 300 --out docs/compare_methods

For each task and method: `xprompt train --method M` (same steps, batch, seed, data; each method's
learning rate from --lr-<method> or the task card), `xprompt eval --langs all --limit N` (first N dev
rows of every language), then from the run's metrics: dev accuracy on the source language, the average
over the other languages and the gap, trainable parameters and train time. Eval pairs/s is measured in
this process on the source language's dev rows, with medians over --repeats alternating runs; for
`unified` also with the prompt-state cache switched off (UniPrompt's "no extra cost" claim).
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median

XPROMPT = [sys.executable, "-m", "xprompt"]
METHODS = ("soft", "ptuning", "deep", "prefix", "unified")


def run(*args: str) -> None:
    print("+ xprompt " + shlex.join(args), flush=True)
    if subprocess.run([*XPROMPT, *args]).returncode != 0:
        sys.exit(f"xprompt {args[0]} failed; rerun this script to continue (finished runs are kept)")


def eval_speed(run_dir: Path, task_name: str, lang: str, limit: int, repeats: int, cache: bool | None) -> float:
    """Pairs/s of `evaluation.predict` on the first `limit` dev rows of one language (bf16, batch 64)."""
    from xprompt.backbones import load_backbone
    from xprompt.data import encode, load_split
    from xprompt.evaluation import predict
    from xprompt.model import load_run_model
    from xprompt.store import default_cache_dir
    from xprompt.tasks import DEFAULT_TASKS_DIR, load_task

    task = load_task(task_name, DEFAULT_TASKS_DIR)
    bb = load_backbone("e5-small", default_cache_dir())
    model, _ = load_run_model(run_dir, bb)
    ds = load_split(task, lang, "dev", [])
    encoded = encode(ds.select(range(min(limit, len(ds)))), task.template, bb.tokenizer)
    if cache is not None:
        model.prompt.cache_enabled = cache
    times = []
    predict(model, encoded.select(range(min(32, len(encoded)))), 64, bb.tokenizer.pad_token_id, "bf16")  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        predict(model, encoded, 64, bb.tokenizer.pad_token_id, "bf16")
        times.append(time.perf_counter() - start)
    return len(encoded) / median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="xnli,pawsx")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--limit", type=int, default=300, help="dev rows per language")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--exclude-langs", default="xnli:ko",
                        help="TASK:LANG (or LANG, for every task) left out of the target average; default xnli:ko "
                             "(KorNLI's translation, not official XNLI; PAWS-X's ko is official)")
    parser.add_argument("--verbalizer", default=None, help="--verbalizer for every run (default: xprompt's)")
    parser.add_argument("--readout", default=None, help="--readout for every run (default: xprompt's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--out", type=Path, default=Path("docs/compare_methods"))
    for m in METHODS:
        parser.add_argument(f"--lr-{m}", type=float, default=None, help=f"learning rate of {m} (default: the task card's)")
    args = parser.parse_args()

    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            name = f"{task}-{method}-{args.max_steps}-s{args.seed}"
            if args.verbalizer or args.readout:
                name += f"-{args.verbalizer or 'default'}-{args.readout or 'default'}"
            run_dir = args.runs_dir / name
            lr = getattr(args, f"lr_{method}")
            if not (run_dir / "prompt" / "prompt.safetensors").is_file():
                flags = ["--lr", str(lr)] if lr else []
                flags += ["--verbalizer", args.verbalizer] if args.verbalizer else []
                flags += ["--readout", args.readout] if args.readout else []
                if (run_dir / "checkpoint" / "state.json").is_file():
                    run("train", "--resume", str(run_dir))
                else:
                    run("train", "--task", task, "--method", method, "--max-steps", str(args.max_steps),
                        "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--runs-dir", str(args.runs_dir),
                        "--run-name", name, *flags)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            dev = metrics.get("eval", {}).get(task, {}).get("dev", {})
            if len(dev) < 2 or any(r["n"] != min(args.limit, r["n"]) for r in dev.values()):
                run("eval", "--run", str(run_dir), "--langs", "all", "--limit", str(args.limit))
                metrics = json.loads((run_dir / "metrics.json").read_text())
                dev = metrics["eval"][task]["dev"]
            config = json.loads((run_dir / "config.json").read_text())["train"]
            source = config["lang"]
            left_out = {entry.rpartition(":")[2] for entry in (args.exclude_langs or "").split(",")
                        if entry and entry.rpartition(":")[0] in ("", task)}
            targets = {lang: r["accuracy"] for lang, r in dev.items() if lang != source and lang not in left_out}
            card = json.loads((run_dir / "prompt" / "xprompt.json").read_text())
            row = {
                "task": task, "method": method, "verbalizer": card["verbalizer"], "readout": card["readout"],
                "source": source, "source_acc": dev[source]["accuracy"],
                "target_avg": mean(targets.values()), "targets": len(targets),
                "gap": dev[source]["accuracy"] - mean(targets.values()),
                "trainable_parameters": metrics["train"]["trainable_parameters"],
                "train_seconds": metrics["train"]["train_seconds"],
                "lr": config["lr"],
            }
            print(f"measuring eval speed of {name}", flush=True)
            if method == "unified":  # alternate cached / recomputed prompt states
                cached, fresh = [], []
                for _ in range(args.repeats):
                    cached.append(eval_speed(run_dir, task, source, args.limit, 1, True))
                    fresh.append(eval_speed(run_dir, task, source, args.limit, 1, False))
                row["eval_pairs_per_s"], row["eval_pairs_per_s_no_cache"] = median(cached), median(fresh)
            else:
                row["eval_pairs_per_s"] = eval_speed(run_dir, task, source, args.limit, args.repeats, None)
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [f"Methods on the embedded backbone (multilingual-e5-small), {args.max_steps} steps x batch 16, seed "
             f"{args.seed}; dev accuracy on the first {args.limit} rows of every language; selection on held-out "
             "source-language train rows. Eval pairs/s: bf16, batch 64, median of "
             f"{args.repeats} on the source language's rows.", "",
             "| task | method | verbalizer, readout | lr | source | target avg | gap | trainable params | train s | eval pairs/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['eval_pairs_per_s']:.0f}"
        if "eval_pairs_per_s_no_cache" in r:
            speed += f" (no cache: {r['eval_pairs_per_s_no_cache']:.0f})"
        lines.append(f"| {r['task']} | {r['method']} | {r['verbalizer']}, {r['readout']} | {r['lr']:g} | {100 * r['source_acc']:.1f} | "
                     f"{100 * r['target_avg']:.1f} ({r['targets']}) | {100 * r['gap']:.1f} | {r['trainable_parameters']:,} | "
                     f"{r['train_seconds']:.0f} | {speed} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
