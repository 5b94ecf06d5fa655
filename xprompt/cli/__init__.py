"""The command line: parse, build a config, call one library function, render what it returns.

This is the one place where a domain error (``XPromptError``) becomes a one-line message and a
non-zero exit; ``--debug`` shows the traceback instead. Help texts come from ``TrainConfig``'s
fields and the method registry; every workflow lives in ``xprompt.workflows``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import METHODS, Device, DType, TrainConfig
from ..errors import XPromptError
from .common import (ENCODED, _phases_on, _progress_bar, AllowBin, AsJson, CacheDir, DataDir, DeviceMap, DeviceOption, DTypeOption, Method,
                     Revision, RunsDir, TasksDir, TrustRemote, _data_dirs, _default_cache, _load_task, _numbers,
                     _open_backbone, _pct, _state, _table, app, command, console, err_console, opt, run)
from .library import library_app  # the library commands, registered on it
from .taskcards import task_app  # task new

app.add_typer(library_app, name="library")
app.add_typer(task_app, name="task")
METHOD_HELP = "; ".join(f"{name}: {text}" for name, text in METHODS.items())


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"xprompt {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
                 version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                       help="Print the version and exit.")] = False):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA call: repeatable cuBLAS
    _state["debug"] = debug


def _run_events():
    from ..workflows.runs import RunEvents

    def done(run_dir, cfg, summary):
        rate = summary.get("train_examples_per_s")
        console.print(f"done in {summary['train_seconds']:.0f}s: training {rate if rate is not None else 0:.1f} ex/s "
                      f"({summary['train_examples']} examples in {summary['step_seconds']:.1f}s of steps), selection "
                      f"{summary['select_seconds']:.1f}s ({summary['select_passes']} passes on {summary['select_rows']} "
                      f"rows); {summary['data']}; best step {summary['best_step']} with "
                      f"{100 * summary['select_accuracy']:.1f} held-out {cfg.lang} accuracy; prompt saved to "
                      f"{run_dir / 'prompt'}", highlight=False)

    def phase(description, total=None):
        return _state.get("phase", silent)(description, total)

    from ..phases import silent

    return RunEvents(started=_progress_bar, step=lambda *a: _state.get("step", lambda *_: None)(*a),
                     warning=lambda text: err_console.print(f"warning: {text}"), finished=done, phase=phase)


@command("tasks")
def tasks_cmd(tasks_dir: TasksDir = None):
    """List the tasks, their labels, languages (the official set, then +extra ones) and splits."""
    from ..tasks import DEFAULT_TASKS_DIR, load_tasks

    _table("tasks", ["task", "labels", "languages (+extra)", "splits"],
           [[t.name, ", ".join(t.label_names.get(x, x) for x in t.labels) if len(t.labels) <= 6 else f"{len(t.labels)} classes",
             " ".join([*t.official_languages, *(f"+{x}" for x in t.extra_languages)]),
             "; ".join(f"{s} ({', '.join(t.split_languages(s))})" if s == "train" else s for s in t.splits)]
            for t in load_tasks(tasks_dir or DEFAULT_TASKS_DIR)])


@command()
def train(
    task: Annotated[str, opt("task")] = "xnli",
    lang: Annotated[str, opt("lang")] = "en",
    backbone: Annotated[str, opt("backbone")] = "e5-small",
    method: Annotated[Method, typer.Option(help=METHOD_HELP)] = Method("deep"),
    tune: Annotated[str, opt("tune")] = TrainConfig.tune,
    backbone_lr: Annotated[Optional[float], opt("backbone_lr")] = None,
    lora_rank: Annotated[int, opt("lora_rank")] = TrainConfig.lora_rank,
    lora_alpha: Annotated[int, opt("lora_alpha")] = TrainConfig.lora_alpha,
    lora_targets: Annotated[Optional[str], opt("lora_targets")] = None,
    tower_layers: Annotated[Optional[int], opt("tower_layers")] = None,
    prompt_text: Annotated[str, opt("prompt_text")] = TrainConfig.prompt_text,
    prompt_length: Annotated[int, opt("prompt_length")] = TrainConfig.prompt_length,
    verbalizer: Annotated[str, opt("verbalizer")] = TrainConfig.verbalizer,
    label_reduce: Annotated[str, opt("label_reduce")] = TrainConfig.label_reduce,
    prompt_position: Annotated[str, opt("prompt_position")] = TrainConfig.prompt_position,
    reparam: Annotated[str, opt("reparam")] = TrainConfig.reparam,
    prefix_projection: Annotated[bool, opt("prefix_projection")] = TrainConfig.prefix_projection,
    init: Annotated[str, opt("init")] = TrainConfig.init,
    init_text: Annotated[Optional[str], opt("init_text")] = None,
    template: Annotated[str, opt("template")] = TrainConfig.template,
    readout: Annotated[str, opt("readout")] = TrainConfig.readout,
    shots: Annotated[Optional[int], opt("shots")] = None,
    max_steps: Annotated[Optional[int], opt("max_steps")] = TrainConfig.max_steps,
    epochs: Annotated[float, opt("epochs")] = TrainConfig.epochs,
    lr: Annotated[Optional[float], opt("lr")] = None,
    batch_size: Annotated[int, opt("batch_size")] = TrainConfig.batch_size,
    grad_accum: Annotated[int, opt("grad_accum")] = TrainConfig.grad_accum,
    device: DeviceOption = Device.CPU,
    device_map: DeviceMap = None,
    seed: Annotated[int, opt("seed")] = TrainConfig.seed,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds: one run per seed (a sweep), e.g. 13,21,42,87,100.")] = None,
    dtype: DTypeOption = TrainConfig.dtype,
    revision: Revision = None,
    allow_bin_weights: AllowBin = False,
    eval_every: Annotated[int, opt("eval_every")] = TrainConfig.eval_every,
    average_checkpoints: Annotated[int, opt("average_checkpoints")] = TrainConfig.average_checkpoints,
    average_keep: Annotated[str, opt("average_keep")] = TrainConfig.average_keep,
    max_grad_norm: Annotated[float, opt("max_grad_norm")] = TrainConfig.max_grad_norm,
    restart_check: Annotated[float, opt("restart_check")] = TrainConfig.restart_check,
    select_size: Annotated[int, opt("select_size")] = TrainConfig.select_size,
    init_from: Annotated[Optional[str], opt("init_from")] = None,
    init_weights: Annotated[Optional[str], opt("init_weights")] = None,
    library: Annotated[Optional[Path], opt("library")] = None,
    top_k: Annotated[int, opt("top_k")] = TrainConfig.top_k,
    rank_by: Annotated[str, opt("rank_by")] = TrainConfig.rank_by,
    transfer: Annotated[str, opt("transfer")] = TrainConfig.transfer,
    same_task: Annotated[bool, opt("same_task")] = TrainConfig.same_task,
    library_adapted: Annotated[bool, opt("library_adapted")] = TrainConfig.library_adapted,
    probe_steps: Annotated[int, opt("probe_steps")] = TrainConfig.probe_steps,
    mixture_steps: Annotated[int, opt("mixture_steps")] = TrainConfig.mixture_steps,
    unlabeled: Annotated[Optional[str], opt("unlabeled")] = None,
    unlabeled_split: Annotated[str, opt("unlabeled_split")] = TrainConfig.unlabeled_split,
    unlabeled_file: Annotated[Optional[str], opt("unlabeled_file")] = None,
    unlabeled_rows: Annotated[int, opt("unlabeled_rows")] = TrainConfig.unlabeled_rows,
    self_train_rounds: Annotated[int, opt("self_train_rounds")] = TrainConfig.self_train_rounds,
    self_train_steps: Annotated[int, opt("self_train_steps")] = TrainConfig.self_train_steps,
    self_train_keep: Annotated[str, opt("self_train_keep")] = TrainConfig.self_train_keep,
    pseudo_rule: Annotated[str, opt("pseudo_rule")] = TrainConfig.pseudo_rule,
    pseudo_fraction: Annotated[float, opt("pseudo_fraction")] = TrainConfig.pseudo_fraction,
    pseudo_threshold: Annotated[float, opt("pseudo_threshold")] = TrainConfig.pseudo_threshold,
    augment: Annotated[str, opt("augment")] = TrainConfig.augment,
    augment_rate: Annotated[float, opt("augment_rate")] = TrainConfig.augment_rate,
    run_name: Annotated[Optional[str], typer.Option(help="Run directory name (default: time-task-lang-method-seed).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run from its checkpoint (its config.json wins over other flags).")] = None,
    trust_remote_code: TrustRemote = False,
    runs_dir: RunsDir = Path("runs"),
    data_dir: DataDir = None,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Train one prompt on the source language (one per seed with --seeds); select on held-out
    source-language rows only. Runs data-parallel under torchrun or accelerate launch."""
    from ..checks import check_runs

    if resume is not None:
        from ..workflows.runs import resume_plan

        cfg, data_dir, saved_tasks = resume_plan(resume)
        tasks_dir = tasks_dir or saved_tasks
        configs = [cfg]
    else:
        weights = _numbers(init_weights, float, "--init-weights")
        if weights is not None and not init_from:
            raise typer.BadParameter("--init-weights needs --init-from")
        lr = lr if lr is not None else float(_load_task(task, tasks_dir).train_defaults.get("lr", TrainConfig.lr))
        method = Method(method).value
        options = dict(reparam=reparam, prefix_projection=prefix_projection, tower_layers=tower_layers,
                       prompt_text=prompt_text)
        try:
            configs = [TrainConfig(
                task=task, lang=lang, backbone=backbone, method=method, prompt_length=prompt_length, init=init,
                init_text=init_text, prompt_position=prompt_position, verbalizer=verbalizer, label_reduce=label_reduce,
                readout=readout, template=template, revision=revision, allow_bin_weights=allow_bin_weights, shots=shots,
                max_steps=max_steps or None, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                seed=one, dtype=dtype, eval_every=eval_every, average_checkpoints=average_checkpoints, average_keep=average_keep, max_grad_norm=max_grad_norm, restart_check=restart_check, select_size=select_size, init_from=init_from, init_weights=weights, top_k=top_k,
                transfer=transfer, library=str(library) if library else None, rank_by=rank_by, same_task=same_task,
                library_adapted=library_adapted, probe_steps=probe_steps, mixture_steps=mixture_steps,
                unlabeled=unlabeled, unlabeled_split=unlabeled_split, unlabeled_file=unlabeled_file,
                unlabeled_rows=unlabeled_rows, self_train_rounds=self_train_rounds, self_train_steps=self_train_steps,
                self_train_keep=self_train_keep, pseudo_rule=pseudo_rule, pseudo_fraction=pseudo_fraction, pseudo_threshold=pseudo_threshold,
                augment=augment, augment_rate=augment_rate, tune=tune, backbone_lr=backbone_lr, lora_rank=lora_rank,
                lora_alpha=lora_alpha, lora_targets=lora_targets, **options,
            ) for one in (_numbers(seeds, int, "--seeds") or [seed])]
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    first = configs[0]
    spec = _load_task(first.task, tasks_dir)
    check_runs(configs, spec)  # names, languages, paths: answered before torch is imported
    from .. import distributed
    from ..prompts import check_options
    from ..workflows.runs import plan_runs, train_runs

    distributed.setup()
    if resume is None:
        try:
            check_options(first.method, options)
        except XPromptError as e:
            raise typer.BadParameter(str(e)) from None
    plan = [(first, resume)] if resume is not None else plan_runs(configs, runs_dir, run_name)
    dirs = _data_dirs(data_dir)
    bb, _, compute = _open_backbone(first.backbone, cache_dir, device, first.dtype, trust_remote_code, device_map,
                                    first.revision, first.allow_bin_weights)
    train_runs(plan, bb, spec, runs_dir, dirs, data_dir, device.value, cache_dir / ENCODED, tasks_dir, compute,
               _run_events())


