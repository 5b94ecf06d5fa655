"""Speed, memory and accuracy of xprompt against PEFT on the same backbone, data and budget, per dtype.

One fresh process per measurement, alternating xprompt and PEFT, repeated; medians and the
xprompt/PEFT ratio of each pair. PEFT runs the standard way: ``PromptTuningConfig`` (SEQ_CLS) on a
``BertForSequenceClassification`` holding the same embedded weights, dynamic padding (in bf16 under
``torch.autocast``, as a PEFT user would). Both train on the XNLI English pool with the same prompt
length, batch size, steps, learning rate and threads; both are scored on the same English dev rows.
Every measurement is taken in each of ``--dtypes`` (bf16 and fp32): the CPU's capability decides
which one ``--dtype auto`` (xprompt's default) picks, and the summary compares that default with
PEFT in both. Where bf16 is emulated (no AVX512_BF16/AMX, or torch held at AVX2), bf16 is only
timed on evaluation over ``--emulated-rows`` rows per language: training there would take hours.
A large matmul in its own process gives the machine's FLOP limit per dtype, and the eval FLOPs are
counted from the model's shapes and the real token counts. xprompt's CPU attention
(``xprompt/attention.py``) is measured against transformers' sdpa: in training as a third system
in the rotation (in the default dtype), in evaluation alternating in one process, where the fused
inference layers (``xprompt/fused.py``) are also timed against transformers' own layers.

    pip install -e '.[bench]'                                  # PEFT, the peer
    python scripts/bench.py --repeats 3 --steps 60 --out docs/bench.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench.py ...   # imitate an AVX2-only CPU
    python scripts/bench.py --worker train --system peft --dtype fp32   # one measurement, JSON on stdout
                                                              # (systems: xprompt, xprompt-sdpa, peft)

Whole processes (``--whole``): ``xprompt eval --run RUN --langs de --limit N --json`` as a user runs it,
against a PEFT script doing the same (load the model, read and tokenise the rows, predict at batch 64),
one fresh process each, alternating, per CPU kind (this CPU, and an imitated AVX2-only CPU in the
same run: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, plus ``MKL_ENABLE_INSTRUCTIONS=AVX2
FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` so that MKL's sgemm and fbgemm's int8 kernels do not use AVX-512
either) and per dtype (``auto`` of that kind, fp32, and xprompt's opt-in ``--int8``). Each process
reports its wall time, its CPU time, the time from launch to its first eval batch (start-up: imports,
backbone, tokenizer, tokenised rows) and the eval loop's pairs/s:

    python scripts/bench.py --whole --run runs/RUN --whole-rows 1000 --repeats 3 --out docs/bench_whole.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xprompt"
PEER_BATCH = 64  # the eval batch PEFT and HF examples use
EVAL_LANGS = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur"]


def cpu_name() -> str:
    """The CPU model, so a figure says which machine it came from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def xnli_rows(split: str, lang: str, n: int):
    from xprompt.data import load_split
    from xprompt.tasks import load_task

    task = load_task("xnli")
    ds = load_split(task, lang, split)
    return task, ds.select(range(min(n, len(ds))))


def eval_set(rows_per_lang: int):
    """The same multilingual eval rows for both systems: the first N dev rows of each language."""
    from datasets import concatenate_datasets

    parts = [xnli_rows("dev", lang, rows_per_lang)[1] for lang in EVAL_LANGS]
    return concatenate_datasets(parts)


# ---------------------------------------------------------------- xprompt workers

