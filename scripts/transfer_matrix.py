"""Zero-shot cross-task transfer between the prompts of a library, and how well prompt similarity
predicts it (Su et al. 2022, "On Transferability of Prompt Tuning").

    python scripts/transfer_matrix.py --library runs/library --limit 300 --out docs/transfer_matrix

For every target task (each library prompt's task and language, plus --extra-targets such as AFQMC,
which has no training split) it runs `xprompt library transfer` (each library prompt applied unchanged
to the first --limit dev rows; label vectors the prompt's own for the target's own task or a task the
card maps labels from, else class means of 256 target training rows read through it; n/a where
neither exists). For every pair of library prompts it runs
`xprompt library similar` (flat cosine, mean cosine, activated-neuron overlap). It writes
<out>.json and <out>.md: the source x target accuracy matrix, the relative transfer
(accuracy of source on target / accuracy of the target's own prompt), and the Spearman correlation
of each similarity measure with the relative transfer over all off-diagonal pairs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from scipy.stats import spearmanr

XPROMPT = [sys.executable, "-m", "xprompt"]
MEASURES = ("flat", "mean", "neurons")


def xprompt_json(*args: str) -> dict:
    out = subprocess.run([*XPROMPT, *args, "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--backbone", default="e5-small")
    parser.add_argument("--extra-targets", default="afqmc:zh", help="task:lang pairs without a library prompt")
    parser.add_argument("--out", type=Path, default=Path("docs/transfer_matrix"))
    args = parser.parse_args()

    prompts = {}  # run name -> (task, lang)
    for card in sorted(args.library.glob("*/prompt/xprompt.json")):
        meta = json.loads(card.read_text())
        prompts[card.parent.parent.name] = (meta["task"], meta["train_language"])
    own = {value: run for run, value in prompts.items()}  # (task, lang) -> its prompt (one per task here)
    targets = sorted(set(prompts.values())) + [tuple(t.split(":")) for t in args.extra_targets.split(",") if t]

    accuracy: dict[str, dict[str, float]] = {}  # target "task/lang" -> source run -> accuracy
    majority = {}
    for task, lang in targets:
        print(f"transfer to {task}/{lang}", flush=True)
        result = xprompt_json("library", "transfer", "--task", task, "--lang", lang, "--limit", str(args.limit),
                              "--runs-dir", str(args.library), "--backbone", args.backbone)
        accuracy[f"{task}/{lang}"] = {r["run"]: r["accuracy"] for r in result["transfer"]}
        majority[f"{task}/{lang}"] = result["majority"]

    similarity: dict[str, dict[str, dict]] = {}  # run -> other run -> measures
    for run in prompts:
        print(f"similarity of {run}", flush=True)
        result = xprompt_json("library", "similar", str(args.library / run), "--runs-dir", str(args.library),
                              "--top-k", "1000")
        similarity[run] = {r["run"]: {m: r[m] for m in MEASURES} for r in result["similar"]}

    pairs = []  # off-diagonal (source prompt, target with its own prompt)
    for target, by_source in accuracy.items():
        task, lang = target.split("/")
        target_run = own.get((task, lang))
        if target_run is None:
            continue
        for source, acc in by_source.items():
            if source == target_run or acc is None:
                continue
            pairs.append({"source": source, "target": target, "accuracy": acc,
                          "relative": acc / by_source[target_run],
                          **{m: similarity[source][target_run][m] for m in MEASURES}})
    correlations = {}
    for m in MEASURES:
        rho, p = spearmanr([q[m] for q in pairs], [q["relative"] for q in pairs])
        correlations[m] = {"spearman": float(rho), "p": float(p), "pairs": len(pairs)}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"library": str(args.library), "split": "dev", "limit": args.limit, "accuracy": accuracy,
              "majority": majority, "pairs": pairs, "spearman_similarity_vs_relative_transfer": correlations}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    sources = list(prompts)
    lines = [f"Zero-shot transfer, dev accuracy on the first {args.limit} rows of each target "
             "(rows: source prompts; columns: targets; diagonal: the target's own prompt).", "",
             "| source \\ target | " + " | ".join(accuracy) + " |", "|---|" + "---|" * len(accuracy)]
    for s in sources:
        cells = []
        for target, by_source in accuracy.items():
            mark = "**" if own.get(tuple(target.split("/"))) == s else ""
            acc = by_source.get(s)
            cells.append("n/a" if acc is None else f"{mark}{100 * acc:.1f}{mark}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| majority label | " + " | ".join(f"{100 * majority[t]:.1f}" for t in accuracy) + " |")
    lines += ["", "Spearman correlation of prompt similarity (source prompt vs the target's own prompt) with "
              f"relative transfer (source accuracy / own-prompt accuracy), over {len(pairs)} off-diagonal pairs:", "",
              "| measure | Spearman rho | p |", "|---|---|---|"]
    for m, c in correlations.items():
        lines.append(f"| {m} | {c['spearman']:+.3f} | {c['p']:.3g} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
