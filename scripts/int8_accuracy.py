"""``--int8`` against fp32 on every XNLI dev language: accuracy of each and the share of rows whose
prediction is the same, for one run's prompt, on the first ``--rows`` dev rows of each language
(one process; both passes on the same encoded rows).

    python scripts/int8_accuracy.py --run runs/RUN --rows 300 --out docs/int8_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LANGS = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur"]


def xnli_dev(run, langs: list[str], rows: int):
    """The run's model on the embedded backbone and, per language, its first ``rows`` XNLI dev rows encoded
    with the run's template and their labels (shared by the int8 diagnostics beside this script)."""
    import numpy as np

    from xprompt.backbones import load_backbone
    from xprompt.data import encode, load_split
    from xprompt.model import load_run_model
    from xprompt.store import default_cache_dir
    from xprompt.tasks import load_task

    cache = default_cache_dir()
    bb = load_backbone("e5-small", cache)
    model, card = load_run_model(run, bb)
    task = load_task("xnli")
    data = {}
    for lang in langs:
        ds = load_split(task, lang, "dev")
        ds = ds.select(range(min(rows, len(ds))))
        data[lang] = (encode(ds, task.template_for(lang, card.get("template_style", "agnostic")), bb.tokenizer, 128,
                             cache / "encoded"), np.asarray(ds["label"]))
    return bb, model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=300, help="first N dev rows per language (2,490 = all)")
    parser.add_argument("--langs", default=",".join(LANGS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from xprompt.evaluation import predict
    from xprompt.hardware import eval_batch_size

    bb, model, data = xnli_dev(args.run, args.langs.split(","), args.rows)
    rows, seconds = {}, {"fp32": 0.0, "int8": 0.0}
    for lang, (encoded, labels) in data.items():
        model.verbalizer.use_language(lang)
        out = {}
        for name in ("fp32", "int8"):
            start = time.perf_counter()
            out[name] = predict(model, encoded, eval_batch_size("cpu"), bb.tokenizer.pad_token_id, "fp32",
                                int8=name == "int8")
            seconds[name] += time.perf_counter() - start
        rows[lang] = {"n": len(labels), "fp32": float((out["fp32"] == labels).mean()),
                      "int8": float((out["int8"] == labels).mean()),
                      "agreement": float((out["fp32"] == out["int8"]).mean())}
        rows[lang]["difference"] = rows[lang]["int8"] - rows[lang]["fp32"]
        print(f"{lang}: n {len(labels)}, fp32 {100 * rows[lang]['fp32']:.1f}, int8 {100 * rows[lang]['int8']:.1f}, "
              f"diff {100 * rows[lang]['difference']:+.1f}, same prediction {100 * rows[lang]['agreement']:.1f}%",
              flush=True)
    n = sum(r["n"] for r in rows.values())
    mean = {k: sum(r[k] * r["n"] for r in rows.values()) / n for k in ("fp32", "int8", "agreement")}
    # the noise floor: the standard error of an accuracy difference on n paired rows whose predictions
    # differ on a share d of them is at most sqrt(d / n)
    summary = {"run": str(args.run), "rows_per_language": args.rows, "languages": rows, "mean": mean,
               "mean_difference": mean["int8"] - mean["fp32"],
               "paired_standard_error": (1 - mean["agreement"]) ** 0.5 / n**0.5,
               "seconds": seconds, "cpu_capability": __import__("torch").backends.cpu.get_cpu_capability()}
    print(json.dumps({k: v for k, v in summary.items() if k != "languages"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
