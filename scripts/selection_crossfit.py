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

    python scripts/selection_crossfit.py --runs-dir /work/runs_sel --out docs/selection_crossfit.md \
        --averages-dir /work/runs_avg --targets pawsx=docs/dtype_bf16_pawsx.json --targets xnli=docs/dtype_bf16_xnli.json

The second part is a report on the dev sets: with ``--averages-dir`` (checkpoint averages written by
scripts/average_of_run.py and scored by ``xprompt eval --langs all``) and ``--targets`` (the stored records of
the best checkpoints' runs of the same seeds), it sets the two side by side on every official target.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from recipe_study import paired  # noqa: E402  (mean of paired differences ± its standard error, in points)

NOTES = "## What the figures say"  # the hand-written reading: kept when the page is rendered again


def read_run(folder: Path) -> dict | None:
    """A finished run's selection record: its per-row correctness at every selection point and for the
    checkpoint average, or None where the log has no per-row records (an older run) or it is unfinished."""
    metrics, log = folder / "metrics.json", folder / "log.jsonl"
    if not (metrics.is_file() and log.is_file()):
        return None
    recorded = json.loads(metrics.read_text())
    train = recorded.get("train", {})
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
            "points": {str(step): rows for step, rows in sorted(points.items())}, "average": average,
            "en_dev": recorded.get("eval", {}).get(cfg.get("task"), {}).get("dev", {}).get(cfg.get("lang"))}


def read_average(folder: Path, runs_dirs: list[Path]) -> dict | None:
    """An evaluated checkpoint average (scripts/average_of_run.py, then ``xprompt eval --langs all``): its dev
    records; and, where the run it came from was re-scored on one language, that record, to show the run
    is the one a stored bundle describes (the same per-row outcomes)."""
    metrics = folder / "metrics.json"
    evaluated = json.loads(metrics.read_text()).get("eval", {}) if metrics.is_file() else {}
    if not evaluated:
        return None
    task = next(iter(evaluated))
    config = json.loads((folder / "config.json").read_text())
    source = next((d / folder.name / "metrics.json" for d in runs_dirs if (d / folder.name / "metrics.json").is_file()), None)
    rescored = json.loads(source.read_text()).get("eval", {}).get(task, {}).get("dev", {}) if source else {}
    return {"run": folder.name, "task": task, "seed": config.get("train", {}).get("seed"),
            "dev": evaluated[task].get("dev", {}), "best_rescored": rescored}


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


def target_lines(averages: list[dict], bundles: dict[str, list[dict]]) -> list[str]:
    """The checkpoint average against the best checkpoint on the dev sets of every official target, paired
    by seed with the stored record of the best checkpoint's run (a report: nothing is chosen on it)."""
    from close_gap import paired_z

    from xprompt.tasks import load_task

    lines = []
    for task_name in sorted({a["task"] for a in averages}):
        task = load_task(task_name)
        source = task.source_language
        targets = [lang for lang in task.official_languages if lang != source]
        stored = {r["seed"]: r for r in bundles.get(task_name, [])}
        pairs = [(stored[a["seed"]], a) for a in sorted(averages, key=lambda a: a["seed"])
                 if a["task"] == task_name and a["seed"] in stored and all(lang in a["dev"] for lang in [source, *targets])]
        if not pairs:
            continue
        mean = lambda dev: statistics.fmean(dev[lang]["accuracy"] for lang in targets)  # noqa: E731
        lines += [f"## {task_name}: the checkpoint average on the dev sets", "",
                  f"Dev split, full: English (source-language rows no run chose anything on) and the {len(targets)} "
                  "official targets (a report: nothing is chosen on them). The best checkpoint's figures are the stored "
                  "record of the same seed's run on this CPU kind; the last column re-scores this session's best "
                  "checkpoint on one language and compares its per-row outcomes with that record. Paired z: (wins − "
                  "losses) / √(wins + losses) of the average against the best over the same rows.", "",
                  "| seed | en dev: best | en dev: mean of the last 3 | en paired z | target average: best "
                  "| target average: mean of the last 3 | difference | target paired z "
                  "| best checkpoint re-scored: same rows decided alike |", "|---|---|---|---|---|---|---|---|---|"]
        diffs, english = [], []
        for best, average in pairs:
            diffs.append(mean(average["dev"]) - mean(best["dev"]))
            english.append(average["dev"][source]["accuracy"] - best["dev"][source]["accuracy"])
            same = [lang for lang in average.get("best_rescored", {}) if "correct" in best["dev"].get(lang, {})]
            check = ", ".join(f"{lang}: {'yes' if average['best_rescored'][lang].get('correct') == best['dev'][lang]['correct'] else 'no'}"
                              for lang in same) or "-"
            z, z_en = paired_z(average["dev"], best["dev"], targets), paired_z(average["dev"], best["dev"], [source])
            lines.append(f"| {best['seed']} | {100 * best['dev'][source]['accuracy']:.1f} | "
                         f"{100 * average['dev'][source]['accuracy']:.1f} | {'-' if z_en is None else f'{z_en:+.1f}'} | "
                         f"{100 * mean(best['dev']):.1f} | {100 * mean(average['dev']):.1f} | "
                         f"{100 * diffs[-1]:+.1f} | {'-' if z is None else f'{z:+.1f}'} | {check} |")
        seeds = f"{len(diffs)} seed{'s' if len(diffs) != 1 else ''}"
        lines += ["", f"Paired difference (average − best), mean ± standard error over {seeds}: English dev "
                  f"{paired(english)} points; target average {paired(diffs)} points.", ""]
    return lines