@command("pretrain")
def pretrain_cmd(
    fmt: Annotated[str, typer.Option("--format", help="PPT's format: pair (sentence-pair classification: next sentence, same document, other document; for NLI and paraphrase tasks) or choice (next-sentence selection among four).")] = "pair",
    corpus: Annotated[Optional[Path], typer.Option(help="Documents: blank-line-separated paragraphs of one sentence a line, or JSON lines with a 'text' field (default: the bundled training texts, English and Chinese).")] = None,
    backbone: Annotated[str, opt("backbone")] = "e5-small",
    method: Annotated[Method, typer.Option(help=METHOD_HELP)] = Method("deep"),
    prompt_length: Annotated[int, opt("prompt_length")] = TrainConfig.prompt_length,
    max_steps: Annotated[int, opt("max_steps")] = 2000,
    lr: Annotated[float, opt("lr")] = TrainConfig.lr,
    batch_size: Annotated[int, opt("batch_size")] = TrainConfig.batch_size,
    eval_every: Annotated[int, opt("eval_every")] = 500,
    seed: Annotated[int, opt("seed")] = TrainConfig.seed,
    dtype: DTypeOption = TrainConfig.dtype,
    device: DeviceOption = Device.CPU,
    run_name: Annotated[Optional[str], typer.Option(help="Run directory name (default: time-ppt-<format>-mixed-method-seed).")] = None,
    revision: Revision = None,
    allow_bin_weights: AllowBin = False,
    runs_dir: RunsDir = Path("runs"),
    cache_dir: CacheDir = _default_cache(),
):
    """Pre-train a prompt on unlabeled text with PPT's self-supervised tasks (Gu et al. 2022), as a run
    like any other (resume it with 'train --resume'); start few-shot runs from it with --init-from RUN.
    Selection on held-out pre-training rows only."""
    from ..pretraining import FORMATS
    from ..workflows.pretraining import pretrain

    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        cfg = TrainConfig(backbone=backbone, method=Method(method).value, prompt_length=prompt_length,
                          max_steps=max_steps, lr=lr, batch_size=batch_size, eval_every=eval_every, seed=seed,
                          dtype=dtype, revision=revision, allow_bin_weights=allow_bin_weights)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    bb, _, compute = _open_backbone(backbone, cache_dir, device, dtype, revision=revision,
                                    allow_bin_weights=allow_bin_weights)
    run_dir, summary = pretrain(cfg, fmt, bb, runs_dir, corpus, run_name, device.value, cache_dir / ENCODED, compute,
                                _run_events())
    stats = summary["corpus"]
    console.print(f"pre-trained on {stats['rows']} {fmt} rows from {stats['documents']} documents "
                  f"({stats['sentences']} sentences, {stats['corpus']}); start a run from it with "
                  f"--init-from {run_dir}")


