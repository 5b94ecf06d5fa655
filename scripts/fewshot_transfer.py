"""Few-shot targets started from the prompt library, from a pre-trained (PPT) prompt, or from the
vocabulary (SPoT's and PPT's question).

    python scripts/fewshot_transfer.py --library runs/library --runs-dir runs/fewshot --out docs/fewshot_transfer
    python scripts/fewshot_transfer.py --library runs/library --ppt runs/ppt/PPT_RUN --eval-langs all:xnli \
        --out docs/fewshot_ppt                          # + the PPT start; XNLI scored on every language

For each target (default OCNLI/zh, XNLI/en, PAWS-X/en) and seed, two `xprompt train --shots 16` runs
with the same budget: the default start (vocabulary-sampled prompt, class-mean label vectors) and
`--init-from library --library LIB` (other tasks' prompts only). Each is then evaluated on the target's
full dev set. Reported per target and start, mean +- std over seeds: dev accuracy, and the steps each
run needed to reach the vocabulary run's final selection accuracy (same seed), read from the
selection curve in log.jsonl (held-out 16-per-class rows, every --eval-every steps).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

XPROMPT = [sys.executable, "-m", "xprompt"]


def run(*args: str) -> None:
    print("+ xprompt " + shlex.join(args), flush=True)
    if subprocess.run([*XPROMPT, *args]).returncode != 0:
        sys.exit(f"xprompt {args[0]} failed; rerun this script to continue (finished runs are kept)")


def curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["select_accuracy"]) for r in rows if "select_accuracy" in r]


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in points if acc >= target - 1e-9), None)


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "n/a"
    sd = stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean(values):.1f} ± {scale * sd:.1f}"


def main() -> None:
    from xprompt.tasks import load_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, help="the prompt library (scripts/build_library.py); needed by the "
                        "library start")
    parser.add_argument("--starts", default="vocab,library,ppt",
                        help="which starts to run, of vocab, library and ppt (ppt also needs --ppt)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/fewshot"))
    parser.add_argument("--targets", default="ocnli:zh,xnli:en,pawsx:en")
    parser.add_argument("--seeds", default="13,21,42,87,100")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/fewshot_transfer"))
    parser.add_argument("--ppt", type=Path, help="a pre-trained prompt's run (xprompt pretrain): a third start")
    parser.add_argument("--eval-langs", default="source",
                        help="'source' (the target's language), 'all' (every dev language; the target's own figure "
                             "is its training language's, the others are reported beside it), or 'all:TASK[+TASK]' "
                             "(every language for those tasks only, e.g. all:xnli)")
    args, extra = parser.parse_known_args()  # more `xprompt train` flags for the library arm, e.g. --transfer average
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.starts.split(",")
    if "library" in wanted and args.library is None:
        parser.error("the library start needs --library (or leave it out of --starts)")
    starts = {"vocab": [], "library": ["--init-from", "library", "--library", str(args.library), *extra]}
    if args.ppt:
        starts["ppt"] = ["--init-from", str(args.ppt)]
    starts = {name: flags for name, flags in starts.items() if name in wanted}
    results = {}
    for target in args.targets.split(","):
        task, lang = target.split(":")
        for start, flags in starts.items():
            for seed in seeds:
                name = f"{task}-{lang}-k{args.shots}-{start}-s{seed}"
                run_dir = args.runs_dir / name
                if not (run_dir / "prompt" / "prompt.safetensors").is_file():
                    if (run_dir / "checkpoint" / "state.json").is_file():
                        run("train", "--resume", str(run_dir))
                    else:
                        run("train", "--task", task, "--lang", lang, "--shots", str(args.shots), "--seed", str(seed),
                            "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
                            "--runs-dir", str(args.runs_dir), "--run-name", name, *flags)
                metrics = json.loads((run_dir / "metrics.json").read_text())
                scored = metrics.get("eval", {}).get(task, {}).get("dev", {})
                every = args.eval_langs == "all" or (args.eval_langs.startswith("all:")
                                                     and task in args.eval_langs[4:].split("+"))
                wanted = "all" if every else lang
                if lang not in scored or (wanted == "all" and len(scored) < 2):
                    run("eval", "--run", str(run_dir), "--langs", wanted)
                    metrics = json.loads((run_dir / "metrics.json").read_text())
                    scored = metrics["eval"][task]["dev"]
                others = {x: r["accuracy"] for x, r in scored.items() if x != lang and r.get("accuracy") is not None}
                results[(target, start, seed)] = {
                    "others": others,
                    "dev": metrics["eval"][task]["dev"][lang]["accuracy"],
                    "select": metrics["train"]["select_accuracy"],
                    "curve": curve(run_dir),
                    "init": metrics["train"]["init"],
                }

    lines = [f"{args.shots}-shot targets, {args.max_steps} steps, seeds {args.seeds}; dev accuracy on the full dev set "
             f"(mean ± std); steps to reach the vocabulary start's final selection accuracy (same seed; selection "
             f"curve every {args.eval_every} steps; 'reached' counts the seeds that got there).", "",
             "| target | start | dev accuracy | other languages (official targets, mean) | accuracy at step 0 (selection) | steps to vocab final | reached |",
             "|---|---|---|---|---|---|---|"]
    table = []
    for target in args.targets.split(","):
        for start in starts:
            dev = [results[(target, start, s)]["dev"] for s in seeds]
            at0 = [results[(target, start, s)]["curve"][0][1] for s in seeds]
            needed = []
            for s in seeds:
                goal = results.get((target, "vocab", s), {}).get("select")  # None without the vocab start
                needed.append(None if goal is None else steps_to(results[(target, start, s)]["curve"], goal))
            reached = [n for n in needed if n is not None]
            steps_text = fmt([float(n) for n in reached], 1.0) if reached else "never"
            official = load_task(target.split(":")[0]).official_targets
            other = [mean(v for x, v in results[(target, start, s)]["others"].items() if x in official)
                     for s in seeds if any(x in official for x in results[(target, start, s)]["others"])]
            other_text = f"{fmt(other)} ({len(other)} seed{'s' if len(other) > 1 else ''})" if other else "-"
            lines.append(f"| {target} | {start} | {fmt(dev)} | {other_text} | {fmt(at0)} | "
                         f"{steps_text} | {len(reached)}/{len(seeds)} |")
            table.append({"target": target, "start": start, "dev": dev, "select_at_step0": at0, "steps_to_vocab_final": needed,
                          "other_languages_mean": other})
    sources = {}
    for (target, start, seed), r in results.items():
        if start == "library":
            sources.setdefault(target, []).append(r["init"])
    lines += ["", "Library starts chosen (one line per seed):", ""]
    lines += [f"- {t} s{seed}: {init}" for t, inits in sources.items() for seed, init in zip(seeds, inits)]
    if args.ppt:
        corpus = json.loads((args.ppt / "pretraining" / "corpus.json").read_text())
        lines += ["", f"PPT start: {args.ppt} (pre-trained on {corpus['rows']} rows from {corpus['documents']} documents, "
                      f"{corpus['sentences']} sentences: {corpus['corpus']})."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"library": str(args.library),
                                                        "runs_dir": str(args.runs_dir), "out": str(args.out),
                                                        "ppt": str(args.ppt) if args.ppt else None},
                                                        "extra": extra, "rows": table}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
