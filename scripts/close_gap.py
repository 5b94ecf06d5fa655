"""The cross-lingual gap and the levers a zero-shot user has besides English labels, measured.

For each task (XNLI, PAWS-X) and seed: the default prompt (baseline), the default with each lever
(self-training on unlabeled target inputs; neighbour-swap augmentation), and their combination,
each trained through the CLI (`xprompt train`) and scored on the full dev sets of every language
(`xprompt eval --langs all`); plus the ensemble of the baseline's seeds (`xprompt eval --run A,B,C`).
Every choice inside a run is made on English held-out rows; the dev sets only report. Self-training
reads the *test* inputs (labels held back), so its dev figures stay zero-shot; the test predictions
of a run that read the test inputs would be transductive, so ``--test-predictions`` retrains the best
configuration reading the *dev* inputs instead and writes its test predictions (non-transductive).

    python scripts/close_gap.py --tasks xnli,pawsx --seeds 42,13,21 --runs-dir runs/gap --out docs/close_gap.md
    python scripts/close_gap.py --levers baseline,selftrain --seeds 42          # a part of it
    python scripts/close_gap.py --tasks xnli --levers baseline,full,head,lora --seeds 42 --no-ensemble \
        --runs-dir runs/tu --out docs/tu_xnli.md                                # frozen prompt vs fine-tuning

It resumes: a trained or scored run is not redone. The JSON beside ``--out`` records every run (its
name, seed, per-language results and per-row correctness), so a run whose folder is gone (another
machine, a cleaned runs dir) is tabulated from its record; seeds run elsewhere add to it by naming all
seeds in a final ``--render-only``. Lanes may share one ``--out``: each merges its records into the
JSON under a lock, and the records of runs it did not tabulate stay. Each lever row also carries the
paired z against the baseline of the same seed, from the per-row correctness.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

XPROMPT = [sys.executable, "-m", "xprompt"]
LEVERS = {
    "baseline": [],
    "selftrain": ["--unlabeled", "official", "--unlabeled-split", "test"],
    "augment": ["--augment", "neighbours"],
    "selftrain+augment": ["--unlabeled", "official", "--unlabeled-split", "test", "--augment", "neighbours"],
    "steps2400": ["--max-steps", "2400"],  # the budget: twice the steps, the checkpoint still chosen on English held-out rows
    # Tu et al. 2022's question (issue 32): the frozen default against tuning the backbone, on the default's budget
    # (1,200 steps of 16, selection on English held-out rows); fine-tuning at the usual 2e-5 with the norm clipped at 1
    "full": ["--tune", "full", "--backbone-lr", "2e-5", "--max-grad-norm", "1.0"],  # deep prompt + every weight
    "head": ["--tune", "head", "--lr", "2e-5", "--backbone-lr", "2e-5", "--max-grad-norm", "1.0"],  # vanilla fine-tuning
    "lora": ["--tune", "lora"],  # PEFT LoRA beside the deep prompt, its defaults
}


NOTES = "## What the figures say"


def run_name(task: str, lever: str, seed: int, tag: str = "") -> str:
    """The run folder of a lever's seed ('+' is not allowed in run names)."""
    return f"{task}-{lever.replace('+', '_')}{tag}-s{seed}"


