"""The UniPrompt paper's own experiment (Huang et al. 2022) in xprompt's harness: MARC k-shot, every
baseline the paper and the field compare against, on one backbone (issue 32).

Each configuration is trained through the CLI on the UniPrompt authors' published English k-shot split
(``xprompt train --task marc --shots K --seed S``: their exact train rows, selection on their K-per-class
English dev split of the same seed), then scored zero-shot on the full ``marc/dev`` set of every
language (``xprompt eval --langs all``). Nothing is chosen on a target language. The table gives
English, each target, the target average (de es fr ja zh) and the gap as mean ± sample std over
seeds, the training time, the trainable parameters and the bytes the run stores.

    python scripts/uniprompt_table.py                                   # the whole grid (long: see GRID)
    python scripts/uniprompt_table.py --methods default,head --shots 16 --seeds 42
    python scripts/uniprompt_table.py --render-only                     # tabulate what is scored
    python scripts/uniprompt_table.py --shots 16,256 --seeds 42 --test-predictions   # marc.test.<lang>.tsv per run

It resumes: a trained or scored run is not redone. The JSON beside ``--out`` keeps every run's record
(so a figure survives its run folder). Lanes may share one ``--out``: each merges its records into the
JSON under a lock, and the table renders every stored run. ``--drop-weights`` deletes a full/head run's
backbone weights once its records (and test predictions, when asked) are written, with its resume
checkpoint, and the record says so.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from close_gap import paired_z  # noqa: E402  (one definition of the paired z, close_gap.py's)

XPROMPT = [sys.executable, "-m", "xprompt"]

# The paper's fine-tuning regime (mojave-pku/UniPrompt main_exp.sh): lr 1e-5, batch 2, 1,000 steps,
# selection every 100 steps on the English k-shot dev split.
# Their trainer (transformers 3.4's) clips the gradient norm at 1.0; the rest of the deviations that remain are in
# docs/uniprompt_deviations.md.
PAPER = ["--backbone-lr", "1e-5", "--batch-size", "2", "--max-steps", "1000", "--eval-every", "100",
         "--max-grad-norm", "1.0"]
METHODS = {
    "head": ("vanilla fine-tuning (pooled state + linear head, whole model)", ["--tune", "head", *PAPER, "--lr", "1e-5"]),
    "full": ("prompt-based fine-tuning, soft label words (LM-BFF style)",
             ["--tune", "full", "--method", "soft", "--prompt-length", "1", "--verbalizer", "soft", *PAPER, "--lr", "1e-5"]),
    "uniprompt": ("UniPrompt, the authors' setting (the template through the prompt tower, whole model tuned)",
                  ["--tune", "full", "--method", "unified", "--prompt-text", "It's <mask>.", "--tower-layers", "9",
                   "--verbalizer", "soft", *PAPER, "--lr", "1e-5"]),
    "default": ("xprompt default (frozen backbone, deep prompt)", ["--eval-every", "100"]),
    "soft": ("soft prompt (frozen backbone, Lester et al.)", ["--method", "soft", "--eval-every", "100"]),
    "unified": ("UniPrompt's two towers, frozen backbone", ["--method", "unified", "--eval-every", "100"]),
    "lora": ("LoRA (PEFT) + prompt", ["--tune", "lora", "--eval-every", "100"]),
}
# which K each method runs at (issue 32: K = 16 and 256 for every method; 4, 16, 64, 256 for the default
# prompt, UniPrompt and vanilla fine-tuning)
GRID = {name: ([4, 16, 64, 256] if name in ("default", "uniprompt", "head") else [16, 256]) for name in METHODS}
SEEDS = [13, 21, 42, 87, 100]
# the comparisons the notes read, each as A:B (the method keys above): the paper's claims (UniPrompt against both
# fine-tunings), Tu et al.'s (the frozen methods against fine-tuning) and the frozen methods against the default
PAIRS = ["uniprompt:full", "uniprompt:head", "full:head", "uniprompt:default", "full:default", "default:head",
         "soft:default", "unified:default", "lora:default", "soft:full", "unified:full", "lora:full", "soft:uniprompt",
         "unified:uniprompt", "lora:uniprompt", "soft:head", "unified:head", "lora:head"]


def scorable(folder: Path, task, langs: list[str]) -> list[str]:
    """The languages of ``marc/dev`` with a row left to score for the run in ``folder``: its lineage's labelled
    reads of ``marc/dev`` are never scored, and marc/dev of each language is the K = 256, seed 13 k-shot dev split
    less every k-shot train row (the data's MANIFEST), so the run of that K and seed, which selects on marc/dev's
    English rows, has no English figure (``xprompt eval`` refuses such a language) and is scored on the rest."""
    from xprompt.data import load_split
    from xprompt.lineage import excluded_ids, load_lineage

    read = excluded_ids(load_lineage(folder), task.name, "dev")
    return [lang for lang in langs if not read.get(lang) or set(load_split(task, lang, "dev")["id"]) - read[lang]]


def run_name(method: str, shots: int, seed: int) -> str:
    return f"marc-{method}-k{shots}-s{seed}"


def call(args: list[str]) -> float:
    print("+ xprompt " + shlex.join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([*XPROMPT, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def scored(folder: Path, langs: list[str]) -> bool:
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        return False
    dev = json.loads(metrics.read_text()).get("eval", {}).get("marc", {}).get("dev", {})
    return all(lang in dev and dev[lang].get("limit") is None for lang in langs)


def record(folder: Path, method: str, shots: int) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    return {"run": folder.name, "method": method, "shots": shots, "seed": config.get("train", {}).get("seed"),
            "dev": metrics["eval"]["marc"]["dev"], "train": metrics.get("train", {}), "compute": config.get("compute", {}),
            "stored_bytes": sum(p.stat().st_size for p in (folder / "prompt").rglob("*") if p.is_file())}


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def paired(records: list[dict], pairs: list[str], targets: list[str]) -> list[str]:
    """A row per pair A:B and K where both have a seed in common: the paired z of A against B over the target
    rows of each common seed (close_gap.paired_z), and on how many of them A is ahead."""
    runs = {(r["method"], r["shots"], r["seed"]): r for r in records}
    lines = ["## Paired z per seed", "",
             "A against B on the same seed, pooled over the 5 target languages' `marc/dev` rows (about 6,220): "
             "(wins − losses) / √(wins + losses), a win a row A has right and B wrong; |z| < 2 is row noise. "
             "Rendered with the table (`--paired A:B,...`; the default is PAIRS in the script).", "",
             "| A | B | K | z per seed | A ahead | mean target difference |", "|---|---|---|---|---|---|"]
    for pair in pairs:
        a, _, b = pair.partition(":")
        if a not in METHODS or b not in METHODS:
            raise SystemExit(f"uniprompt_table: --paired {pair!r} is not A:B of two methods of {', '.join(METHODS)}")
        for shots in sorted({k for (m, k, _) in runs if m == a} & {k for (m, k, _) in runs if m == b}):
            zs, diffs = [], []
            for seed in [42, *(s for s in SEEDS if s != 42)]:  # seed 42 first, as the notes read them
                mine, theirs = runs.get((a, shots, seed)), runs.get((b, shots, seed))
                z = paired_z(mine["dev"], theirs["dev"], targets) if mine and theirs else None
                if z is not None:
                    zs.append((seed, z))
                    diffs.append(100 * statistics.fmean(mine["dev"][t]["accuracy"] - theirs["dev"][t]["accuracy"]
                                                        for t in targets))
            if zs:
                lines.append(f"| {a} | {b} | {shots} | " + ", ".join(f"{seed}: {z:+.1f}" for seed, z in zs) +
                             f" | {sum(d > 0 for d in diffs)} of {len(diffs)} | {_cell(diffs)} |")
    return lines


def render(records: list[dict], pairs: list[str] = PAIRS) -> str:
    from xprompt.tasks import load_task

    task = load_task("marc")
    source = task.source_language
    targets = [lang for lang in task.official_languages if lang != source]
    lines = ["# UniPrompt's experiment on MARC: every method in one harness", "",
             "Dev split (`marc/dev`, about 1,245 rows per language, full), accuracy × 100, mean ± sample std over "
             "seeds; trained on the UniPrompt authors' English k-shot split of each seed, chosen on its English "
             "k-shot dev split; zero-shot to de es fr ja zh. Command: `python scripts/uniprompt_table.py` (its "
             "docstring). Train minutes and CPU kind per row; stored bytes: what the run keeps to be applied again.", "",
             "| method | K | seeds | " + " | ".join([source, *targets]) + " | target average | gap | train min | "
             "trainable parameters | stored MB | CPU, dtype |", "|---|---|---|" + "---|" * (len(targets) + 7)]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    order = list(METHODS)
    for (method, shots), runs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        cells = [_cell([100 * r["dev"][lang]["accuracy"] for r in runs if lang in r["dev"]]) for lang in (source, *targets)]
        unscored = sum(source not in r["dev"] for r in runs)  # a run that selected on marc/dev's English rows
        if unscored:
            cells[0] += f" ({len(runs) - unscored} seeds: K = {shots}, seed 13 selects on these rows)"
        averages = [100 * statistics.fmean(r["dev"][lang]["accuracy"] for lang in targets) for r in runs]
        gaps = [100 * r["dev"][source]["accuracy"] - a for r, a in zip(runs, averages) if source in r["dev"]]
        kinds = sorted({f"{r['compute'].get('cpu_bf16_reason') or r['compute'].get('cpu_capability', '?')}, "
                        f"{r['train'].get('dtype', '?')}" for r in runs})
        params = sorted({r["train"].get("trainable_parameters") for r in runs} - {None})
        stored = [r["stored_bytes"] / 2**20 for r in runs]  # what the run stored, also where its weights were dropped since
        dropped = " (weights dropped after scoring)" if any(r.get("weights_dropped") for r in runs) else ""
        lines.append(f"| {METHODS[method][0]} | {shots} | {len(runs)} | " + " | ".join(cells) + f" | **{_cell(averages)}** | "
                     f"{_cell(gaps)} | {_cell([r['train'].get('train_seconds', 0) / 60 for r in runs])} | "
                     f"{', '.join(f'{p:,}' for p in params) or '-'} | {_cell(stored)}{dropped} | {'; '.join(kinds)} |")
    if pairs:
        lines += ["", *paired(records, pairs, targets)]
    return "\n".join(lines) + "\n"


def stored_runs(runs: list[dict], mine: dict[str, dict]) -> list[dict]:
    """The store's records with this process's runs put in: a stored run is replaced in place, a new one
    appended, and the runs another lane stored meanwhile stay."""
    names = {r["run"] for r in runs}
    return [mine.get(r["run"], r) for r in runs] + [r for name, r in mine.items() if name not in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shots", help="comma-separated K (default: each method's K in GRID)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/marc"))
    parser.add_argument("--out", type=Path, default=Path("docs/uniprompt_marc.md"))
    parser.add_argument("--render-only", action="store_true", help="train and score nothing: tabulate the stored records")
    parser.add_argument("--test-predictions", action="store_true",
                        help="also write every language's marc/test predictions of each run into --predictions-out/<run>/")
    parser.add_argument("--predictions-out", type=Path, default=Path("docs/predictions/marc"))
    parser.add_argument("--paired", default=",".join(PAIRS),
                        help="comma-separated A:B of methods: a table of A's paired z against B per seed and K "
                             "(default: PAIRS in the script; '' for none)")
    parser.add_argument("--drop-weights", action="store_true",
                        help="delete a full/head run's backbone weights and resume checkpoint once its records are written (the record says so)")
    args = parser.parse_args()
    from xprompt.fileio import update_json
    from xprompt.tasks import load_task

    task = load_task("marc")
    langs, test_langs = list(task.split_languages("dev")), list(task.split_languages("test"))
    store = args.out.with_suffix(".json")
    kept = {r["run"]: r for r in json.loads(store.read_text())["runs"]} if store.is_file() else {}
    mine: dict[str, dict] = {}
    wanted = [int(s) for s in args.shots.split(",")] if args.shots else None
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"uniprompt_table: unknown method {method!r}; choose from {', '.join(METHODS)}")
        for shots in [k for k in (wanted or GRID[method])]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                name, folder = run_name(method, shots, seed), args.runs_dir / run_name(method, shots, seed)
                if args.render_only or (name in kept and not folder.is_dir()):
                    continue
                if not (folder / "prompt" / "prompt.safetensors").is_file():
                    call(["train", "--task", "marc", "--shots", str(shots), "--seed", str(seed), "--runs-dir",
                          str(args.runs_dir), "--run-name", name, *METHODS[method][1]])
                scoring = scorable(folder, task, langs)
                if not scored(folder, scoring):
                    call(["eval", "--run", str(folder), "--langs", "all" if scoring == langs else ",".join(scoring)])
                kept[name] = record(folder, method, shots)
                if args.test_predictions:
                    files = [folder / "predictions" / f"marc.test.{lang}.tsv" for lang in test_langs]
                    if not all(f.is_file() for f in files):
                        call(["eval", "--run", str(folder), "--langs", "all", "--split", "test"])
                    out = args.predictions_out / name
                    out.mkdir(parents=True, exist_ok=True)
                    [shutil.copyfile(f, out / f.name) for f in files]
                if args.drop_weights and method in ("head", "full", "uniprompt"):
                    for weights in (folder / "prompt").glob("backbone*.safetensors"):
                        weights.unlink()
                    # and the finished run's resume checkpoint (the backbone and AdamW's moments: 2.1 GB for
                    # e5-small), which nothing reads once the run is finished
                    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
                    kept[name]["weights_dropped"] = True
                mine[name] = kept[name]  # stored after every run, merged with what other lanes stored
                update_json(store, lambda data: {"runs": stored_runs(data.get("runs", []), mine)},
                            dump=lambda data: json.dumps(data, indent=1) + "\n")
    runs = json.loads(store.read_text())["runs"] if store.is_file() else []
    table = render(runs, [p for p in args.paired.split(",") if p])
    notes = args.out.read_text() if args.out.is_file() else ""
    notes = notes[notes.find("## What the figures say"):] if "## What the figures say" in notes else ""
    args.out.write_text(table + ("\n" + notes if notes else ""))
    print(table)


if __name__ == "__main__":
    main()
