"""The README's one results table, rendered from stored run records (never typed by hand).

A record is what a run folder holds, flattened: ``{"run", "seed", "dev": {lang: {"accuracy", "correct",
"dtype", ...}}, "train": {..., "protocol"}, "compute": {"cpu_capability", "cpu_bf16_reason", ...}}``,
as ``scripts/close_gap.py`` keeps them in its JSON (``docs/close_gap.json``) so a figure survives its
run folder. Each table row is one configuration over its seeds: English and the mean of the task's
official target languages (mean +- sample std over seeds), the gap, the rows per language
(counted from the stored per-row outcomes), the split, the CPU kind and dtype, the protocol and the
command that made the runs.

    python scripts/results_table.py              # print the table
    python scripts/results_table.py --readme     # write it between the README's results-table markers
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xprompt.tasks import load_task  # noqa: E402

# (label, task, record bundle, lever inside it, the command that made the runs)
SWEEP = ("python scripts/close_gap.py --tasks {task} --seeds 42,13,21,87,100,1,2,3,4,5 --levers baseline --no-ensemble "
         "--runs-dir runs/seeds --out docs/seeds_{task}.md -- --average-checkpoints 3 --average-keep best")
# (label, task, record bundle, lever inside it, the command that made the runs). `--average-keep best` keeps the
# best checkpoint (the default's prompt) and only records the checkpoint average's held-out score beside it.
HEADLINE = [
    ("default (deep prompt, centered verbalizer)", "xnli", "docs/seeds_xnli.json", "baseline", SWEEP.format(task="xnli")),
    ("default (deep prompt, centered verbalizer)", "pawsx", "docs/seeds_pawsx.json", "baseline", SWEEP.format(task="pawsx")),
]
BEGIN, END = "<!-- results-table -->", "<!-- end results-table -->"


def records(bundle: Path, task: str, lever: str) -> list[dict]:
    return json.loads((ROOT / bundle).read_text())[task][lever]


def run_record(run_dir: Path, task: str) -> dict:
    """A run folder's record, in the bundle's shape."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return {"run": run_dir.name, "seed": config.get("train", {}).get("seed"), "dev": metrics["eval"][task]["dev"],
            "train": metrics.get("train", {}), "compute": config.get("compute", {})}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def row(label: str, task_name: str, runs: list[dict], command: str) -> dict:
    task = load_task(task_name)
    source = task.source_language
    targets = [lang for lang in task.official_languages if lang != source]
    missing = [(r["run"], lang) for r in runs for lang in (source, *targets) if lang not in r["dev"]]
    if missing:
        raise SystemExit(f"results_table: {missing[0][0]} has no dev score for {missing[0][1]}; the table needs every "
                         f"official language of {task_name}")
    english = [r["dev"][source]["accuracy"] for r in runs]
    average = [statistics.fmean(r["dev"][lang]["accuracy"] for lang in targets) for r in runs]
    rows = sorted({len(r["dev"][lang]["correct"]) for r in runs for lang in (source, *targets)})
    kinds = sorted({(r["compute"].get("cpu_bf16_reason") or r["compute"].get("cpu_capability", "?"),
                     r["compute"].get("dtype", "?")) for r in runs})
    return {"label": label, "task": task_name, "seeds": [r["seed"] for r in runs], "en": _spread(english),
            "targets": _spread(average), "n_targets": len(targets), "gap": _spread([e - a for e, a in zip(english, average)]),
            "per_seed": ", ".join(f"{r['seed']}: {100 * a:.1f}" for r, a in zip(runs, average)),
            "rows": "–".join(str(n) for n in (rows[0], rows[-1])) if len(rows) > 1 else str(rows[0]),
            "protocol": ", ".join(sorted({r["train"].get("protocol", "?") for r in runs})),
            "machine": "; ".join(f"{reason}, {dtype}" for reason, dtype in kinds), "command": command}


def render(rows: list[dict]) -> str:
    lines = ["| task | configuration | seeds | en | target average | gap | target average per seed | dev rows per language | protocol | CPU, dtype |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['label']} | {len(r['seeds'])} | {r['en']} | **{r['targets']}** ({r['n_targets']} official "
              f"targets) | {r['gap']} | {r['per_seed']} | {r['rows']} (full dev) | {r['protocol']} | {r['machine']} |" for r in rows]
    commands = sorted({r["command"] for r in rows})
    lines += ["", "Mean ± sample std over seeds, accuracy × 100 on the dev split; selection on held-out English "
              "rows only. Rendered by `python scripts/results_table.py --readme` from the stored run records of:",
              *(f"`{c}`" for c in commands)]
    return "\n".join(lines) + "\n"


def headline() -> str:
    return render([row(label, task, records(Path(bundle), task, lever), command)
                   for label, task, bundle, lever, command in HEADLINE])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="write the table into README.md between its markers")
    args = parser.parse_args()
    table = headline()
    if not args.readme:
        print(table, end="")
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"results_table: README.md lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
