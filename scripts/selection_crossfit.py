"""Which checkpoint should a run keep? Selection rules compared on English held-out rows, cross-fitted (issue 31).

A run keeps its best checkpoint by the English held-out accuracy of each selection point, so the held-out
accuracy it records is the largest of several noisy figures, read on the very rows that chose it: it is
optimistic. Set against it, any rule that chooses nothing (the last checkpoint, the mean of the last k
checkpoints) starts behind, as the checkpoint-averaging comparison in docs/recipe.md did. This script reads
the per-row correctness that every selection pass logs (``select_rows``, ``select_rows_average``) and scores
the rules fairly: the held-out rows are split in two random halves; the best checkpoint is chosen on one half
(the earliest step with the largest accuracy, as training keeps it) and scored on the other, both ways, so
every row is scored by a choice that did not see it; the mean over ``--splits`` random halvings is the run's
cross-fitted figure. Rules that choose nothing are scored on every row. Differences are paired by run (mean ±
standard error over runs). A choice made on half the rows is a little noisier than one made on all of them,
so the cross-fitted best is, if anything, slightly pessimistic; the in-sample figure is the optimistic bound.

What it reads from the run folders is kept in ``--out``'s JSON (merged under a lock), so the page survives
the folders. Every figure here reads English held-out rows; nothing chooses anything on a target language.

    python scripts/selection_crossfit.py --runs-dir /work/runs_sel --out docs/selection_crossfit.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOTES = "## What the figures say"  # the hand-written reading: kept when the page is rendered again


def read_run(folder: Path) -> dict | None:
    """A finished run's selection record: its per-row correctness at every selection point and for the
    checkpoint average, or None where the log has no per-row records (an older run) or it is unfinished."""
    metrics, log = folder / "metrics.json", folder / "log.jsonl"
    if not (metrics.is_file() and log.is_file()):
        return None
    train = json.loads(metrics.read_text()).get("train", {})
    points, average = {}, None
    for line in log.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "select_rows" in record:  # a later record of a step (a resumed or rolled-back run) stands
            points[record["step"]] = record["select_rows"]
        if "select_rows_average" in record:
            average = {"steps": record["average_of_steps"], "rows": record["select_rows_average"]}
    if not points or train.get("best_step") is None:
        return None
    config = json.loads((folder / "config.json").read_text())
    cfg, compute = config.get("train", {}), config.get("compute", {})
    return {"run": folder.name, "task": cfg.get("task"), "seed": cfg.get("seed"), "dtype": train.get("dtype"),
            "cpu": compute.get("cpu_bf16_reason") or compute.get("cpu_capability"), "commit": config.get("git_commit"),
            "train_seconds": train.get("train_seconds"), "best_step": train["best_step"],
            "select_accuracy": train.get("select_accuracy"), "restarts": len(train.get("restarts") or []),
            "points": {str(step): rows for step, rows in sorted(points.items())}, "average": average}


def accuracy(rows: str, keep=None) -> float:
    picked = rows if keep is None else [rows[i] for i in keep]
    return sum(c == "1" for c in picked) / len(picked)


def crossfit_best(points: dict, splits: int, seed: int = 0) -> float:
    """The best checkpoint chosen on one random half of the rows and scored on the other, both ways, mean
    over ``splits`` halvings: the accuracy of the choosing rule on rows its choice did not see."""
    steps = sorted(points, key=int)
    n = len(points[steps[0]])
    rng, total = random.Random(seed), 0.0
    for _ in range(splits):
        order = list(range(n))
        rng.shuffle(order)
        halves = (order[: n // 2], order[n // 2:])
        hits = 0
        for choose, score in (halves, halves[::-1]):
            on_choice = [sum(points[s][i] == "1" for i in choose) for s in steps]
            chosen = steps[on_choice.index(max(on_choice))]  # the earliest of the best, as training keeps it
            hits += sum(points[chosen][i] == "1" for i in score)
        total += hits / n
    return total / splits


def figures(run: dict, splits: int) -> dict:
    points = run["points"]
    last = max(points, key=int)
    out = {"in-sample best": max(accuracy(r) for r in points.values()), "cross-fitted best": crossfit_best(points, splits),
           "last": accuracy(points[last])}
    if run.get("average"):
        out[f"mean of the last {len(run['average']['steps'])}"] = accuracy(run["average"]["rows"])
    return out


def paired(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0] * 100:+.2f}" if values else "-"
    return f"{statistics.fmean(values) * 100:+.2f} ± {statistics.stdev(values) / math.sqrt(len(values)) * 100:.2f}"


def render(runs: list[dict], splits: int, notes: str) -> str:
    lines = ["# Which checkpoint should a run keep? Selection rules on English held-out rows, cross-fitted", "",
             "Rendered by `python scripts/selection_crossfit.py` (its docstring has the command and the method) from "
             "the per-row correctness that every selection pass logs. English held-out rows only (the run's own "
             f"500-row held-out split); the best checkpoint's cross-fitted figure is the mean over {splits} random "
             "halvings (chosen on one half, scored on the other, both ways). Accuracy × 100.", ""]
    for task in sorted({r["task"] for r in runs}):
        mine = sorted((r for r in runs if r["task"] == task), key=lambda r: (r["dtype"] or "", r["seed"] or 0))
        table = [figures(r, splits) for r in mine]
        rules = list(dict.fromkeys(k for t in table for k in t))
        cpus = sorted({r["cpu"] or "unknown" for r in mine})
        lines += [f"## {task}", "", f"{len(mine)} run{'s' if len(mine) != 1 else ''} (seeds {', '.join(str(r['seed']) for r in mine)}; "
                  f"{', '.join(sorted({r['dtype'] or '?' for r in mine}))}; CPU: {'; '.join(cpus)}).", "",
                  "| run | seed | best step | " + " | ".join(rules) + " |", "|---|---|---|" + "---|" * len(rules)]
        for run, fig in zip(mine, table):
            lines.append(f"| {run['run']} | {run['seed']} | {run['best_step']} | "
                         + " | ".join(f"{fig[k] * 100:.1f}" if k in fig else "-" for k in rules) + " |")
        lines += ["", "Paired differences against the cross-fitted best checkpoint (mean ± standard error over runs, "
                  "points of English held-out accuracy):", ""]
        for rule in rules:
            if rule != "cross-fitted best":
                diffs = [fig[rule] - fig["cross-fitted best"] for fig in table if rule in fig]
                lines.append(f"- {rule}: {paired(diffs)} ({len(diffs)} run{'s' if len(diffs) != 1 else ''})")
        lines.append("")
    return "\n".join(lines) + "\n" + (notes or NOTES + "\n\n(to be written)\n")


def main(argv=None) -> None:
    from xprompt.fileio import update_json, write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, action="append", default=[], help="folders of run folders to read")
    parser.add_argument("--out", type=Path, required=True, help="the page; its JSON store lies beside it")
    parser.add_argument("--splits", type=int, default=200, help="random halvings for the cross-fitted best")
    args = parser.parse_args(argv)
    found = [run for d in args.runs_dir for f in sorted(d.iterdir()) if f.is_dir() and (run := read_run(f))]

    def merge(data: dict) -> dict:
        runs = data.get("runs", {})
        runs.update({f"{r['run']}@{r['train_seconds']}": r for r in found})  # one name may stand for two runs
        return {"runs": dict(sorted(runs.items()))}

    stored = update_json(args.out.with_suffix(".json"), merge)
    old = args.out.read_text() if args.out.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    write_text(args.out, render(list(stored["runs"].values()), args.splits, notes))
    print(f"{len(found)} runs read, {len(stored['runs'])} stored; wrote {args.out}")


if __name__ == "__main__":
    main()