def xprompt_train(args, attention: str | None = None) -> dict:
    """xprompt's default training run; ``attention="sdpa"`` swaps its CPU attention for transformers' sdpa."""
    from xprompt.backbones import load_backbone
    from xprompt.config import TrainConfig
    from xprompt.evaluation import predict
    from xprompt.model import load_run_model
    from xprompt.data import encode
    from xprompt.tasks import load_task
    from xprompt.workflows.runs import train
    import tempfile

    import numpy as np

    bb = load_backbone("e5-small", CACHE)
    if attention:
        bb.model.set_attn_implementation(attention)
    task = load_task("xnli")
    stamps = {}

    def on_step(step, total, loss, rate):
        if step in (1, total - 1):
            stamps[step] = time.perf_counter()

    cfg = TrainConfig(max_steps=args.steps, eval_every=10 * args.steps, batch_size=args.batch_size,
                      prompt_length=args.prompt_length, lr=args.lr, method=args.method, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as run:
        summary = train(cfg, bb, task, Path(run), on_step=on_step)
        model, _ = load_run_model(Path(run), bb)
    _, dev = xnli_rows("dev", "en", args.acc_rows)
    encoded = encode(dev, task.template, bb.tokenizer)
    preds = predict(model, encoded, 64, bb.tokenizer.pad_token_id, args.dtype)
    preds_fp32 = predict(model, encoded, 64, bb.tokenizer.pad_token_id, "fp32")
    timed = (args.steps - 2) * args.batch_size
    return {
        "train_examples_per_s": timed / (stamps[args.steps - 1] - stamps[1]),
        "accuracy_en_dev": float((preds == np.asarray(dev["label"])).mean()),
        "accuracy_en_dev_fp32": float((preds_fp32 == np.asarray(dev["label"])).mean()),
        "fp32_agreement": float((preds == preds_fp32).mean()),
        "trainable_parameters": summary["trainable_parameters"],
        "peak_rss_mb": peak_rss_mb(),
    }


def encoder_flops_per_sequence(config, tokens: int, prefix: int = 0) -> float:
    """Forward FLOPs of a BERT-style encoder on one sequence of ``tokens`` computed rows that also
    attend to ``prefix`` key/value positions (the deep prompt's; their keys and values are computed
    once per batch, not counted) (multiply-add = 2)."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linear = 4 * d * d + 2 * d * ff  # q, k, v, output projections and the two FFN matrices
    attention = 2 * (tokens + prefix) * d  # q.k^T and attn.v, per computed row
    return layers * tokens * 2 * (linear + attention)


def xprompt_eval(args) -> dict:
    """The default model (centered label vectors on the mean state); timed, alternating in the
    same process, as `xprompt eval` runs it (fused layers, CPU attention, its CPU batch), with
    transformers' own layers on xprompt's attention ("unfused"), with transformers' layers and sdpa,
    and at PEFT's batch."""
    import numpy as np

    from xprompt import fused
    from xprompt.attention import NAME
    from xprompt.backbones import load_backbone
    from xprompt.data import encode
    from xprompt.evaluation import predict
    from xprompt.hardware import eval_batch_size
    from xprompt.model import build_model
    from xprompt.verbalizers import VECTOR_READOUT
    from xprompt.tasks import load_task
    from xprompt.verbalizers import CenteredVerbalizer

    bb = load_backbone("e5-small", CACHE)
    task = load_task("xnli")
    model = build_model(bb, 3, args.method, args.prompt_length, VECTOR_READOUT,
                        verbalizer=CenteredVerbalizer(3, bb.hidden_size))
    encoded = encode(eval_set(args.eval_rows), task.template, bb.tokenizer)
    pad = bb.tokenizer.pad_token_id
    # the prompt and label vectors as training starts them (class means of 96 English train rows),
    # so that predictions depend on the states and the agreement figures mean something
    from xprompt.config import TrainConfig
    from xprompt.start import init_prompt_and_verbalizer

    init_prompt_and_verbalizer(model, bb, encode(xnli_rows("train", "en", 96)[1], task.template, bb.tokenizer),
                               TrainConfig(prompt_length=args.prompt_length, dtype="fp32", verbalizer="centered"))
    mine = eval_batch_size("cpu")  # what `xprompt eval` uses on a CPU
    predict(model, encoded.select(range(min(16, len(encoded)))), mine, pad, args.dtype)  # warm-up
    fusable = fused.fusable
    timed = {(NAME, mine): [], ("unfused", mine): [], ("sdpa", mine): [], (NAME, PEER_BATCH): []}
    preds = {}
    for _ in range(args.inner):
        for impl, size in timed:
            bb.model.set_attn_implementation("sdpa" if impl == "sdpa" else NAME)
            fused.fusable = fusable if impl == NAME else (lambda module: False)
            start = time.perf_counter()
            preds[impl] = predict(model, encoded, size, pad, args.dtype)
            timed[impl, size].append(time.perf_counter() - start)
    bb.model.set_attn_implementation(NAME)
    fused.fusable = fusable
    ours, unfused, sdpa, peer_batch = (median(timed[key]) for key in timed)
    # the FLOPs xprompt computes: a deep prompt's positions are a key/value prefix (model._attentions)
    skip = model._attentions is not None and model.skip_prompt_rows
    rows, prefix = (0, args.prompt_length) if skip else (args.prompt_length, 0)
    # with the padding of its length-sorted batches (as PEFT's are counted)
    lengths = sorted(n + rows for n in encoded["length"])
    padded = sum(len(lengths[i : i + mine]) * encoder_flops_per_sequence(bb.model.config, lengths[min(i + mine, len(lengths)) - 1], prefix)
                 for i in range(0, len(lengths), mine))
    return {"eval_pairs_per_s": len(encoded) / ours, "eval_gflop_per_s": padded / ours / 1e9, "eval_batch": mine,
            "eval_flops_per_pair": padded / len(encoded),
            "eval_pairs_per_s_unfused": len(encoded) / unfused, "fused_speedup": unfused / ours,
            "eval_pairs_per_s_sdpa": len(encoded) / sdpa, "attention_speedup": sdpa / unfused,
            f"eval_pairs_per_s_batch{PEER_BATCH}": len(encoded) / peer_batch,
            "attention_agreement": float(np.mean(preds["unfused"] == preds["sdpa"])),
            "fused_agreement": float(np.mean(preds[NAME] == preds["unfused"])),
            "pairs": len(encoded), "mean_tokens": sum(encoded["length"]) / len(encoded) + args.prompt_length,
            "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- PEFT workers

def peft_model(args):
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from xprompt.backbones.embedded import embedded_folder

    hf_logging.set_verbosity_error()
    folder = embedded_folder(CACHE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = BertForSequenceClassification.from_pretrained(folder, num_labels=3, use_safetensors=True)
    config = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.prompt_length)
    return get_peft_model(base, config), tokenizer


def peft_features(tokenizer, ds):
    enc = tokenizer(list(ds["premise"]), list(ds["hypothesis"]), truncation=True, max_length=128)
    return [{"input_ids": ids, "attention_mask": m, "labels": y}
            for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], list(ds["label"]))]


