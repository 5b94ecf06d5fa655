"""Throughput of mixed-prompt batches (``xprompt/mixed.py``) against one prompt per batch, in one process.

(a) an ensemble of K prompts scoring the same rows (``eval --run A,B,C``, ``predict`` with several
runs): the members one after another (``probabilities`` of each, the former path) against one mixed
stream (``evaluation.member_probabilities``: the rows once per member, about ``--batch`` (row,
member) pairs per pass) and against ``EnsembleModel`` as ``eval`` runs it (``--batch`` rows per
pass, each replicated K times).
(b) P prompts each scoring rows of its own (``library transfer`` style, or a service labelling
several users' rows): per-prompt batches (``probabilities`` over each prompt's rows) against one
stream of mixed batches (``--batch`` rows, each with its own prompt), at two sizes of a prompt's share.

Prompts are random (throughput does not depend on their values) on the embedded ``e5-small``, of
the default length, label vectors (centered) read by the mean. Every figure is rows (or row-member
pairs) per second, the median of ``--repeats`` repeats taken in turn in this one process (the
systems alternate within a repeat), for ``deep`` (the default method) and ``soft``, in fp32 and in
the dtype ``--dtype auto`` resolves to here. The machine may be shared: compare ratios.

    python scripts/bench_mixed.py --rows 128 --repeats 3 --out docs/mixed_batches.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent


def cpu_kind() -> dict:
    import torch

    from xprompt.hardware import cpu_bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_tile" in flags, "threads": torch.get_num_threads(), "bf16_native": cpu_bf16()[0]}


def rows(n: int, offset: int = 0):
    """MNLI English training rows (XNLI's length and fields) from the tests' data (120, taken in a
    cycle), as an xnli split."""
    from datasets import Dataset

    from xprompt.tasks import load_task

    task = load_task("xnli")
    lines = (ROOT / "tests" / "data" / "mnli" / "train_9k.en.jsonl").read_text().splitlines()
    records = [json.loads(lines[i % len(lines)]) for i in range(offset, offset + n)]
    return task, Dataset.from_dict({"id": [str(i) for i in range(offset, offset + n)], "premise": [r["premise"] for r in records],
                                    "hypothesis": [r["hypothesis"] for r in records],
                                    "label": [task.labels.index(r["label"]) for r in records]})


def prompts(backbone, method: str, count: int, length: int, seed: int = 0):
    import torch

    from xprompt.model import build_model
    from xprompt.verbalizers import CenteredVerbalizer

    models = []
    for k in range(count):
        torch.manual_seed(seed + k)
        model = build_model(backbone, 3, method, length, "mean",
                            verbalizer=CenteredVerbalizer(3, backbone.hidden_size))
        with torch.no_grad():
            for p in model.prompt.parameters():
                p.normal_(0, 0.05)
            model.verbalizer.weight.normal_(0, 0.05)
        models.append(model.eval())
    return models


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mixed_stream(mixed, encoded, owner, batch: int, pad: int, dtype):
    """Each row scored by its own prompt (``owner[row]``), ``batch`` rows of any prompts per pass."""
    import torch

    from xprompt.data import batches
    from xprompt.hardware import compute

    owner = torch.as_tensor(owner)
    with torch.inference_mode(), compute(mixed, dtype, "cpu"):
        for b in batches(encoded, batch, pad):
            mixed(b, owner[b["index"]])


def measure(backbone, method: str, dtype: str, args) -> dict:
    import numpy as np
    import torch

    from xprompt.data import encode
    from xprompt.evaluation import member_probabilities, predict, probabilities
    from xprompt.mixed import MixedModel
    from xprompt.model import EnsembleModel

    pad = backbone.tokenizer.pad_token_id
    task, ds = rows(args.rows)
    encoded = encode(ds, task.template, backbone.tokenizer, 128)
    members = prompts(backbone, method, args.members, args.length)
    ensemble, mixed = EnsembleModel(members), MixedModel(members)
    systems_a = {
        "sequential": lambda: [probabilities(m, encoded, args.batch, pad, dtype) for m in members],
        "mixed": lambda: member_probabilities(mixed, encoded, args.batch, pad, dtype),
        "ensemble_model": lambda: predict(ensemble, encoded, args.batch, pad, dtype),
    }
    many = prompts(backbone, method, args.prompts, args.length, seed=100)
    many_mixed = MixedModel(many)
    systems_b = {}
    for share in args.shares:  # rows of each prompt
        _, own = rows(share * args.prompts, offset=args.rows)
        own_encoded = encode(own, task.template, backbone.tokenizer, 128)
        owner = np.repeat(np.arange(args.prompts), share)
        parts = [own_encoded.select(range(k * share, (k + 1) * share)) for k in range(args.prompts)]
        systems_b[f"per_prompt/{share}"] = (lambda parts=parts: [probabilities(m, p, args.batch, pad, dtype)
                                                                 for m, p in zip(many, parts)], len(own))
        systems_b[f"mixed/{share}"] = (lambda e=own_encoded, o=owner: mixed_stream(many_mixed, e, o, args.batch, pad,
                                                                                   dtype), len(own))
    # warm-up (packing, caches), then repeats with the systems in turn
    for fn in [*systems_a.values(), *(f for f, _ in systems_b.values())]:
        fn()
    seconds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in systems_a.items():
            seconds.setdefault(f"a/{name}", []).append(timed(fn))
        for name, (fn, _) in systems_b.items():
            seconds.setdefault(f"b/{name}", []).append(timed(fn))
    work = {f"a/{n}": args.rows * args.members for n in systems_a} | {f"b/{n}": k for n, (_, k) in systems_b.items()}
    rates = {name: round(work[name] / median(s), 1) for name, s in seconds.items()}
    out = {"rates": rates, "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()}}
    out["ratios"] = {"a: mixed / sequential": round(rates["a/mixed"] / rates["a/sequential"], 3),
                     "a: EnsembleModel / sequential": round(rates["a/ensemble_model"] / rates["a/sequential"], 3),
                     **{f"b: mixed / per-prompt, {s} rows each": round(rates[f"b/mixed/{s}"] / rates[f"b/per_prompt/{s}"], 3)
                        for s in args.shares}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128, help="rows the ensemble scores (each by every member)")
    parser.add_argument("--members", type=int, default=3, help="ensemble members")
    parser.add_argument("--prompts", type=int, default=4, help="prompts scoring rows of their own")
    parser.add_argument("--shares", type=int, nargs="+", default=[48, 8], help="rows of each of those prompts")
    parser.add_argument("--length", type=int, default=8, help="prompt length")
    parser.add_argument("--batch", type=int, default=32, help="rows (or row-member pairs) per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["deep", "soft"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from xprompt.backbones import load_backbone
    from xprompt.hardware import resolve_dtype

    backbone = load_backbone("e5-small", Path.home() / ".cache" / "xprompt")
    result = {"machine": cpu_kind(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": {}}
    print(json.dumps(result["machine"]))
    for method in args.methods:
        for dtype in args.dtypes:
            resolved = resolve_dtype(dtype, "cpu")[0].value
            key = f"{method} {dtype} ({resolved})"
            result["runs"][key] = measure(backbone, method, dtype, args)
            print(key, json.dumps(result["runs"][key]["rates"]), json.dumps(result["runs"][key]["ratios"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