def english_dev_lines(mine: list[dict], averages: dict) -> list[str]:
    """The best checkpoint against the checkpoint average on English dev, rows no run chose anything on
    (the best checkpoint re-scored there, the average from scripts/average_of_run.py), paired by run."""
    from close_gap import paired_z

    pairs = [(r, averages[r["run"]]) for r in mine if (r.get("en_dev") or {}).get("correct") and r["run"] in averages
             and "correct" in averages[r["run"]]["dev"].get("en", {})]
    if not pairs:
        return []
    diffs = [a["dev"]["en"]["accuracy"] - r["en_dev"]["accuracy"] for r, a in pairs]
    each = "; ".join(f"seed {r['seed']}: {100 * r['en_dev']['accuracy']:.1f} → {100 * a['dev']['en']['accuracy']:.1f} "
                     f"(z {paired_z({'en': a['dev']['en']}, {'en': r['en_dev']}, ['en']):+.1f})" for r, a in pairs)
    return [f"- On English dev ({len(pairs[0][0]['en_dev']['correct']):,} rows no run chose anything on), the mean of the "
            f"last 3 against the best checkpoint: {paired(diffs)} ({len(pairs)} run{'s' if len(pairs) != 1 else ''}; "
            f"best → average: {each})."]


def render(runs: list[dict], splits: int, notes: str, targets: list[str] | None = None, averages: dict | None = None) -> str:
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
        lines += english_dev_lines(mine, averages or {})
        lines.append("")
    return "\n".join(lines + (targets or [])) + "\n" + (notes or NOTES + "\n\n(to be written)\n")


def main(argv=None) -> None:
    from xprompt.fileio import update_json, write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, action="append", default=[], help="folders of run folders to read")
    parser.add_argument("--out", type=Path, required=True, help="the page; its JSON store lies beside it")
    parser.add_argument("--splits", type=int, default=200, help="random halvings for the cross-fitted best")
    parser.add_argument("--averages-dir", type=Path, action="append", default=[],
                        help="folders of evaluated checkpoint averages (scripts/average_of_run.py)")
    parser.add_argument("--targets", action="append", default=[],
                        help="task=path of a close_gap.py JSON: the best checkpoints' dev records, paired by seed")
    args = parser.parse_args(argv)
    found = [run for d in args.runs_dir for f in sorted(d.iterdir()) if f.is_dir() and (run := read_run(f))]
    averages = [a for d in args.averages_dir for f in sorted(d.iterdir()) if f.is_dir() and (a := read_average(f, args.runs_dir))]

    def merge(data: dict) -> dict:
        runs, scored = data.get("runs", {}), data.get("averages", {})
        runs.update({f"{r['run']}@{r['train_seconds']}": r for r in found})  # one name may stand for two runs
        scored.update({a["run"]: a for a in averages})
        return {"runs": dict(sorted(runs.items())), **({"averages": dict(sorted(scored.items()))} if scored else {})}

    stored = update_json(args.out.with_suffix(".json"), merge)
    bundles = {}
    for spec in args.targets:
        task_name, path = spec.split("=", 1)
        bundles.setdefault(task_name, []).extend(json.loads(Path(path).read_text())[task_name].get("baseline", []))
    targets = target_lines(list(stored.get("averages", {}).values()), bundles) if bundles else []
    old = args.out.read_text() if args.out.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    write_text(args.out, render(list(stored["runs"].values()), args.splits, notes, targets, stored.get("averages", {})))
    print(f"{len(found)} runs read, {len(stored['runs'])} stored; wrote {args.out}")


if __name__ == "__main__":
    main()