def peft_autocast(dtype: str):
    """PEFT in bf16 the way its users run it: the fp32 model under torch.autocast."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def peft_predict(model, collate, features, batch_size: int, dtype: str = "fp32"):
    import torch

    model.eval()
    preds = []
    with torch.no_grad(), peft_autocast(dtype):
        for i in range(0, len(features), batch_size):
            batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in features[i : i + batch_size]])
            preds.extend(model(**batch).logits.argmax(-1).tolist())
    return preds


def peft_train(args) -> dict:
    import random

    import torch
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    from xprompt.data import load_split
    from xprompt.tasks import load_task

    torch.manual_seed(42)
    model, tokenizer = peft_model(args)
    collate = DataCollatorWithPadding(tokenizer)
    pool = load_split(load_task("xnli"), "en", "train")
    order = list(range(len(pool)))
    random.Random(42).shuffle(order)
    features = peft_features(tokenizer, pool.select(order[: args.steps * args.batch_size]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * args.steps), args.steps)
    model.train()
    stamps = {}
    for step in range(1, args.steps + 1):
        batch = collate(features[(step - 1) * args.batch_size : step * args.batch_size])
        with peft_autocast(args.dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (1, args.steps - 1):
            stamps[step] = time.perf_counter()
    _, dev = xnli_rows("dev", "en", args.acc_rows)
    preds = peft_predict(model, collate, peft_features(tokenizer, dev), 64, args.dtype)
    accuracy = sum(int(p == y) for p, y in zip(preds, dev["label"])) / len(dev)
    timed = (args.steps - 2) * args.batch_size
    return {"train_examples_per_s": timed / (stamps[args.steps - 1] - stamps[1]), "accuracy_en_dev": accuracy,
            "trainable_parameters": sum(p.numel() for p in params), "peak_rss_mb": peak_rss_mb()}


def peft_eval(args) -> dict:
    """PEFT at the batch an HF user usually evaluates with (64), at 16 and at xprompt's CPU batch,
    alternating in one process; its fastest is the peer."""
    from transformers import DataCollatorWithPadding

    model, tokenizer = peft_model(args)
    collate = DataCollatorWithPadding(tokenizer)
    features = peft_features(tokenizer, eval_set(args.eval_rows))
    peft_predict(model, collate, features[:16], 64, args.dtype)  # warm-up
    from xprompt.hardware import eval_batch_size

    timed = {size: [] for size in (PEER_BATCH, 16, eval_batch_size("cpu"))}
    for _ in range(args.inner):
        for size in timed:
            start = time.perf_counter()
            peft_predict(model, collate, features, size, args.dtype)
            timed[size].append(time.perf_counter() - start)
    rates = {size: len(features) / median(seconds) for size, seconds in timed.items()}
    best = max(rates, key=rates.get)
    # the FLOPs PEFT computes at its best batch: every row padded to its batch's longest, plus the
    # virtual tokens, through every layer
    config = model.get_base_model().config
    flops = 0.0
    for i in range(0, len(features), best):
        group = features[i : i + best]
        width = max(len(f["input_ids"]) for f in group) + args.prompt_length
        flops += len(group) * encoder_flops_per_sequence(config, width)
    return {"eval_pairs_per_s": rates[best], "eval_batch": best, **{f"eval_pairs_per_s_batch{k}": v for k, v in rates.items()},
            "eval_gflop_per_s": flops / len(features) * rates[best] / 1e9, "eval_flops_per_pair": flops / len(features),
            "pairs": len(features), "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- the machine's limit

def matmul(args) -> dict:
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        n = 2048
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[f"matmul_gflop_per_s_{name}"] = 2 * n**3 / median(times) / 1e9
    return out


# ---------------------------------------------------------------- whole processes

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
STAMP_ENV, T0_ENV = "XPROMPT_BENCH_STAMP", "XPROMPT_BENCH_T0"

# `python -m xprompt ARGS` with the time of its first eval batch written to $XPROMPT_BENCH_STAMP
XPROMPT_STAMPED = """
import os, sys, time
import xprompt.evaluation as evaluation
def stamped(*args, _batches=evaluation.batches, **kwargs):
    for i, batch in enumerate(_batches(*args, **kwargs)):
        if i == 0 and not os.path.exists(os.environ["XPROMPT_BENCH_STAMP"]):
            open(os.environ["XPROMPT_BENCH_STAMP"], "w").write(f"{time.time() - float(os.environ['XPROMPT_BENCH_T0'])} {evaluation.__file__}")
        yield batch
