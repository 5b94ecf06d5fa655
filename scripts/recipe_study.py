"""Does every seed learn? The default recipe over many seeds, its safety net, checkpoint averaging and
bf16 against fp32, read from stored run records and training logs (issue 31).

It reads the bundles that ``scripts/close_gap.py`` writes (one record per run: seed, per-language dev
results, the train summary with the held-out selection, the restarts and the checkpoint average) and,
where the run folder is still there, its ``log.jsonl`` (the step records carry the loss, the gradient
norm, the prompt's and label vectors' norms, the verbalizer centre; the selection records the English
held-out accuracy). What it takes from a log is kept in ``--out``'s JSON, so the page survives the run
folders. Every figure reads English held-out rows or the dev split; nothing here chooses anything on a
target language.

    python scripts/recipe_study.py --bundle xnli=docs/seeds_xnli.json --bundle pawsx=docs/seeds_pawsx.json \\
        --bundle xnli=docs/seeds_augment_xnli.json@epyc --bundle xnli=docs/dtype_bf16_xnli.json@epyc \\
        --fp32 xnli=docs/dtype_fp32_xnli.json@epyc --bundle pawsx=docs/dtype_bf16_pawsx.json@epyc \\
        --fp32 pawsx=docs/dtype_fp32_pawsx.json@epyc --runs-dir runs/augment --runs-dir runs/dtype-bf16 \\
        --runs-dir runs/dtype-fp32 --runs-dir runs/diag --runs-dir runs/tu --runs-dir runs/dtype-pawsx \\
        --trajectory xnli-augment-s21 \\
        --trajectory xnli-augment-s21-clip1 --trajectory xnli-lr0.1-s42 --out docs/recipe.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IDENTITY = ("dtype", "train_seconds")  # what tells two runs of one name apart
NOTES = "## What the figures say"  # the hand-written reading: kept when the page is rendered again
CHANCE_MARGIN = 0.05  # "at chance": English held-out within 5 points of the majority class (issue 31)
TRACE = ("step", "loss", "select_accuracy", "grad_norm", "grad_norm_max", "prompt_norm", "label_norm", "center_norm",
         "label_spread", "lr")


def majority_share(task_name: str, seed: int, select_size: int | None) -> float:
    """The majority class's share of the run's English held-out rows (drawn by its seed, as train draws them)."""
    import numpy as np

    from xprompt.config import TrainConfig
    from xprompt.data import holdout_split, load_split, select_count
    from xprompt.tasks import load_task

    task = load_task(task_name)
    pool = load_split(task, task.source_language, "train", None)
    size = select_size if select_size is not None else TrainConfig.select_size
    _, select = holdout_split(pool, select_count(size, len(pool)), seed)
    counts = np.bincount(np.asarray(select["label"], dtype=np.int64))
    return float(counts.max() / counts.sum())


def read_log(folder: Path) -> dict | None:
    """What a run's logs say: the selection curve, the step records, the restarts (each failed attempt's log)."""
    log = folder / "log.jsonl"
    if not log.is_file():
        return None

    def records(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    attempts = [records(p) for p in sorted(folder.glob("log.restart-*.jsonl"))] + [records(log)]
    metrics = folder / "metrics.json"  # which run wrote the log: its train summary's dtype and seconds
    train = json.loads(metrics.read_text()).get("train", {}) if metrics.is_file() else {}
    return {"attempts": [[{k: r[k] for k in TRACE if k in r} for r in attempt
                          if "loss" in r or "select_accuracy" in r] for attempt in attempts],
            "run": {k: train.get(k) for k in IDENTITY}}


def log_matches(log: dict | None, train: dict) -> bool:
    """Whether ``log`` is the training log of the run ``train`` describes: its kept attempt's best English
    held-out accuracy and a step that reached it are the record's (best step, select accuracy), and where the log
    knows its run (the run folder's metrics), that run's dtype and training seconds are the record's too: two runs
    of one name (a seed on two machines, in two dtypes) can reach the same best point."""
    known = (log or {}).get("run") or {}
    if known.get("train_seconds") is not None and any(known.get(k) != train.get(k) for k in IDENTITY):
        return False
    points = [r for r in (log or {}).get("attempts", [[]])[-1] if r.get("select_accuracy") is not None]
    if not points or train.get("select_accuracy") is None:
        return False
    best = max(r["select_accuracy"] for r in points)
    return abs(best - train["select_accuracy"]) < 1e-9 and any(
        r["step"] == train.get("best_step") and abs(r["select_accuracy"] - best) < 1e-9 for r in points)


def run_rows(task_name: str, lever: str, records: list[dict], runs_dirs: list[Path], cached: dict) -> list[dict]:
    from xprompt.tasks import load_task

    task = load_task(task_name)
    source, targets = task.source_language, [lang for lang in task.official_languages if lang != task.source_language]
    rows = []
    for record in records:
        name, train = record["run"], record.get("train", {})
        previous = cached.get(name, [])
        # one name stands for several runs (two machines, two dtypes, a run now training in another runs dir):
        # a log belongs to this record only if its best selection point is the record's
        stored = [p.get("log") for p in previous  # a stored row of another run of this name keeps its own log
                  if all(p.get(k) == train.get(k) for k in IDENTITY)]
        logs = [read_log(d / name) for d in runs_dirs if (d / name / "log.jsonl").is_file()] + stored
        log = next((lg for lg in logs if log_matches(lg, train)), None)
        majority = next((p["majority"] for p in previous if p.get("majority")), None) or majority_share(task_name, record["seed"], None)
        average = train.get("checkpoint_average") or {}
        rows.append({
            "run": name, "task": task_name, "lever": lever, "seed": record["seed"], "dtype": train.get("dtype"),
            "cpu": record.get("compute", {}).get("cpu_bf16_reason") or record.get("compute", {}).get("cpu_capability"),
            "majority": majority, "best_step": train.get("best_step"), "held_out": train.get("select_accuracy"),
            "average_held_out": average.get("select_accuracy") if average else None,
            "average_steps": average.get("steps") if average else None,
            "restarts": train.get("restarts") or [], "train_seconds": train.get("train_seconds"),
            "en": record["dev"][source]["accuracy"],
            "targets": statistics.fmean(record["dev"][lang]["accuracy"] for lang in targets),
            "n_targets": len(targets), "log": log,
            "correct": {lang: record["dev"][lang].get("correct") for lang in targets},
        })
    return rows


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else _pct(values[0])


def paired(diffs: list[float]) -> str:
    """Mean of paired differences ± its standard error (sample std / sqrt(n)), in points."""
    if len(diffs) < 2:
        return "-" if not diffs else f"{100 * diffs[0]:+.2f}"
    return f"{100 * statistics.fmean(diffs):+.2f} ± {100 * statistics.stdev(diffs) / math.sqrt(len(diffs)):.2f}"


def first_at(log: dict | None, key: str, threshold: float) -> int | None:
    """The first step of the kept attempt whose ``key`` passes ``threshold``."""
    if not log:
        return None
    return next((r["step"] for r in log["attempts"][-1] if r.get(key) is not None and r[key] > threshold), None)


def seed_table(rows: list[dict]) -> list[str]:
    lines = ["| run | seed | dtype | majority share | held-out at step 0 | best step | best held-out | margin over majority "
             "| mean of last 3 checkpoints, held-out | restarts | largest gradient norm | en dev | target average (dev) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        attempts = (r["log"] or {}).get("attempts") or [[]]
        start = next((x["select_accuracy"] for x in attempts[0] if "select_accuracy" in x and x["step"] == 0), None)
        grad = max((x["grad_norm_max"] for a in attempts for x in a if x.get("grad_norm_max") is not None), default=None)
        restarts = "; ".join(f"step {x['step']}: held-out {_pct(x['select_accuracy'])}, "
                             f"{'back to step ' + str(x['rolled_back_to']) + ', ' if 'rolled_back_to' in x else ''}"
                             f"lr {x['lr']:.3g} -> {x['new_lr']:.3g}" for x in r["restarts"]) or "none"
        lines.append(f"| {r['run']} | {r['seed']} | {r['dtype']} | {_pct(r['majority'])} | {_pct(start)} | {r['best_step']} | "
                     f"{_pct(r['held_out'])} | {100 * (r['held_out'] - r['majority']):+.1f} | {_pct(r['average_held_out'])} | "
                     f"{restarts} | {'-' if grad is None else f'{grad:.3f}'} | {_pct(r['en'])} | {_pct(r['targets'])} |")
    return lines


def summary(rows: list[dict]) -> list[str]:
    at_chance = [r["run"] for r in rows if r["held_out"] - r["majority"] < CHANCE_MARGIN]
    averaged = [r["average_held_out"] - r["held_out"] for r in rows if r["average_held_out"] is not None]
    lines = [f"- {len(rows)} seeds ({', '.join(str(r['seed']) for r in rows)}); target average (dev, {rows[0]['n_targets']} "
             f"official targets) **{_spread([r['targets'] for r in rows])}** (mean ± sample std), English dev "
             f"{_spread([r['en'] for r in rows])}; lowest seed {_pct(min(r['targets'] for r in rows))}.",
             f"- At chance (best English held-out within {100 * CHANCE_MARGIN:.0f} points of the majority class): "
             f"{', '.join(at_chance) if at_chance else 'none'}. Restarted by the safety net: "
             f"{', '.join(r['run'] for r in rows if r['restarts']) or 'none'}."]
    if averaged:  # runs made without --average-checkpoints have nothing to compare
        lines.append(f"- Checkpoint averaging (mean of the last 3 selection points, scored on the same English held-out rows) "
                     f"against the best single checkpoint: {paired(averaged)} points held-out (paired mean ± standard "
                     f"error over {len(averaged)} seeds; the best checkpoint was chosen on these rows, so its figure is "
                     f"optimistic: docs/selection_crossfit.md scores both on rows the choice did not see).")
    if len(rows) >= 5:
        lines.append(spread_line(rows))
    return lines


def spread_line(rows: list[dict]) -> str:
    """How far English can tell a seed's transfer: the target average's correlation over seeds with the
    best English held-out accuracy and with English dev, and the 95% interval of its standard deviation
    (chi-square, n - 1 degrees of freedom) that n seeds allow."""
    from scipy.stats import chi2

    targets, n = [r["targets"] for r in rows], len(rows)
    s = statistics.stdev(targets)
    low, high = (s * math.sqrt((n - 1) / chi2.ppf(q, n - 1)) for q in (0.975, 0.025))
    r_held = statistics.correlation([r["held_out"] for r in rows], targets)
    r_dev = statistics.correlation([r["en"] for r in rows], targets)
    return (f"- Over these seeds the target average correlates with the best English held-out accuracy at r = "
            f"{r_held:+.2f} and with English dev at r = {r_dev:+.2f} (Pearson); its standard deviation of "
            f"{100 * s:.2f} has a 95% interval of {100 * low:.2f} to {100 * high:.2f} over {n} seeds (chi-square).")


def flipped(x: dict, y: dict) -> float | None:
    """The share of target rows two runs decide differently (one right, the other wrong), mean over languages."""
    flips = [sum(p != q for p, q in zip(x["correct"][lang], y["correct"][lang])) / len(x["correct"][lang])
             for lang in x["correct"] if x["correct"][lang] and y["correct"].get(lang)]
    return statistics.fmean(flips) if flips else None


def seed_reference(sweep: list[dict]) -> list[str]:
    """What two *different* seeds of one sweep (one machine, one dtype) do: the share of target rows they decide
    differently, and how often two independent runs with the sweep's spread differ by more than 1.0 point."""
    from statistics import NormalDist

    pairs = [f for i, x in enumerate(sweep) for y in sweep[i + 1:] if (f := flipped(x, y)) is not None]
    if len(sweep) < 5 or not pairs:
        return []
    s = statistics.stdev(r["targets"] for r in sweep)
    over = 2 * (1 - NormalDist().cdf(0.01 / (s * math.sqrt(2))))
    return [f"For reference, two different seeds of the {len(sweep)}-seed sweep (one machine, one dtype) decide "
            f"{_pct(statistics.fmean(pairs))}% of target rows differently (range {_pct(min(pairs))}–{_pct(max(pairs))} "
            f"over {len(pairs)} pairs), and two independent runs with its spread of the target average ({100 * s:.2f}) "
            f"differ by more than 1.0 point with probability {over:.2f} (normal, difference std {100 * s * math.sqrt(2):.2f})."]


def dtype_table(bf16: list[dict], fp32: list[dict], names: tuple[str, str] = ("bf16", "fp32"),
                reference: list[dict] | None = None) -> list[str]:
    """The same seeds side by side: two dtypes on one machine, or one dtype on two machines (``names``);
    ``reference``, the sweep of many seeds, says how far two different seeds are from each other."""
    a, b = names
    by_seed = {r["seed"]: r for r in bf16}
    pairs = [(by_seed[r["seed"]], r) for r in fp32 if r["seed"] in by_seed]
    if not pairs:
        return []
    lines = [f"| seed | {a}: best step, held-out | {b}: best step, held-out | {a} target average | {b} target average "
             f"| difference ({a} - {b}) | target rows decided differently |", "|---|---|---|---|---|---|---|"]
    for x, y in pairs:
        flips = flipped(x, y)
        lines.append(f"| {x['seed']} | {x['best_step']}, {_pct(x['held_out'])} | {y['best_step']}, {_pct(y['held_out'])} | "
                     f"{_pct(x['targets'])} | {_pct(y['targets'])} | {100 * (x['targets'] - y['targets']):+.1f} | "
                     f"{_pct(flips) + '% (of correct/incorrect outcomes)' if flips is not None else '-'} |")
    diffs = [abs(x["targets"] - y["targets"]) for x, y in pairs]
    lines += ["", f"Largest per-seed difference of the target average: {100 * max(diffs):.1f} points "
              f"(goal ≤ 1.0); mean absolute difference {100 * statistics.fmean(diffs):.1f}."]
    reference = seed_reference(reference or [])
    return lines + (["", *reference] if reference else [])


def trajectory(row: dict, every: int = 100) -> list[str]:
    log = row["log"]
    if not log:
        return [f"(no log kept for {row['run']})"]
    lines = []
    for number, attempt in enumerate(log["attempts"]):
        label = "kept attempt" if number == len(log["attempts"]) - 1 else f"attempt {number + 1}, restarted"
        lines += ["", f"**{row['run']}, {label}** (step records are means over the 20 steps before the step; "
                  "held-out: English held-out accuracy)", "",
                  "| step | loss | held-out | grad norm (mean / max) | prompt norm | label-vector norm | centre norm | label spread | lr |",
                  "|---|---|---|---|---|---|---|---|---|"]
        steps = {}
        for record in attempt:
            steps.setdefault(record["step"], {}).update(record)
        for step, r in sorted(steps.items()):
            if step % every and step != max(steps):
                continue
            lines.append(f"| {step} | {r.get('loss', '-')} | {_pct(r.get('select_accuracy'))} | "
                         f"{r.get('grad_norm', '-')} / {r.get('grad_norm_max', '-')} | {r.get('prompt_norm', '-')} | "
                         f"{r.get('label_norm', '-')} | {r.get('center_norm', '-')} | {r.get('label_spread', '-')} | "
                         f"{'-' if r.get('lr') is None else format(r['lr'], '.3g')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", default=[],
                        help="task=path[@label] of a close_gap.py JSON (bf16 runs); a label keeps bundles apart "
                             "(e.g. two machines), and an --fp32 bundle is compared with the bf16 one of its label")
    parser.add_argument("--fp32", action="append", default=[], help="task=path[@label] of a close_gap.py JSON of the fp32 runs")
    parser.add_argument("--runs-dir", action="append", type=Path, default=[], help="where the run folders (logs) are")
    parser.add_argument("--trajectory", action="append", default=[], help="a run whose curves to print")
    parser.add_argument("--out", type=Path, default=Path("docs/recipe.md"))
    args = parser.parse_args()
    store = args.out.with_suffix(".json")
    cached: dict[str, list[dict]] = {}  # every stored row of a name: one name may stand for several runs
    for r in json.loads(store.read_text())["runs"] if store.is_file() else []:
        cached.setdefault(r["run"], []).append(r)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for dtype, specs in (("bf16", args.bundle), ("fp32", args.fp32)):
        for spec in specs:
            task_name, path = spec.split("=", 1)
            path, _, label = path.partition("@")
            kind = f"{dtype}, {label}" if label else dtype
            for lever, records in json.loads(Path(path).read_text())[task_name].items():
                if lever.startswith("ensemble"):
                    continue
                groups.setdefault((task_name, lever, kind), []).extend(run_rows(task_name, lever, records, args.runs_dir, cached))
    text = ["# Does every seed learn? The default recipe over seeds, its safety net, averaging, bf16 and fp32", "",
            "Rendered by `python scripts/recipe_study.py` (its docstring has the command) from the run records "
            "that `scripts/close_gap.py` stored and the runs' training logs. Dev split, full, every official "
            "language; every choice inside a run on the 500 English held-out rows. Accuracy × 100."]
    for (task_name, lever, kind), rows in groups.items():
        text += ["", f"## {task_name}, {lever}, {kind}", "", *summary(rows), "", *seed_table(rows)]
    for (task_name, lever, kind), rows in groups.items():
        if kind.startswith("fp32"):
            lines = dtype_table(groups.get((task_name, lever, kind.replace("fp32", "bf16", 1)), []), rows,
                                reference=groups.get((task_name, lever, "bf16"), []))
            if lines:
                text += ["", f"## {task_name}, {lever}: bf16 against fp32, the same seeds ({kind})", "", *lines]
        elif kind.startswith("bf16, "):  # a labelled bf16 bundle against the unlabelled one: two machines, one dtype
            machine = lambda rows: (rows[0].get("cpu") or "?") if rows else "?"  # noqa: E731
            plain = groups.get((task_name, lever, "bf16"), [])
            lines = dtype_table(rows, plain, (kind.split(", ", 1)[1], "sweep"), reference=plain)
            if lines:
                text += ["", f"## {task_name}, {lever}: the same seeds in bf16 on two machines", "",
                         f"{kind.split(', ', 1)[1]}: {machine(rows)}; sweep: {machine(plain)}.", "", *lines]
    everything = [r for rows in groups.values() for r in rows]
    traced = []  # runs outside every bundle (a diagnosis run), kept by their log alone
    for name in args.trajectory:
        row = next((r for r in everything if r["run"] == name), None)
        if row is None:
            folder = next((d / name for d in args.runs_dir if (d / name / "log.jsonl").is_file()), None)
            log = read_log(folder) if folder else next((p["log"] for p in cached.get(name, []) if p.get("log")), None)
            row = {"run": name, "log": log, "trace_only": True}
            traced.append(row)
        text += ["", f"## Trajectory of {name}", *trajectory(row)]
    notes = args.out.read_text() if args.out.is_file() else ""  # the hand-written reading below the tables stays
    notes = notes[notes.find(NOTES):] if NOTES in notes else ""
    args.out.write_text("\n".join(text) + "\n" + ("\n" + notes if notes else ""))
    store.write_text(json.dumps({"runs": [{k: v for k, v in r.items() if k != "correct"} for r in everything + traced]},
                                indent=1) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