def run(args: list[str]) -> float:
    print("+ xprompt " + shlex.join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([*XPROMPT, *args], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    print(f"  ({seconds:.0f}s)", flush=True)
    return seconds


def trained(runs_dir: Path, name: str) -> bool:
    return (runs_dir / name / "prompt" / "prompt.safetensors").is_file()


def evaluated(run_dir: Path, task: str, langs: list[str]) -> bool:
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return False
    dev = json.loads(metrics.read_text()).get("eval", {}).get(task, {}).get("dev", {})
    return all(lang in dev and dev[lang].get("limit") is None for lang in langs)


def results(run_dir: Path, task: str) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return {"run": run_dir.name, "seed": config.get("train", {}).get("seed"), "dev": metrics["eval"][task]["dev"],
            "train": metrics.get("train", {}), "compute": config.get("compute", {})}


def recorded_runs(path: Path) -> dict[str, dict]:
    """The runs an earlier render recorded in its JSON, by run name: a run whose folder is gone (another
    machine, a cleaned runs dir) is tabulated from its record instead of being trained again. Delete a
    run's record to redo it."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {r["run"]: r for levers in report.values() for runs in levers.values() for r in runs if "run" in r}


def merged(stored: dict, report: dict) -> dict:
    """The JSON store after this render: its records, each task's levers, and every record an earlier render
    (or another lane sharing ``--out``) stored whose run this render did not tabulate; a record is keyed by
    its run, so a run this render tabulates under a new label (an ensemble of more seeds) leaves its old
    label."""
    for task, levers in report.items():
        fresh = {r.get("run") for runs in levers.values() for r in runs}
        fresh.discard(None)
        old = {lever: [r for r in runs if r.get("run") not in fresh and ("run" in r or lever not in levers)]
               for lever, runs in stored.get(task, {}).items()}
        stored[task] = {**{lever: runs for lever, runs in old.items() if runs and lever not in levers},
                        **{lever: old.get(lever, []) + runs for lever, runs in levers.items()}}
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="xnli,pawsx")
    parser.add_argument("--seeds", default="42,13,21")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/gap"))
    parser.add_argument("--out", type=Path, default=Path("docs/close_gap.md"))
    parser.add_argument("--no-ensemble", action="store_true", help="skip the ensemble of the baseline's seeds")
    parser.add_argument("--render-only", action="store_true",
                        help="train and score nothing: tabulate the levers whose runs are already scored, leave out the rest")
    parser.add_argument("--no-unselected", action="store_true",
                        help="skip scoring a self-trained run's last step (the prompt English selection turned down)")
    parser.add_argument("--ensemble-levers", help="also the ensemble of these levers' runs of the first seed (comma-separated)")
    parser.add_argument("--test-predictions", help="a lever whose seed-1 run writes test predictions (a lever that read "
                        "the test inputs is retrained reading the dev inputs instead, so its test predictions stay zero-shot)")
    parser.add_argument("--predictions-out", type=Path, default=Path("docs/predictions/close_gap"),
                        help="where --test-predictions copies the files (<dir>/<task>/)")
    parser.add_argument("train_args", nargs="*", help="extra flags for every xprompt train (after --)")
    args = parser.parse_args()
    from xprompt.tasks import load_task

    seeds = [int(x) for x in args.seeds.split(",")]
    recorded = recorded_runs(args.out.with_suffix(".json"))
    report: dict = {}
    for task_name in args.tasks.split(","):
        task = load_task(task_name)
        langs = list(task.split_languages("dev"))
        report[task_name] = {}
        for lever in args.levers.split(","):
            names = []
            for seed in seeds:
                name = run_name(task_name, lever, seed)
                on_disk = evaluated(args.runs_dir / name, task_name, langs)
                if not on_disk and name in recorded and not trained(args.runs_dir, name):
                    print(f"{name}: from {args.out.with_suffix('.json')} (its folder is not in {args.runs_dir})", flush=True)
                    names.append(name)
                    continue
                if args.render_only and not on_disk:
                    continue
                if not trained(args.runs_dir, name):
                    run(["train", "--task", task_name, "--seed", str(seed), "--runs-dir", str(args.runs_dir),
                         "--run-name", name, *LEVERS[lever], *args.train_args])
                if not evaluated(args.runs_dir / name, task_name, langs):
                    run(["eval", "--run", str(args.runs_dir / name), "--langs", "all"])
                names.append(name)
            if not names:
                continue
            found = lambda n: (results(args.runs_dir / n, task_name)
                               if evaluated(args.runs_dir / n, task_name, langs) else recorded[n])
            report[task_name][lever] = [found(n) for n in names]
            if "--unlabeled" in LEVERS[lever] and not args.no_unselected:
                lasts = []
                for n in names:
                    if evaluated(args.runs_dir / f"{n}-last", task_name, langs) or (
                            not args.render_only and (args.runs_dir / n).is_dir()):
                        lasts.append(unselected(args.runs_dir, n, task_name, langs))
                    elif f"{n}-last" in recorded:
                        lasts.append(recorded[f"{n}-last"])
                if lasts:
                    report[task_name][f"{lever}, --self-train-keep last"] = lasts
            if lever == "baseline" and len(names) > 1 and not args.no_ensemble:  # the ensemble of the baseline's seeds
                members = seed_members(args.runs_dir, names, recorded)
                result = ensembled(args.runs_dir, members, task_name, langs, recorded, args.render_only) if members else None
                if result:
                    seeds_in = ", ".join(n.rsplit("-s", 1)[1] for n in members)
                    report[task_name][f"ensemble of the baseline's seeds ({seeds_in})"] = [result]
        if args.ensemble_levers:  # the ensemble of several levers' runs of the first seed
            levers = args.ensemble_levers.split(",")
            names = [run_name(task_name, lever, seeds[0]) for lever in levers]
            result = None
            if all(evaluated(args.runs_dir / n, task_name, langs) for n in names) or ensemble_key(names) in recorded:
                result = ensembled(args.runs_dir, names, task_name, langs, recorded, args.render_only)
            if result:
                report[task_name][f"ensemble of {' + '.join(levers)} (seed {seeds[0]})"] = [result]
            else:
                print(f"{task_name}: no ensemble of {', '.join(levers)} (not every member run is scored)", flush=True)
        if args.test_predictions:
            lever = args.test_predictions
            name = run_name(task_name, lever, seeds[0])
            if "test" in LEVERS[lever]:  # it read the test inputs: retrain reading the dev inputs
                name = run_name(task_name, lever, seeds[0], "-devtext")
                flags = [x if x != "test" else "dev" for x in LEVERS[lever]]
                if not trained(args.runs_dir, name):
                    run(["train", "--task", task_name, "--seed", str(seeds[0]), "--runs-dir", str(args.runs_dir),
                         "--run-name", name, *flags, *args.train_args])
            folder = args.runs_dir / name
            test_langs = list(task.split_languages("test"))
            if not all((folder / "predictions" / f"{task_name}.test.{lang}.tsv").is_file() for lang in test_langs):
                run(["eval", "--run", str(folder), "--langs", "all", "--split", "test"])
            out = args.predictions_out / task_name
            out.mkdir(parents=True, exist_ok=True)
            for lang in test_langs:
                shutil.copyfile(folder / "predictions" / f"{task_name}.test.{lang}.tsv", out / f"{task_name}.test.{lang}.tsv")
            print(f"test predictions of {name}: {out}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from xprompt.fileio import update_json
    update_json(args.out.with_suffix(".json"), lambda stored: merged(stored, report))
    notes = args.out.read_text() if args.out.is_file() else ""  # the hand-written reading below the tables stays
    notes = notes[notes.find(NOTES):] if NOTES in notes else ""
    args.out.write_text(render(report, seeds) + ("\n" + notes if notes else ""))
    print(render(report, seeds))


def unselected(runs_dir: Path, name: str, task_name: str, langs: list[str]) -> dict:
    """The prompt at the last step of a self-trained run's last round (its resume checkpoint), scored as
    its own run ``<name>-last``: what ``--self-train-keep last`` would hand on (the same seeded steps),
    so the table shows what the pseudo-labelled rows did to the targets even where English held-out
    rows turned the round down."""
    from safetensors.torch import load_file, save_file

    source, folder = runs_dir / name, runs_dir / f"{name}-last"
    last = sorted(source.glob("selftrain-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    if not trained(runs_dir, folder.name):
        state = load_file(sorted((last / "checkpoint").glob("state-*.safetensors"))[-1])
        (folder / "prompt").mkdir(parents=True, exist_ok=True)
        last_step_config(source, folder)
        shutil.copyfile(source / "prompt" / "xprompt.json", folder / "prompt" / "xprompt.json")
        save_file({k[len("model."):]: v.contiguous() for k, v in state.items() if k.startswith("model.")},
                  str(folder / "prompt" / "prompt.safetensors"))
    if not evaluated(folder, task_name, langs):
        run(["eval", "--run", str(folder), "--langs", "all"])
    log = [json.loads(line) for line in (last / "log.jsonl").read_text().splitlines() if line.strip()]
    held_out = [x["select_accuracy"] for x in log if "select_accuracy" in x]
    train = results(source, task_name)["train"]
    made = results(source, task_name)
    return {"run": folder.name, "seed": made["seed"], "dev": results(folder, task_name)["dev"],
            "train": {**train, "select_accuracy": held_out[-1], "round": last.name}, "compute": made["compute"]}


def last_step_config(source: Path, folder: Path) -> None:
    """``<run>-last``'s config and lineage: a run of its own (a new id; its parent the self-trained run)
    whose config says --self-train-keep last, so the leaderboard never averages it with the keep-best
    run of the same seed as if it were another seed."""
    from xprompt.fileio import write_json
    from xprompt.lineage import load_lineage, make_lineage, new_run_id, write_lineage

    config = json.loads((source / "config.json").read_text())
    config = {**config, "run_id": new_run_id(), "train": {**config["train"], "self_train_keep": "last"}}
    write_json(folder / "config.json", config)
    parent = load_lineage(source)
    write_lineage(folder, make_lineage(config["run_id"], folder.name, "copy", parent["task"], parent["lang"],
                                       parent["method"], [], [("last-step-of", parent)]))


def seed_members(runs_dir: Path, names: list[str], recorded: dict[str, dict]) -> list[str]:
    """The members of the ensemble of a lever's seeds: the most seeds that either have their prompts here
    (a run known only from its record has no prompt to run) or were ensembled in a recorded run; [] where
    fewer than two."""
    here = [n for n in names if trained(runs_dir, n)]
    known = [key.removeprefix("ensemble:").split(",") for key in recorded if key.startswith("ensemble:")]
    known = [[n for n in names if n in members] for members in known if set(members) <= set(names)]
    best = max([here, *known], key=len)  # on a tie, the prompts here
    return best if len(best) > 1 else []


def ensemble_key(names: list[str]) -> str:
    return "ensemble:" + ",".join(sorted(names))


def ensembled(runs_dir: Path, names: list[str], task_name: str, langs: list[str],
              recorded: dict[str, dict], render_only: bool) -> dict | None:
    """The results of ``xprompt eval --run A,B,C`` over the named runs (made once, found again after;
    from the earlier render's record where its folder is gone); None where it is not scored and
    ``render_only`` (or a member's prompt is gone)."""
    def find():
        for folder in runs_dir.glob("ensemble-*"):
            if json.loads((folder / "config.json").read_text())["train"].get("members") == sorted(names):
                return folder
        return None

    folder = find()
    if folder is None or not evaluated(folder, task_name, langs):
        if ensemble_key(names) in recorded:
            return recorded[ensemble_key(names)]
        if render_only or not all(trained(runs_dir, n) for n in names):
            return None
        run(["eval", "--run", ",".join(str(runs_dir / n) for n in names), "--langs", "all"])
        folder = find()
    return {**results(folder, task_name), "run": ensemble_key(names), "seed": None}


def render(report: dict, seeds: list[int]) -> str:
    from xprompt.reports import summarize
    from xprompt.tasks import load_task

    lines = ["# Closing the cross-lingual gap: what each lever gives", "",
             f"Full dev sets, every language; " + (f"mean ± std over seeds {', '.join(map(str, seeds))} (an ensemble: "
             "one row)" if len(seeds) > 1 else f"one seed ({seeds[0]})") + "; averages over each task's official targets (XNLI 14, PAWS-X 6; Korean stands "
             "apart for XNLI); zero-shot: every choice on English held-out rows, self-training read the test inputs "
             "(never their labels), so the dev figures below read no dev row. Command: "
             "`python scripts/close_gap.py` (see its docstring). *held-out en*: accuracy on the 500 English rows held "
             "out from the training pool, which choose each run's checkpoint and would choose between levers. "
             "*paired z*: against the baseline of the same seed over the same target rows, (wins − losses) / "
             "√(wins + losses), where a win is a row the lever gets right and the baseline wrong; one value per seed "
             "(|z| < 2 is row noise). "
             "Speed (train minutes, eval pairs/s: the mean over the runs made on each CPU kind, never mixed): "
             + _machine(report) + ".", ""]
    kinds = _kinds(report)
    for task_name, levers in report.items():
        task = load_task(task_name)
        langs = [*task.official_languages, *task.extra_languages]
        lines += [f"## {task_name}", "", "| lever | held-out en | " + " | ".join(langs)
                  + " | avg targets | gap | paired z | train min | eval pairs/s |", "|---|" + "---|" * (len(langs) + 6)]
        baselines = {r.get("seed"): r for r in levers.get("baseline", [])}
        for lever, runs in levers.items():
            cells = []
            for lang in langs:
                values = [100 * r["dev"][lang]["accuracy"] for r in runs if lang in r["dev"]]
                cells.append(_cell(values))
            summaries = [summarize(r["dev"], task.source_language, "accuracy", task.official_languages) for r in runs]
            avg = _cell([100 * s["avg_target"] for s in summaries if "avg_target" in s])
            gap = _cell([100 * s["gap"] for s in summaries if "gap" in s])
            minutes = _per_kind(kinds, [(r, r["train"].get("train_seconds", 0) / 60) for r in runs if r["train"]], ".1f")
            held_out = _cell([100 * r["train"]["select_accuracy"] for r in runs if r["train"].get("select_accuracy")])
            rate = _per_kind(kinds, [(r, sum(x["n"] for x in r["dev"].values()) / sum(x["seconds"] for x in r["dev"].values()))
                                     for r in runs], ".0f")
            lines.append(f"| {lever} | {held_out or '-'} | " + " | ".join(cells) + f" | **{avg}** | {gap} | "
                         f"{_paired(runs, baselines, seeds[0], task) if lever != 'baseline' else '-'} | "
                         f"{minutes or '-'} | {rate} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def paired_z(mine: dict, theirs: dict, langs) -> float | None:
    """The paired z of one run's per-row correctness against another's, pooled over ``langs`` of their dev
    records (``{lang: {"correct": "0110...", "rows": <hash>}}``): (wins − losses) / √(wins + losses), a win a row
    the first has right and the second wrong (McNemar's statistic, signed); |z| < 2 is row noise. None where a
    language's per-row record is missing from either or the two read different rows."""
    wins = losses = 0
    for lang in langs:
        a, b = mine.get(lang, {}), theirs.get(lang, {})
        if "correct" not in a or "correct" not in b or a.get("rows") != b.get("rows"):
            return None
        wins += sum(x == "1" and y == "0" for x, y in zip(a["correct"], b["correct"]))
        losses += sum(x == "0" and y == "1" for x, y in zip(a["correct"], b["correct"]))
    return (wins - losses) / (wins + losses) ** 0.5 if wins + losses else 0.0


def _paired(runs: list[dict], baselines: dict, first_seed: int, task) -> str:
    """Paired z of each run against the baseline of its seed (an ensemble: of its first member's seed, or
    the first seed's), pooled over the official targets' rows; '' where the baseline of that seed or the
    per-row record is missing."""
    targets = [lang for lang in task.official_languages if lang != task.source_language]
    values = []
    for r in runs:
        seed = r.get("seed")
        if seed is None:  # an ensemble: "ensemble:<task>-<lever>-s<seed>,..."
            members = r.get("run", "").removeprefix("ensemble:").split(",")
            seeds = sorted({int(m.rsplit("-s", 1)[1]) for m in members if m.rsplit("-s", 1)[-1].isdigit()})
            seed = first_seed if first_seed in seeds or not seeds else seeds[0]
        base = baselines.get(seed)
        z = paired_z(r["dev"], base["dev"], targets) if base is not None else None
        if z is not None:
            values.append(f"{z:+.1f}" if z else "0.0")
    return " / ".join(values)


def _kind(run: dict) -> str:
    compute = run.get("compute") or {}
    return compute.get("cpu_bf16_reason") or compute.get("device") or "not recorded"


def _kinds(report: dict) -> dict[str, str]:
    """Each CPU kind the runs were made on, in order of first appearance, with its letter (A, B, ...)."""
    kinds: dict[str, str] = {}
    for levers in report.values():
        for runs in levers.values():
            for r in runs:
                kinds.setdefault(_kind(r), "ABCDEFGH"[len(kinds)])
    return kinds


def _machine(report: dict) -> str:
    kinds = _kinds(report)
    if len(kinds) == 1:
        return next(iter(kinds))
    return "; ".join(f"{letter}: {kind}" for kind, letter in kinds.items())


def _per_kind(kinds: dict[str, str], values: list[tuple[dict, float]], spec: str) -> str:
    """The mean of the values of each CPU kind, lettered where the report holds more than one kind."""
    cells = []
    for kind, letter in kinds.items():
        mine = [v for r, v in values if _kind(r) == kind]
        if mine:
            cells.append(format(mean(mine), spec) + (f" ({letter})" if len(kinds) > 1 else ""))
    return " / ".join(cells)


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    return f"{mean(values):.1f}" + (f" ± {stdev(values):.1f}" if len(values) > 1 else "")


if __name__ == "__main__":
    main()
