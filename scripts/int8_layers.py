"""Which of a fused layer's four matrix products ``--int8`` can take without moving predictions: for one
run's prompt, the prediction agreement with fp32 when only some projections (qkv, out, up, down) run
on int8 weights, and the size of the activations each projection is given (max |x| over mean |x|,
the outliers a per-tensor int8 scale has to span). Diagnostic for docs/bench.md (issue 34).

    python scripts/int8_layers.py --run runs/RUN --rows 400 --langs en,tr
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

ORDER = ("qkv", "out", "up", "down")  # the order FusedLayer builds its projections in
VARIANTS = ("qkv,out,up,down", "qkv", "out", "up", "down", "qkv,up", "qkv,out,up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=400, help="first N dev rows per language")
    parser.add_argument("--langs", default="en,tr")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np

    import xprompt.fused as fused
    from xprompt.evaluation import predict
    from int8_accuracy import xnli_dev

    chosen, built, stats = set(ORDER), itertools.count(), {}
    init, call = fused._Projection.__init__, fused._Projection.__call__

    def init_some(self, weight, bias, gelu=False, act=None, pack=True, int8=False):
        name = ORDER[next(built) % len(ORDER)]
        init(self, weight, bias, gelu, act, pack, int8 and name in chosen)
        self.name = name

    def call_counting(self, x):
        a = x.detach().float().abs()
        s = stats.setdefault(id(self), {"name": self.name, "max": 0.0, "mean": 0.0, "calls": 0})
        s["max"], s["mean"], s["calls"] = max(s["max"], a.max().item()), s["mean"] + a.mean().item(), s["calls"] + 1
        return call(self, x)

    fused._Projection.__init__ = init_some
    bb, model, data = xnli_dev(args.run, args.langs.split(","), args.rows)

    def scores(lang, int8):
        encoded, labels = data[lang]
        model.verbalizer.use_language(lang)
        preds = predict(model, encoded, 16, bb.tokenizer.pad_token_id, "fp32", int8=int8)
        return preds, float((preds == labels).mean())

    base = {lang: scores(lang, False) for lang in data}
    fused._Projection.__call__ = call_counting
    scores(next(iter(data)), False)
    fused._Projection.__call__ = call
    ratios = {name: [s["max"] / (s["mean"] / s["calls"]) for s in stats.values() if s["name"] == name] for name in ORDER}
    out = {"run": str(args.run), "rows": args.rows,
           "activation_max_over_mean": {k: {"median": float(np.median(v)), "max": float(max(v))} for k, v in ratios.items()},
           "variants": {}}
    for name, r in out["activation_max_over_mean"].items():
        print(f"{name}: input max|x| / mean|x| over layers: median {r['median']:.0f}, largest {r['max']:.0f}")
    for variant in VARIANTS:
        chosen.clear()
        chosen.update(variant.split(","))
        for lang in data:
            preds, acc = scores(lang, True)
            row = {"fp32": base[lang][1], "int8": acc, "agreement": float((preds == base[lang][0]).mean())}
            out["variants"].setdefault(variant, {})[lang] = row
            print(f"int8 on {variant}: {lang} fp32 {100 * row['fp32']:.1f}, int8 {100 * row['int8']:.1f}, "
                  f"same prediction {100 * row['agreement']:.1f}%", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
