"""Choose xprompt's defaults under the strict zero-shot protocol: by English held-out accuracy alone.

Every candidate is a real ``xprompt train`` run on the English training pool; its score is the
selection accuracy on the rows held out from that pool (``metrics.json`` ``train.select_accuracy``,
the best of its evaluation points, as training itself selects). No target-language row is read.
The search is coordinate-wise from today's default, one factor at a time, in this order:

1. method (soft, ptuning, deep, prefix, unified)
2. prompt length (4, 8, 16, 32)
3. verbalizer and readout (centered/mean, centered/mask, centered/both, soft/mask, soft/mean)
4. learning rate, per task: factors of the task card's ``train_defaults.lr`` (0.3, 1, 3, 10)
5. steps (the budget: 600, 1200, 2400), with the chosen configuration

Factors 1-3 and 5 are global defaults: a candidate's score is the mean of its tasks' held-out
accuracies. Factor 4 is chosen per task. Ties keep the earlier candidate (today's default first).
Finished runs are reused, so an interrupted search continues where it stopped.

    python scripts/select_defaults.py --runs-dir runs/select --out docs/select_defaults.json
    python scripts/select_defaults.py --tasks xnli --steps 300      # a quicker, smaller search
    python scripts/select_defaults.py --steps 400 --lengths 8,16,32 --readouts centered/mean,centered/mask,soft/mean \
        --lr-factors 0.333333,1,3 --budgets 400,1200              # the reduced grid behind today's defaults
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

TODAY = {"method": "deep", "prompt_length": 8, "verbalizer": "centered", "readout": "mean", "lr": None,
         "max_steps": 1200}
READOUTS = [("centered", "mean"), ("centered", "mask"), ("centered", "both"), ("soft", "mask"), ("soft", "mean")]


def run_name(task: str, cfg: dict, seed: int) -> str:
    lr = "card" if cfg["lr"] is None else f"{cfg['lr']:g}"
    return (f"{task}-{cfg['method']}-L{cfg['prompt_length']}-{cfg['verbalizer']}-{cfg['readout']}-lr{lr}"
            f"-{cfg['max_steps']}-s{seed}")


def train(args, task: str, cfg: dict) -> dict:
    """One candidate run (reused when it already finished); returns its training summary."""
    name = run_name(task, cfg, args.seed)
    folder = Path(args.runs_dir) / name
    if not (folder / "prompt" / "prompt.safetensors").is_file():
        cmd = [sys.executable, "-m", "xprompt", "train", "--task", task, "--lang", "en", "--runs-dir", args.runs_dir,
               "--run-name", name, "--seed", str(args.seed), "--method", cfg["method"],
               "--prompt-length", str(cfg["prompt_length"]), "--verbalizer", cfg["verbalizer"],
               "--readout", cfg["readout"], "--max-steps", str(cfg["max_steps"]),
               *(["--lr", str(cfg["lr"])] if cfg["lr"] else [])]
        if (folder / "config.json").is_file():  # an interrupted run: continue it
            cmd = [sys.executable, "-m", "xprompt", "train", "--resume", str(folder)]
        print("+ " + " ".join(cmd[2:]), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  ({time.perf_counter() - started:.0f}s)", flush=True)
    summary = json.loads((folder / "metrics.json").read_text())["train"]
    return {"run": name, "select_accuracy": summary["select_accuracy"], "best_step": summary["best_step"],
            "train_seconds": summary["train_seconds"], "select_rows": summary["data"]}


def stage(args, log: list, name: str, base: dict, options: list[dict], tasks: list[str], per_task: bool = False):
    """Score every option (a change to ``base``) on every task; return the chosen option per task
    (``per_task``) or the one with the best mean over the tasks."""
    table = []
    for option in options:
        scores = {task: train(args, task, {**base[task], **option}) for task in tasks}
        table.append({"option": option, "scores": scores,
                      "mean": round(mean(s["select_accuracy"] for s in scores.values()), 9)})  # float noise is no win
        print(f"  {name} {option}: " + ", ".join(f"{t} {100 * s['select_accuracy']:.1f}" for t, s in scores.items()),
              flush=True)
    if per_task:
        chosen = {task: max(table, key=lambda row: row["scores"][task]["select_accuracy"])["option"] for task in tasks}
    else:
        best = max(table, key=lambda row: row["mean"])["option"]  # max keeps the first of equals
        chosen = {task: best for task in tasks}
    log.append({"stage": name, "candidates": table, "chosen": chosen})
    return {task: {**base[task], **chosen[task]} for task in tasks}


def card_lr(task: str) -> float:
    from xprompt.config import TrainConfig
    from xprompt.tasks import load_task

    return float(load_task(task).train_defaults.get("lr", TrainConfig.lr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="xnli,pawsx")
    parser.add_argument("--steps", type=int, default=600, help="steps of every candidate before the budget stage")
    parser.add_argument("--budgets", default="600,1200,2400", help="the steps stage's candidates")
    parser.add_argument("--methods", default="deep,soft,ptuning,prefix,unified", help="the method stage's candidates")
    parser.add_argument("--lengths", default="4,8,16,32", help="the prompt-length stage's candidates")
    parser.add_argument("--readouts", default=",".join(f"{v}/{r}" for v, r in READOUTS),
                        help="the verbalizer/readout stage's candidates")
    parser.add_argument("--lr-factors", default="0.3,1,3,10",
                        help="the rate stage's candidates, as factors of each task card's rate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs-dir", default="runs/select")
    parser.add_argument("--out", type=Path, default=Path("docs/select_defaults.json"))
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    base = {task: {**TODAY, "lr": card_lr(task), "max_steps": args.steps} for task in tasks}
    log: list = []
    base = stage(args, log, "method", base, [{"method": m} for m in args.methods.split(",")],
                 tasks)
    wanted = [int(n) for n in args.lengths.split(",")]
    lengths = [base[tasks[0]]["prompt_length"]] + [n for n in wanted if n != base[tasks[0]]["prompt_length"]]
    base = stage(args, log, "prompt_length", base, [{"prompt_length": n} for n in lengths], tasks)
    base = stage(args, log, "verbalizer_readout", base, [{"verbalizer": v, "readout": r} for v, r in (x.split("/") for x in args.readouts.split(","))], tasks)
    factors = [float(x) for x in args.lr_factors.split(",")]
    per_task_rates = {task: [base[task]["lr"]] + [round(base[task]["lr"] * f, 6) for f in factors if f != 1]
                      for task in tasks}
    # one stage per task for the rate (each task's own candidates, its card's rate first)
    chosen_rates = {}
    for task in tasks:
        one = stage(args, log, f"lr ({task})", {task: base[task]}, [{"lr": r} for r in per_task_rates[task]], [task],
                    per_task=True)
        chosen_rates[task] = one[task]["lr"]
    base = {task: {**base[task], "lr": chosen_rates[task]} for task in tasks}
    budgets = [int(x) for x in args.budgets.split(",")]
    base = stage(args, log, "max_steps", base, [{"max_steps": n} for n in budgets], tasks)
    result = {"protocol": "every choice by English held-out selection accuracy (rows held out from the English "
                          "training pool); no target-language row read",
              "seed": args.seed, "candidate_steps": args.steps, "chosen": base, "stages": log}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| stage | candidate | " + " | ".join(f"{t} held-out en" for t in tasks) + " | mean | chosen |",
             "|---|---|" + "---|" * (len(tasks) + 2)]
    for entry in log:
        for row in entry["candidates"]:
            picked = any(row["option"] == c for c in entry["chosen"].values())
            cells = [f"{100 * row['scores'][t]['select_accuracy']:.1f}" if t in row["scores"] else "" for t in tasks]
            lines.append(f"| {entry['stage']} | {json.dumps(row['option'])} | " + " | ".join(cells)
                         + f" | {100 * row['mean']:.1f} | {'**yes**' if picked else ''} |")
    text = "\n".join(lines) + "\n\nchosen: " + json.dumps(base) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
