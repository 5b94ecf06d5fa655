"""Which float32 matrix product the fused layers should run on this CPU: MKL's sgemm (``F.linear``)
or oneDNN's kernel on a weight packed once (``mkldnn._linear_pointwise``), timed at the shapes of an
e5-small / BERT-base-like layer (QKV, output, intermediate with GELU, down) for the row counts an
evaluation batch of 32 sequences gives. Each CPU kind runs in its own fresh process: ``native`` is
this CPU as it is, ``avx2`` the imitated AVX2-only CPU (the four variables of ``scripts/bench.py``,
so that neither MKL nor oneDNN uses AVX-512). ``hardware.compute`` decides the packing rule from these
figures (``pack_float32``).

    python scripts/pack_rule.py --kinds native,avx2 --threads 2 --repeats 30 --out docs/pack_rule.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from bench import AVX2_ENV  # noqa: E402  (the imitated AVX2-only CPU: one definition, bench.py's)
# (name, in, out, GELU) of one layer of hidden 384 / intermediate 1536 (e5-small)
SHAPES = [("qkv", 384, 1152, False), ("out", 384, 384, False), ("up+gelu", 384, 1536, True), ("down", 1536, 384, False)]


def worker(rows: list[int], repeats: int, threads: int) -> dict:
    import torch

    from xprompt.fused import _Projection
    from xprompt.hardware import cpu_capability

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {"capability": cpu_capability(), "threads": threads, "cells": []}
    with torch.no_grad():
        for n in rows:
            for name, k, m, gelu in SHAPES:
                x, w, b = torch.randn(n, k), torch.randn(m, k) / k**0.5, torch.randn(m)
                sgemm, packed = _Projection(w, b, gelu=gelu, pack=False), _Projection(w, b, gelu=gelu, pack=True)
                if packed.packed is None:
                    raise SystemExit("this PyTorch has no oneDNN packing: nothing to compare")
                diff = (sgemm(x) - packed(x)).abs().max().item()
                times = {"sgemm": [], "packed": []}
                for i in range(repeats + 3):  # alternated, the first three of each thrown away
                    for label, fn in (("sgemm", sgemm), ("packed", packed)):
                        start = time.perf_counter()
                        fn(x)
                        if i >= 3:
                            times[label].append(time.perf_counter() - start)
                s, p = median(times["sgemm"]), median(times["packed"])
                out["cells"].append({"rows": n, "shape": name, "sgemm_ms": s * 1e3, "packed_ms": p * 1e3,
                                     "packed_speedup": s / p, "gflop_s_packed": 2 * n * k * m / p / 1e9,
                                     "max_abs_diff": diff})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="native,avx2")
    parser.add_argument("--rows", default="704,1400,2000,3136", help="rows of one product (batch x length)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.worker:
        print(json.dumps(worker(rows, args.repeats, args.threads)))
        return
    results = {}
    for kind in args.kinds.split(","):
        env = {**os.environ, **(AVX2_ENV if kind == "avx2" else {})}
        cmd = [sys.executable, __file__, "--worker", "--rows", args.rows, "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        results[kind] = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    print("| CPU kind | capability | rows | product | sgemm ms | packed ms | packed speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, res in results.items():
        for c in res["cells"]:
            print(f"| {kind} | {res['capability']} | {c['rows']} | {c['shape']} | {c['sgemm_ms']:.2f} | "
                  f"{c['packed_ms']:.2f} | {c['packed_speedup']:.2f}x | {c['max_abs_diff']:.1e} |")
        total_s = sum(c["sgemm_ms"] for c in res["cells"])
        total_p = sum(c["packed_ms"] for c in res["cells"])
        res["total_speedup"] = total_s / total_p
        print(f"| {kind} | {res['capability']} | all | sum | {total_s:.1f} | {total_p:.1f} | {total_s / total_p:.2f}x | |")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