evaluation.batches = stamped
from xprompt.cli import main
sys.argv = ["xprompt", *sys.argv[1:]]
main()
"""


def peft_whole(args) -> dict:
    """What a PEFT user runs to label N XNLI-de dev pairs: the model with a prompt-tuning adapter, the
    rows read and tokenised, batches of 64 padded by the collator, argmax; the first batch stamped."""
    import torch
    from transformers import DataCollatorWithPadding

    model, tokenizer = peft_model(args)
    collate = DataCollatorWithPadding(tokenizer)
    _, rows = xnli_rows("dev", "de", args.whole_rows)
    features = peft_features(tokenizer, rows)
    model.eval()
    preds = []
    start = time.perf_counter()
    with torch.no_grad(), peft_autocast(args.dtype):
        for i in range(0, len(features), PEER_BATCH):
            if i == 0:
                Path(os.environ[STAMP_ENV]).write_text(str(time.time() - float(os.environ[T0_ENV])))
            batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in features[i : i + PEER_BATCH]])
            preds.extend(model(**batch).logits.argmax(-1).tolist())
    seconds = time.perf_counter() - start
    return {"loop_seconds": seconds, "pairs": len(features)}


def whole(args, system: str, kind: str, dtype: str, run_copy: Path) -> dict:
    """One fresh process of ``system`` (xprompt, xprompt-int8, peft) on CPU ``kind`` (native, avx2)."""
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           **(AVX2_ENV if kind == "avx2" else {})}
    # the code timed: this checkout's, or for xprompt-before another checkout's. `python -c` puts the working
    # folder first on sys.path, ahead of PYTHONPATH, so the process starts in the checkout it is to import
    # (until 2026-12-07 it started here, and "before" timed this checkout's code: checked below now)
    code = Path(args.before).resolve() if system == "xprompt-before" else Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory() as tmp:
        env[STAMP_ENV], env[T0_ENV] = str(Path(tmp) / "stamp"), str(time.time())
        if system == "peft":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "whole", "--system", "peft", "--dtype", dtype,
                   "--whole-rows", str(args.whole_rows), "--prompt-length", str(args.prompt_length),
                   "--threads", str(args.threads)]
        else:
            cmd = [sys.executable, "-c", XPROMPT_STAMPED, "eval", "--run", str(run_copy), "--langs", "de", "--limit",
                   str(args.whole_rows), "--json", "--dtype", dtype, *(["--int8"] if system == "xprompt-int8" else [])]
        env[T0_ENV] = str(time.time())
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=code)
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: differenced by the caller
        if proc.returncode != 0:
            raise SystemExit(f"whole/{system}/{kind}/{dtype} failed:\n{err[-3000:]}")
        first, _, imported = (Path(tmp) / "stamp").read_text().partition(" ")
        first = float(first)
        if system != "peft" and not Path(imported).resolve().is_relative_to(code):
            raise SystemExit(f"whole/{system} imported {imported}, not the code under {code}")
    if system == "peft":
        result = json.loads(out.strip().splitlines()[-1])
        loop, pairs = result["loop_seconds"], result["pairs"]
    else:
        result = json.loads(out)["results"]["de"]
        loop, pairs = result["seconds"], result["n"]
    return {"wall_s": wall, "first_batch_s": first, "loop_pairs_per_s": pairs / loop, "loop_s": loop, "pairs": pairs,
            "cpu_s_cumulative": usage.ru_utime + usage.ru_stime}


def whole_main(args) -> None:
    """``--whole``: alternated fresh processes per CPU kind and dtype; medians and per-repeat ratios."""
    import shutil
    import tempfile

    from xprompt.hardware import cpu_bf16, cpu_capability

    native, reason = cpu_bf16()
    before = ["xprompt-before"] if args.before else []
    plans = {"native": [("bf16" if native else "fp32", ["xprompt", *before, "peft"])]
                       + ([("fp32", ["xprompt", "peft", "xprompt-int8"])] if native and args.whole_fp32 else []),
             "avx2": [("fp32", ["xprompt", *before, "peft", "xprompt-int8"])]}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_copy = Path(tmp) / "run"
        shutil.copytree(args.run, run_copy)
        whole(args, "xprompt", "native", "fp32", run_copy)  # warm the caches (encoded rows, file pages)
        last_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        last_cpu = last_cpu.ru_utime + last_cpu.ru_stime
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            for kind in kinds:
                for dtype, systems in plans[kind]:
                    shift = r % len(systems)
                    for system in systems[shift:] + systems[:shift]:
                        got = whole(args, system, kind, dtype, run_copy)
                        got["cpu_s"], last_cpu = got["cpu_s_cumulative"] - last_cpu, got["cpu_s_cumulative"]
                        rows.setdefault(f"{kind}/{dtype}/{system}", []).append(got)
                        print(f"  {kind:6s} {dtype:4s} {system:12s} wall {got['wall_s']:.1f}s, first batch "
                              f"{got['first_batch_s']:.1f}s, loop {got['loop_pairs_per_s']:.1f} pairs/s, cpu {got['cpu_s']:.1f}s",
                              flush=True)
    table = [f"CPU {cpu_name()} ({reason}); whole process: eval of {args.whole_rows} XNLI-de dev pairs; medians of "
             f"{args.repeats} alternated fresh processes; ratio = PEFT time / xprompt time (median of per-repeat ratios)",
             "", "| CPU kind | dtype | system | wall s | to first batch s | loop pairs/s | CPU s | wall ratio | loop ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for key, values in rows.items():
        kind, dtype, system = key.split("/")
        peer = rows.get(f"{kind}/{dtype}/peft") or rows.get(f"{kind}/fp32/peft")
        med = {f: median(v[f] for v in values) for f in ("wall_s", "first_batch_s", "loop_pairs_per_s", "cpu_s")}
        if system != "peft" and peer:
            med["wall_ratio"] = median(p["wall_s"] / v["wall_s"] for v, p in zip(values, peer))
            med["loop_ratio"] = median(v["loop_pairs_per_s"] / p["loop_pairs_per_s"] for v, p in zip(values, peer))
        summary[key] = med
        table.append(f"| {kind} | {dtype} | {system} | {med['wall_s']:.1f} | {med['first_batch_s']:.1f} | "
                     f"{med['loop_pairs_per_s']:.1f} | {med['cpu_s']:.1f} | "
                     + (f"{med['wall_ratio']:.2f}x | {med['loop_ratio']:.2f}x |" if "wall_ratio" in med else " | |"))
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_name(),
                                        "cpu_capability": cpu_capability(), "cpu_bf16_reason": reason,
                                        "avx2_env": AVX2_ENV, "summary": summary, "raw": rows, "table": table},
                                       indent=2) + "\n")


WORKERS = {("train", "xprompt"): xprompt_train, ("whole", "peft"): peft_whole, ("train", "peft"): peft_train,
           ("train", "xprompt-sdpa"): lambda args: xprompt_train(args, attention="sdpa"),
           ("eval", "xprompt"): xprompt_eval, ("eval", "peft"): peft_eval, ("matmul", "none"): matmul}


def spawn(args, worker: str, system: str, dtype: str = "fp32", eval_rows: int | None = None, inner: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--system", system, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--prompt-length", str(args.prompt_length), "--lr", str(args.lr),
           "--eval-rows", str(eval_rows or args.eval_rows), "--acc-rows", str(args.acc_rows),
           "--threads", str(args.threads), "--method", args.method, "--dtype", dtype, "--inner", str(inner or args.inner)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{worker}/{system} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {worker:6s} {system:12s} {dtype:4s} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in result.items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--method", default="deep", help="xprompt's method (PEFT's twin of 'soft' is PromptTuning)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="dtypes to measure both systems in")
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)  # a worker's dtype
    parser.add_argument("--eval-rows", type=int, default=200, help="dev rows per language (15 languages)")
    parser.add_argument("--emulated-rows", type=int, default=4,
                        help="dev rows per language for a dtype this CPU only emulates (eval only)")
    parser.add_argument("--acc-rows", type=int, default=1000, help="English dev rows scored after training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inner", type=int, default=2, help="timed passes per attention kind in one eval process")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=["train", "eval", "matmul", "whole"])
    parser.add_argument("--whole", action="store_true", help="whole processes (start-up + loop) instead")
    parser.add_argument("--run", type=Path, help="--whole: the run xprompt evaluates (a copy of it)")
    parser.add_argument("--whole-rows", type=int, default=1000, help="--whole: XNLI-de dev pairs per process")
    parser.add_argument("--kinds", default="native,avx2", help="--whole: CPU kinds (native, avx2)")
    parser.add_argument("--before", type=Path, help="--whole: a checkout of xprompt to time as 'xprompt-before'")
    parser.add_argument("--whole-fp32", action="store_true", help="--whole: also fp32 and int8 on a native-bf16 CPU")
    parser.add_argument("--system", default="none")
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.worker, args.system](args)))
        return
    if args.whole:
        whole_main(args)
        return

    from xprompt.hardware import cpu_bf16, cpu_capability, resolve_dtype

    native, reason = cpu_bf16()
    default = resolve_dtype("auto", "cpu")[0].value
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"CPU: {cpu_name()}; torch capability {cpu_capability()}; {reason}; --dtype auto -> {default}", flush=True)

    def emulated(dtype: str) -> bool:
        return dtype == "bf16" and not native

    def plan(dtype: str) -> list[tuple[str, list[str]]]:
        if emulated(dtype):
            return [("eval", ["xprompt", "peft"])]
        train = ["xprompt", "peft"] + (["xprompt-sdpa"] if dtype == default else [])
        return [("train", train), ("eval", ["xprompt", "peft"])]

    rows: dict[str, list[dict]] = {"matmul": []}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        rows["matmul"].append(spawn(args, "matmul", "none"))
        for dtype in dtypes:
            for worker, systems in plan(dtype):
                shift = r % len(systems)  # rotate who goes first
                for system in systems[shift:] + systems[:shift]:
                    rows.setdefault(f"{worker}-{system}-{dtype}", []).append(
                        spawn(args, worker, system, dtype, *((args.emulated_rows, 1) if emulated(dtype) else ())))

    def med(key: str, field: str) -> float:
        return median(x[field] for x in rows[key])

    def ratio(key: str, peer: str, field: str) -> float:  # median of the per-repeat ratios
        return median(a[field] / b[field] for a, b in zip(rows[key], rows[peer]))

    per_dtype = {}
    for dtype in dtypes:
        limit = med("matmul", f"matmul_gflop_per_s_{dtype}")
        cpu_batch = rows[f"eval-xprompt-{dtype}"][0]["eval_batch"]
        out = {"emulated": emulated(dtype), "eval_rows_per_language": args.emulated_rows if emulated(dtype) else args.eval_rows,
               "matmul_gflop_per_s": limit,
               "xprompt_eval_pairs_per_s": med(f"eval-xprompt-{dtype}", "eval_pairs_per_s"),
               "peft_eval_pairs_per_s": med(f"eval-peft-{dtype}", "eval_pairs_per_s"),
               "eval_ratio": ratio(f"eval-xprompt-{dtype}", f"eval-peft-{dtype}", "eval_pairs_per_s"),
               "xprompt_eval_gflop_per_s": med(f"eval-xprompt-{dtype}", "eval_gflop_per_s"),
               "peft_eval_gflop_per_s": med(f"eval-peft-{dtype}", "eval_gflop_per_s"),
               "flops_per_pair_peft_over_xprompt": med(f"eval-peft-{dtype}", "eval_flops_per_pair") / med(f"eval-xprompt-{dtype}", "eval_flops_per_pair"),
               "xprompt_eval_pairs_per_s_unfused": med(f"eval-xprompt-{dtype}", "eval_pairs_per_s_unfused"),
               "eval_fused_speedup": med(f"eval-xprompt-{dtype}", "fused_speedup"),
               "eval_fused_agreement": med(f"eval-xprompt-{dtype}", "fused_agreement"),
               "xprompt_eval_pairs_per_s_sdpa": med(f"eval-xprompt-{dtype}", "eval_pairs_per_s_sdpa"),
               "eval_attention_speedup": med(f"eval-xprompt-{dtype}", "attention_speedup"),
               "xprompt_eval_batch": cpu_batch,
               f"xprompt_eval_pairs_per_s_batch{PEER_BATCH}": med(f"eval-xprompt-{dtype}", f"eval_pairs_per_s_batch{PEER_BATCH}"),
               f"peft_eval_pairs_per_s_batch{PEER_BATCH}": med(f"eval-peft-{dtype}", f"eval_pairs_per_s_batch{PEER_BATCH}"),
               "peft_eval_pairs_per_s_xprompt_batch": med(f"eval-peft-{dtype}", f"eval_pairs_per_s_batch{cpu_batch}")}
        out["eval_ratio_same_batch"] = ratio(f"eval-xprompt-{dtype}", f"eval-peft-{dtype}", f"eval_pairs_per_s_batch{PEER_BATCH}")
        out["eval_fraction_of_matmul_limit"] = out["xprompt_eval_gflop_per_s"] / limit
        out["peft_eval_fraction_of_matmul_limit"] = out["peft_eval_gflop_per_s"] / limit
        if not emulated(dtype):
            out.update({
                "xprompt_train_examples_per_s": med(f"train-xprompt-{dtype}", "train_examples_per_s"),
                "peft_train_examples_per_s": med(f"train-peft-{dtype}", "train_examples_per_s"),
                "train_ratio": ratio(f"train-xprompt-{dtype}", f"train-peft-{dtype}", "train_examples_per_s"),
                "xprompt_accuracy_en_dev": med(f"train-xprompt-{dtype}", "accuracy_en_dev"),
                "peft_accuracy_en_dev": med(f"train-peft-{dtype}", "accuracy_en_dev"),
                "xprompt_train_peak_rss_mb": med(f"train-xprompt-{dtype}", "peak_rss_mb"),
                "peft_train_peak_rss_mb": med(f"train-peft-{dtype}", "peak_rss_mb"),
                "fp32_agreement": med(f"train-xprompt-{dtype}", "fp32_agreement"),
            })
        if f"train-xprompt-sdpa-{dtype}" in rows:
            out["xprompt_train_examples_per_s_sdpa"] = med(f"train-xprompt-sdpa-{dtype}", "train_examples_per_s")
            out["train_attention_speedup"] = ratio(f"train-xprompt-{dtype}", f"train-xprompt-sdpa-{dtype}",
                                                   "train_examples_per_s")
        per_dtype[dtype] = out

    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "system", "out", "dtype")},
        "cpu": cpu_name(), "cpu_capability": cpu_capability(), "cpu_bf16_native": native, "cpu_bf16_reason": reason,
        "auto_dtype": default, "per_dtype": per_dtype, "raw": rows,
    }
    if default in per_dtype:
        mine = per_dtype[default]
        fastest = max(per_dtype, key=lambda d: per_dtype[d]["xprompt_eval_pairs_per_s"])
        summary["default"] = {
            "dtype": default,
            "fastest_eval_dtype": fastest,
            "eval_vs_fastest_dtype": mine["xprompt_eval_pairs_per_s"] / per_dtype[fastest]["xprompt_eval_pairs_per_s"],
            "eval_ratio_vs_peft_same_dtype": mine["eval_ratio"],
            "eval_ratio_vs_peft_fastest": mine["xprompt_eval_pairs_per_s"] / max(v["peft_eval_pairs_per_s"] for v in per_dtype.values()),
        }
        if "train_ratio" in mine:
            peft_train = [v["peft_train_examples_per_s"] for v in per_dtype.values() if "peft_train_examples_per_s" in v]
            summary["default"].update(train_ratio_vs_peft_same_dtype=mine["train_ratio"],
                                      train_ratio_vs_peft_fastest=mine["xprompt_train_examples_per_s"] / max(peft_train))

    table = [f"CPU {summary['cpu']}, torch capability {summary['cpu_capability']} ({reason}); --dtype auto -> {default}",
             "", "| dtype | measure | xprompt | PEFT | ratio |", "|---|---|---|---|---|"]
    for dtype, v in per_dtype.items():
        tag = f"{dtype}{' (emulated)' if v['emulated'] else ''}{' = auto' if dtype == default else ''}"
        if "train_ratio" in v:
            table += [
                f"| {tag} | train examples/s | {v['xprompt_train_examples_per_s']:.1f} | {v['peft_train_examples_per_s']:.1f} | {v['train_ratio']:.2f}x |",
                f"| {tag} | en dev accuracy after {args.steps} steps | {100 * v['xprompt_accuracy_en_dev']:.1f} | {100 * v['peft_accuracy_en_dev']:.1f} | |",
                f"| {tag} | train peak RSS (MB) | {v['xprompt_train_peak_rss_mb']:.0f} | {v['peft_train_peak_rss_mb']:.0f} | |",
            ]
        table += [
            f"| {tag} | eval pairs/s ({v['eval_rows_per_language']} rows x 15 languages; xprompt's CPU batch {v['xprompt_eval_batch']}, "
            f"PEFT's fastest of batch 16 / {v['xprompt_eval_batch']} / {PEER_BATCH}) | {v['xprompt_eval_pairs_per_s']:.1f} | {v['peft_eval_pairs_per_s']:.1f} | {v['eval_ratio']:.2f}x |",
            f"| {tag} | eval pairs/s, both at batch {PEER_BATCH} | {v[f'xprompt_eval_pairs_per_s_batch{PEER_BATCH}']:.1f} "
            f"| {v[f'peft_eval_pairs_per_s_batch{PEER_BATCH}']:.1f} | {v['eval_ratio_same_batch']:.2f}x |",
            f"| {tag} | eval GFLOP/s (share of the {dtype} matmul limit {v['matmul_gflop_per_s']:.0f}) | {v['xprompt_eval_gflop_per_s']:.0f} ({100 * v['eval_fraction_of_matmul_limit']:.0f}%) "
            f"| {v['peft_eval_gflop_per_s']:.0f} ({100 * v['peft_eval_fraction_of_matmul_limit']:.0f}%, padding and prompt rows included) | |",
            f"| {tag} | FLOPs computed per pair, PEFT / xprompt (padding, prompt rows) | | | {v['flops_per_pair_peft_over_xprompt']:.2f}x |",
            f"| {tag} | eval pairs/s with transformers' layers instead of the fused ones (same process) | {v['xprompt_eval_pairs_per_s_unfused']:.1f} "
            f"(fused {v['eval_fused_speedup']:.2f}x, {100 * v['eval_fused_agreement']:.1f}% same predictions) | | |",
            f"| {tag} | eval pairs/s with transformers' layers and sdpa (same process) | {v['xprompt_eval_pairs_per_s_sdpa']:.1f} (CPU attention {v['eval_attention_speedup']:.2f}x) | | |",
        ]
        if "train_attention_speedup" in v:
            table.append(f"| {tag} | train examples/s with transformers' sdpa instead | {v['xprompt_train_examples_per_s_sdpa']:.1f} "
                         f"(CPU attention {v['train_attention_speedup']:.2f}x) | | |")
        if dtype != "fp32" and "fp32_agreement" in v:
            table.append(f"| {tag} | predictions of the trained prompt evaluated in fp32 (en dev) | {100 * v['fp32_agreement']:.1f}% agree | | |")
    if "default" in summary:
        d = summary["default"]
        table += ["", f"default (auto = {default}): eval at {100 * d['eval_vs_fastest_dtype']:.0f}% of the fastest dtype "
                      f"({d['fastest_eval_dtype']}); vs PEFT in the same dtype: eval {d['eval_ratio_vs_peft_same_dtype']:.2f}x"
                      + (f", train {d['train_ratio_vs_peft_same_dtype']:.2f}x" if "train_ratio_vs_peft_same_dtype" in d else "")
                      + f"; vs PEFT in its faster dtype: eval {d['eval_ratio_vs_peft_fastest']:.2f}x"
                      + (f", train {d['train_ratio_vs_peft_fastest']:.2f}x" if "train_ratio_vs_peft_fastest" in d else "")]
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**summary, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