@command("eval")
def evaluate_cmd(
    langs: Annotated[str, typer.Option(help="Comma-separated languages, or 'all'.")] = "all",
    run: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help="Run directory (default: the latest zero-shot run under --runs-dir); several comma-separated: their ensemble (mean label probabilities), saved as a row of its own. Under torchrun write --run-dir: its parser takes --run for its own --run-path.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task to evaluate on (default: the run's task).")] = None,
    split: Annotated[str, typer.Option(help="dev or test (test files carry no labels: predictions only).")] = "dev",
    limit: Annotated[Optional[int], typer.Option(help="At most N rows per language.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone (default: the run's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per forward pass (default: 16 on a CPU, 64 on a GPU).")] = None,
    dtype: DTypeOption = DType.AUTO,
    device: DeviceOption = Device.CPU,
    device_map: DeviceMap = None,
    as_json: AsJson = False,
    shots: Annotated[Optional[int], typer.Option(help="Few-shot: adapt a copy of the prompt on K examples per class of each target language (its train split, else K from dev, evaluating on the rest of dev) and report both numbers.")] = None,
    adapt_steps: Annotated[int, typer.Option(help="Training steps of each few-shot adaptation.")] = 100,
    num_beams: Annotated[int, typer.Option(help="Generation tasks: beams of the decoder's search (1: greedy).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Generation tasks: the most tokens written per row.")] = 48,
    metrics: Annotated[Optional[str], typer.Option(help="Generation tasks: comma-separated sacrebleu metrics, chrf (default), bleu, chrf++.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the few-shot sample and adaptation.")] = 42,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of the backbone (default: the one the run was trained at).")] = None,
    allow_bin_weights: AllowBin = False,
    trust_remote_code: TrustRemote = False,
    int8: Annotated[bool, typer.Option("--int8", help="CPU: compute the frozen backbone's matrix products on int8 weights (dynamic quantisation; the rest in fp32). Faster where bf16 is not native; opt-in because predictions can differ from fp32 (docs/bench.md measures by how much).")] = False,
    runs_dir: RunsDir = Path("runs"),
    data_dir: DataDir = None,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Apply a run's prompt unchanged to each language; print and store the results.
    With --shots K, also adapt a copy per language on K target examples per class.
    Under torchrun / accelerate launch the languages are shared out over the processes and merged."""
    from ..store import latest_run, load_card, recorded_tasks_dir

    if split not in ("dev", "test", "train"):
        raise typer.BadParameter(f"unknown split '{split}'; known: dev, test, train")
    if limit is not None and limit < 1:
        raise typer.BadParameter("--limit must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise typer.BadParameter("--batch-size must be at least 1")
    runs = [Path(x) for x in str(run).split(",") if x.strip()] if run else []
    tasks_dir = tasks_dir or (recorded_tasks_dir(runs[0]) if runs else None)  # a run remembers its cards' folder
    asked = _load_task(task, tasks_dir) if task else None  # an unknown task is named before runs are looked up
    run_dir = runs[0] if runs else latest_run(runs_dir, task)
    runs = runs or [run_dir]
    card = load_card(run_dir)
    tasks_dir = tasks_dir or recorded_tasks_dir(run_dir)
    if run is None:
        err_console.print(f"run: {run_dir} (the latest finished run{f' of {task}' if task else ''} whose lineage "
                          "trained on no target rows; --run picks another)", highlight=False)
    spec = asked or _load_task(card["task"], tasks_dir)
    wanted = spec.split_languages(split) if langs == "all" else [x.strip() for x in langs.split(",") if x.strip()]
    spec.check_languages(wanted, split)
    dirs = _data_dirs(data_dir)
    from .. import distributed  # every name is checked: now the heavy imports
    from ..hardware import eval_batch_size
    from ..model import load_run_model
    from ..reports import language_rows
    from ..workflows.evaluations import adapt, evaluate_ensemble, evaluate_run

    rank, world = distributed.setup()
    bb, dtype, _ = _open_backbone(backbone or card["backbone"], cache_dir, device, dtype, trust_remote_code, device_map,
                                  revision or card.get("backbone_revision"),
                                  allow_bin_weights or bool(card.get("backbone_bin_weights")))
    model, card = load_run_model(run_dir, bb)
    model.place(distributed.local_device(device.value))
    batch_size = batch_size or eval_batch_size(distributed.local_device(device.value))
    if shots and len(runs) > 1:
        raise XPromptError("--shots adapts one run; pass a single --run")
    if int8 and (shots or len(runs) > 1 or spec.kind == "generation" or distributed.local_device(device.value).type != "cpu"):
        raise XPromptError("--int8 scores one run's classification prompt on a CPU (not --shots, ensembles, generation or GPUs)")
    if int8:
        err_console.print("--int8: the frozen layers' matrix products on int8 weights, everything else in fp32", highlight=False)
    if shots:
        if world > 1:
            raise XPromptError("--shots adaptation runs in one process; start it without torchrun")
        if split != "dev":
            raise XPromptError("--shots reports accuracies, so it needs --split dev")
        rows = adapt(run_dir, model, card, bb, spec, wanted, shots, adapt_steps, seed, dirs, data_dir, limit,
                     batch_size, dtype, cache_dir / ENCODED, device.value, _run_events())
        _table(f"{spec.name} dev: zero-shot prompt of {run_dir.name} vs {shots}-shot adaptation ({adapt_steps} steps, "
               f"seed {seed})", ["language", "n", "zero-shot", f"{shots}-shot", "change", "adapted from"],
               [[r["lang"], r["n"], _pct(r["zero_shot"]), _pct(r["adapted"]), f"{100 * (r['adapted'] - r['zero_shot']):+.1f}",
                 f"{r['source_split']} ({r['run']})"] for r in rows], right=("n", "zero-shot", f"{shots}-shot", "change"))
        return

    scored = tuple(metrics.split(",")) if metrics else (spec.metric,)
    if spec.kind == "generation" and any(m not in ("chrf", "bleu", "chrf++") for m in scored):
        raise typer.BadParameter(f"--metrics takes chrf, bleu and chrf++, got {metrics!r}")
    generation = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "metrics": scored}

    def on_language(lang, result):
        if not as_json:
            acc = _pct(result[scored[0] if spec.kind == "generation" else "accuracy"]) if result["labeled"] else "no labels"
            err_console.print(f"  {lang}: {result['n']} rows, {acc}, {result['pairs_per_s']} pairs/s")

    if len(runs) > 1:  # an ensemble: the mean of the runs' label probabilities, saved as a row of its own
        done = evaluate_ensemble(runs, bb, spec, wanted, split, dirs, limit, batch_size, dtype, cache_dir / ENCODED,
                                 on_language=on_language, device=distributed.local_device(device.value))
        run_dir = done.run_dir
    else:
        with _phases_on(err_console) as phase:
            done = evaluate_run(run_dir, model, card, bb, spec, wanted, split, dirs, limit, batch_size, dtype,
                                cache_dir / ENCODED, on_language, generation, int8, phase if not as_json else None)
    if done.results is None:  # another process's share, merged by rank 0
        return
    if as_json:
        print(json.dumps({"run": str(run_dir), "task": spec.name, "split": split, "results": done.results,
                          "summary": done.summary}, indent=2, sort_keys=True))
        return
    trained_on = f"{card['task']}/{card.get('train_language')}"
    shown = scored if spec.kind == "generation" else ("accuracy", "macro_f1")
    _table(f"{spec.name} {split}: prompt of {run_dir.name} (trained on {trained_on}), unchanged",
           ["language", "n", *shown], language_rows(done.results, done.source, spec.official_languages, shown),
           right=("n", *shown))
    unlabeled = [lang for lang, r in done.results.items() if not r["labeled"]]
    if unlabeled:
        console.print(f"no labels found in the {split} files of {', '.join(unlabeled)}: predictions written only")
    console.print(f"predictions: {run_dir / 'predictions'}/{spec.name}.{split}.<lang>.tsv")


@command("predict")
def predict_cmd(
    run: Annotated[str, typer.Option("--run", help="Run folder; several comma-separated: each run's labels and their ensemble (the mean of their probabilities).")],
    input: Annotated[Path, typer.Option("--input", help="Your rows: JSON lines (.jsonl), CSV (.csv) or TSV (.tsv), with the fields the run's task card names (see --fields); each row may carry its own 'lang'.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write JSON lines: id, line, lang, the input, label, per-label probabilities, run(s), template. Written whole when every row is done.")],
    fields: Annotated[Optional[str], typer.Option(help="Map the task's fields to your columns: field=column, comma-separated (e.g. text=review).")] = None,
    lang: Annotated[Optional[str], typer.Option(help="The rows' language where they carry no 'lang' (needed only where the run scores native templates or label words).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per forward pass (default: 16 on a CPU, 64 on a GPU).")] = None,
    dtype: DTypeOption = DType.AUTO,
    device: DeviceOption = Device.CPU,
    int8: Annotated[bool, typer.Option("--int8", help="CPU: compute the frozen backbone's matrix products on int8 weights (dynamic quantisation; the rest in fp32). Faster where bf16 is not native; opt-in because predictions can differ from fp32 (docs/bench.md measures by how much).")] = False,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Label your own text with trained prompts: any language the backbone reads, streamed through in
    chunks (any file size), every malformed row named by its line."""
    from ..store import load_card

    runs = [Path(x) for x in run.split(",") if x.strip()]
    card = load_card(runs[0])
    if out.exists() and not overwrite:
        raise XPromptError(f"{out} exists; choose another --out or pass --overwrite")
    if not input.is_file():
        raise XPromptError(f"--input {input}: no such file")
    from ..workflows.predict import Predictor, count_rows, parse_fields, predict_file

    mapping = parse_fields(fields)
    bb, dtype, _ = _open_backbone(card["backbone"], cache_dir, device, dtype, revision=card.get("backbone_revision"),
                                  allow_bin_weights=bool(card.get("backbone_bin_weights")))
    if int8 and device.value != "cpu":
        raise XPromptError("--int8 runs on a CPU")
    predictor = Predictor.load(runs, bb, tasks_dir, dtype, device.value, batch_size, int8)
    with Progress(TextColumn("labelling"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        bar = progress.add_task("predict", total=count_rows(input))
        n = predict_file(predictor, input, out, mapping, lang, overwrite=overwrite,
                         on_rows=lambda k: progress.advance(bar, k))
    console.print(f"labelled {n} rows with {', '.join(r.name for r in runs)} ({predictor.task.name}: "
                  f"{', '.join(predictor.labels)}); wrote {out}")


from . import records, serve  # noqa: E402,F401  (runs, report, serve: registered on app after eval)


def main() -> None:
    run()
