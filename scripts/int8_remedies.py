"""Two remedies for ``--int8``'s per-tensor activation scale, tried on one run's prompt (issue 34,
docs/bench.md): agreement with fp32 of (a) SmoothQuant-style smoothing (x / s, W * s with
s = max|x|^alpha / max|W|^(1 - alpha) per input channel, recomputed for every call, so the weights are
re-quantised every call), (b) the largest-input channels of each product kept in fp32 (LLM.int8()-style;
the channel set chosen on each scoring pass's first batch), and, for scale, bf16 against fp32. With
``--speed``, the seconds of fp32, plain int8 and (a) over the same rows (the imitated AVX2 kind is the
caller's environment).

    python scripts/int8_remedies.py --run runs/RUN --rows 400 --langs en,tr
    ATEN_CPU_CAPABILITY=avx2 ... python scripts/int8_remedies.py --run runs/RUN --speed --langs de --rows 320
"""

from __future__ import annotations

import argparse
import time

REMEDY = {"kind": None, "alpha": 0.85, "fraction": 0.03}


def patch(fused, F, torch) -> None:
    init, call = fused._Projection.__init__, fused._Projection.__call__

    def init_keep(self, weight, bias, gelu=False, act=None, pack=True, int8=False):
        self.w32, self.b32, self.channels = weight.detach().float(), bias.detach().float(), None
        init(self, weight, bias, gelu, act, pack, int8)

    def call_remedied(self, x):
        if self.int8 is None or REMEDY["kind"] is None:
            return call(self, x)
        rows = x.reshape(-1, x.shape[-1]).float()
        if REMEDY["kind"] == "smooth":
            a = REMEDY["alpha"]
            s = (rows.abs().amax(0).clamp_min(1e-5).pow(a) / self.w32.abs().amax(0).clamp_min(1e-5).pow(1 - a))
            s = s.clamp_min(1e-5)
            y = torch.ops.quantized.linear_dynamic(rows / s, fused._int8_pack(self.w32 * s, self.b32), True)
        else:
            if self.channels is None:
                k = max(1, int(REMEDY["fraction"] * rows.shape[1]))
                self.channels = rows.abs().amax(0).topk(k).indices
                rest = self.w32.clone()
                rest[:, self.channels] = 0
                self.rest, self.kept = fused._int8_pack(rest, self.b32), self.w32[:, self.channels].contiguous()
            quantised = rows.clone()
            quantised[:, self.channels] = 0
            y = torch.ops.quantized.linear_dynamic(quantised, self.rest, True) + rows[:, self.channels] @ self.kept.T
        y = F.gelu(y) if self.gelu else y
        y = self.act(y) if self.act is not None else y
        return y.view(*x.shape[:-1], y.shape[-1])

    fused._Projection.__init__, fused._Projection.__call__ = init_keep, call_remedied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--langs", default="en,tr")
    parser.add_argument("--speed", action="store_true", help="time fp32, int8 and smoothed int8 (3 repeats)")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    import xprompt.fused as fused
    from xprompt.evaluation import predict
    from int8_accuracy import xnli_dev

    patch(fused, F, torch)
    bb, model, data = xnli_dev(args.run, args.langs.split(","), args.rows)
    for lang, (encoded, labels) in data.items():
        model.verbalizer.use_language(lang)

        def scored(kind, dtype="fp32", int8=True):
            REMEDY["kind"] = kind
            start = time.perf_counter()
            preds = predict(model, encoded, 16, bb.tokenizer.pad_token_id, dtype, int8=int8)
            return preds, time.perf_counter() - start

        if args.speed:
            times = {}
            for _ in range(3):
                for name, kind, int8 in (("fp32", None, False), ("int8", None, True), ("int8 smoothed", "smooth", True)):
                    times.setdefault(name, []).append(scored(kind, int8=int8)[1])
            print(lang, ", ".join(f"{k} {np.median(v):.2f} s" for k, v in times.items()), flush=True)
            continue
        base = scored(None, int8=False)[0]
        for name, preds in (("bf16", scored(None, "bf16", False)[0]), ("int8", scored(None)[0]),
                            (f"int8 smoothed (alpha {REMEDY['alpha']})", scored("smooth")[0]),
                            (f"int8, {100 * REMEDY['fraction']:.0f}% of channels in fp32", scored("split")[0])):
            print(f"{lang} {name}: fp32 {100 * (base == labels).mean():.1f}, this {100 * (preds == labels).mean():.1f}, "
                  f"same prediction {100 * (preds == base).mean():.1f}%", flush=True)


if __name__ == "__main__":
    main()
