"""The command line: parse, build a config, call one library function, print.

This is the one place where a domain error (``XPromptError``) becomes a one-line message and a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .config import Device, DType, TrainConfig
from .errors import XPromptError
from .prompts import Method

ENCODED = "encoded"  # subfolder of --cache-dir holding tokenised splits (Arrow)
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Zero-shot cross-lingual prompt tuning.")
library_app = typer.Typer(no_args_is_help=True, help="The library of trained prompts (the run folders): compare them.")
app.add_typer(library_app, name="library")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xprompt"


RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder holding run directories.")]
DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Data root laid out as <task>/<split>.<lang>.jsonl[.gz]; searched before the bundled copy."),
]
TasksDir = Annotated[Optional[Path], typer.Option("--tasks-dir", help="Folder of task cards (default: the bundled tasks/).")]
TrustRemote = Annotated[bool, typer.Option(help="Let a hub backbone run its own Python code (off unless you ask).")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Where the converted embedded backbone and the tokenised splits are cached.")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision of the backbone: a branch, tag, commit or refs/pr/N (where the hub keeps a .bin-only model's safetensors conversion).")]
AllowBin = Annotated[bool, typer.Option("--allow-bin-weights", help="Load a backbone that has only pytorch_model.bin weights, through torch.load(weights_only=True) (tensors only, never arbitrary unpickling). Off: safetensors only.")]
DTypeOption = Annotated[DType, typer.Option(help="Backbone compute dtype: auto (bf16 where the hardware runs it natively: GPUs with bf16, CPUs with AVX512_BF16 or AMX; else fp32), bf16 (autocast) or fp32.")]


def command(name: str | None = None, group: typer.Typer | None = None):
    """Register a command (on ``group``, default the top level) whose domain errors print one red
    line and exit 1 (tracebacks with --debug)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except XPromptError as e:
                if _state["debug"]:
                    raise
                err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None

        return (group or app).command(name)(wrapper)

    return decorate


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
):
    import datasets

    datasets.disable_progress_bars()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA call: repeatable cuBLAS
    _state["debug"] = debug


def _load_task(name: str, tasks_dir: Optional[Path]):
    from .tasks import DEFAULT_TASKS_DIR, load_task

    return load_task(name, tasks_dir or DEFAULT_TASKS_DIR)


def _data_dirs(data_dir: Optional[Path]) -> list[Path]:
    if data_dir is None:
        return []
    if not data_dir.is_dir():
        raise XPromptError(f"--data-dir {data_dir} is not a folder")
    return [data_dir]


def _device_map(value: Optional[str]) -> Optional[str]:
    """Check --device-map: 'auto' (or accelerate's 'balanced' / 'sequential'), never under a launcher."""
    from . import distributed

    if value is None:
        return None
    if value not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise typer.BadParameter(f"--device-map must be auto, balanced, balanced_low_0 or sequential, got {value!r}")
    if distributed.rank_world()[1] > 1:
        raise XPromptError("--device-map shards one backbone over the devices; run it in one process, not under torchrun")
    return value


def _open_backbone(name: str, cache_dir: Path, device: Device | str = Device.CPU, dtype: DType = DType.AUTO,
                   trust_remote_code: bool = False, device_map: Optional[str] = None, revision: Optional[str] = None,
                   allow_bin_weights: bool = False, quiet: bool = False):
    """Load a backbone onto this process's device (its GPU under torchrun) and settle ``--dtype
    auto`` there; prints the choice and its reason once. Returns (backbone, dtype, reason)."""
    from . import distributed
    from .backbones import load_backbone
    from .hardware import resolve_dtype

    where = distributed.local_device(Device(device).value)
    resolved, reason = resolve_dtype(dtype, where)
    with console.status(f"loading backbone {name}"):
        bb = load_backbone(name, cache_dir, device=str(where), trust_remote_code=trust_remote_code,
                           device_map=_device_map(device_map), revision=revision, allow_bin_weights=allow_bin_weights,
                           dtype=resolved)
    if not quiet and distributed.rank_world()[0] == 0:
        err_console.print(f"compute: {resolved.value} on {where.type} ({reason})", highlight=False)
    return bb, resolved, reason


def _discard(run_dir: Path, resume: Optional[Path], runs_dir_is_new: bool) -> None:
    """Remove a run directory that failed before its first checkpoint (never a resumed one),
    and the runs folder too if this command created it."""
    if resume is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        if runs_dir_is_new:
            shutil.rmtree(run_dir.parent, ignore_errors=True)


def _repeatable() -> None:
    """What ``--seed`` promises: the same seed gives the same bits (on CPU and, with cuBLAS's fixed
    workspace and deterministic kernels, on CUDA; set before the first CUDA call)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _versions() -> dict:
    import datasets
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@command("tasks")
def tasks_cmd(tasks_dir: TasksDir = None):
    """List the tasks, their languages and splits."""
    from .tasks import DEFAULT_TASKS_DIR, task_names

    table = Table(title="tasks")
    for column in ("task", "labels", "languages", "splits"):
        table.add_column(column)
    for name in task_names(tasks_dir or DEFAULT_TASKS_DIR):
        task = _load_task(name, tasks_dir)
        splits = "; ".join(
            f"{s} ({', '.join(task.split_languages(s))})" if s == "train" else s for s in task.splits
        )
        labels = ", ".join(task.labels) if len(task.labels) <= 6 else f"{len(task.labels)} classes"
        table.add_row(name, labels, " ".join(task.language_codes), splits)
    console.print(table)


@command()
def train(
    task: Annotated[str, typer.Option(help="Task card name.")] = "xnli",
    lang: Annotated[str, typer.Option(help="Source language to train on.")] = "en",
    backbone: Annotated[str, typer.Option(help="'e5-small' (embedded), a local folder or a Hugging Face id.")] = "e5-small",
    method: Annotated[Method, typer.Option(help="soft: input prompt (Lester); ptuning: input prompt through a trained MLP/LSTM encoder (P-tuning); deep: a prompt in every layer, as hidden states; prefix: trainable keys and values in every layer (P-tuning v2, PEFT PrefixTuning); unified: UniPrompt's two towers (the prompt through trained copies of the lower layers, joining the frozen upper layers).")] = Method.DEEP,
    tower_layers: Annotated[Optional[int], typer.Option(help="With --method unified: layers in the prompt tower (default: half the backbone's).")] = None,
    prompt_length: Annotated[int, typer.Option(help="Prompt vectors (per layer for deep).")] = TrainConfig.prompt_length,
    verbalizer: Annotated[str, typer.Option(help="auto (hard on a masked-LM backbone such as XLM-R or a seq2seq one such as mT5, else centered), soft (trained label vectors from class means, scored by distance), centered (the same vectors scored around the centre of the class means, so states drawn to the middle keep their ranking), hard (the task card's label words of each language under the frozen LM head) or soft-words (trained label vectors in the LM head's output space, started from the label words' output embeddings).")] = TrainConfig.verbalizer,
    label_reduce: Annotated[str, typer.Option(help="With a hard verbalizer: score a label word of several pieces by the mean, first or max of their log-probabilities.")] = TrainConfig.label_reduce,
    prompt_position: Annotated[str, typer.Option(help="after-bos (after <s>) or first (before <s>, where PEFT puts it: the exported PEFT adapter then gives identical outputs).")] = TrainConfig.prompt_position,
    reparam: Annotated[str, typer.Option(help="With --method ptuning: the prompt encoder, mlp or lstm (a BiLSTM then the MLP).")] = TrainConfig.reparam,
    prefix_projection: Annotated[bool, typer.Option(help="With --method deep or prefix: P-tuning v2's reparameterisation (PEFT's prefix_projection): the per-layer vectors are free tables plus an MLP of the prompt vectors (tanh, last layer starting at zero), trained end to end and saved as the resulting tables.")] = TrainConfig.prefix_projection,
    init: Annotated[str, typer.Option(help="Prompt start: vocab (sampled frequent word pieces), random, text (--init-text) or label-words (the task card's label words of --lang).")] = TrainConfig.init,
    init_text: Annotated[Optional[str], typer.Option(help="With --init text: the text whose word pieces start the prompt (repeated to the length).")] = None,
    readout: Annotated[str, typer.Option(help="State the verbalizer reads: mask (the <mask> state), mean (the mean of the input tokens), both (their average) or auto (mask for label words, else mean).")] = TrainConfig.readout,
    shots: Annotated[Optional[int], typer.Option(help="K training examples per class (default: the whole pool).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; 0 means use --epochs.")] = TrainConfig.max_steps,
    epochs: Annotated[float, typer.Option(help="Passes over the data when --max-steps is 0.")] = TrainConfig.epochs,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate (default: the task card's train_defaults.lr, else {TrainConfig.lr}).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step, over all processes and micro-batches.")] = TrainConfig.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step: the same result with less memory.")] = TrainConfig.grad_accum,
    device: Annotated[Device, typer.Option(help="cpu, cuda or auto (under torchrun each process takes GPU LOCAL_RANK).")] = Device.CPU,
    device_map: Annotated[Optional[str], typer.Option(help="'auto': spread a backbone too large for one device over the GPUs (accelerate's device_map); the prompt sits with the input embeddings. Not with torchrun.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, sampling and data order.")] = TrainConfig.seed,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds: one run per seed (a sweep), e.g. 13,21,42,87,100.")] = None,
    dtype: DTypeOption = TrainConfig.dtype,
    template: Annotated[str, typer.Option(help="agnostic (the task card's one template for every language), native (each language's own cloze template from the card) or auto (native when label words are scored: an LM head or a decoder; else agnostic).")] = TrainConfig.template,
    revision: Revision = None,
    allow_bin_weights: AllowBin = False,
    eval_every: Annotated[int, typer.Option(help="Steps between model-selection evaluations.")] = TrainConfig.eval_every,
    init_from: Annotated[Optional[str], typer.Option(help="Start from saved prompts: a run folder, several comma-separated (their weighted average), or 'library' (retrieve from the trained runs). Label vectors come along when the task's labels match.")] = None,
    init_weights: Annotated[Optional[str], typer.Option(help="Comma-separated weights of the --init-from runs (default: equal).")] = None,
    library: Annotated[Optional[Path], typer.Option(help="With --init-from library: the folder of trained runs to retrieve from (default: --runs-dir).")] = None,
    top_k: Annotated[int, typer.Option(help="With --init-from library: keep the K best-ranked prompts.")] = TrainConfig.top_k,
    rank_by: Annotated[str, typer.Option(help="With --init-from library: zero-shot (each prompt's accuracy on the held-out selection rows) or flat / mean / neurons (similarity to a probe prompt trained --probe-steps steps on this task, SPoT's recipe).")] = TrainConfig.rank_by,
    transfer: Annotated[str, typer.Option(help="With --init-from library: best (the top-k prompt with the best zero-shot selection accuracy), average (the top k weighted by their ranking scores) or mixture (one prompt trained --mixture-steps steps on the top-k tasks' data).")] = TrainConfig.transfer,
    same_task: Annotated[bool, typer.Option(help="With --init-from library: let prompts of this run's own task in (default: other tasks only, as in SPoT).")] = TrainConfig.same_task,
    probe_steps: Annotated[int, typer.Option(help="With --rank-by flat|mean|neurons: steps of the probe prompt.")] = TrainConfig.probe_steps,
    mixture_steps: Annotated[int, typer.Option(help="With --transfer mixture: steps on the mixture (examples-proportional, at most 10,000 rows counted per source).")] = TrainConfig.mixture_steps,
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
    from . import distributed, hardware
    from .store import read_json

    distributed.setup()

    if resume is not None:
        saved = read_json(resume / "config.json")
        cfg = TrainConfig.from_dict(saved["train"])
        if cfg.dtype is DType.AUTO and saved.get("compute", {}).get("dtype"):
            cfg.dtype = DType(saved["compute"]["dtype"])  # the dtype it started with: the same computation
        configs = [(cfg, resume)]
        data_dir = Path(saved["data_dir"]) if saved.get("data_dir") else None
    else:
        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else [seed]
        except ValueError:
            raise typer.BadParameter(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        try:
            weight_list = [float(x) for x in init_weights.split(",")] if init_weights else None
        except ValueError:
            raise typer.BadParameter(f"--init-weights must be comma-separated numbers, got {init_weights!r}") from None
        if weight_list is not None and not init_from:
            raise typer.BadParameter("--init-weights needs --init-from")
        configs = []
        if lr is None:
            lr = float(_load_task(task, tasks_dir).train_defaults.get("lr", TrainConfig.lr))
        for one in seed_list:
            try:
                cfg = TrainConfig(
                    task=task, lang=lang, backbone=backbone, method=method, prompt_length=prompt_length,
                    reparam=reparam, prefix_projection=prefix_projection, init=init, init_text=init_text, prompt_position=prompt_position, tower_layers=tower_layers,
                    verbalizer=verbalizer, label_reduce=label_reduce,
                    readout=readout, template=template, revision=revision, allow_bin_weights=allow_bin_weights,
                    shots=shots, max_steps=max_steps or None, epochs=epochs, lr=lr,
                    batch_size=batch_size, grad_accum=grad_accum, seed=one, dtype=dtype, eval_every=eval_every,
                    init_from=init_from, init_weights=weight_list, top_k=top_k, transfer=transfer,
                    library=str(library) if library else None, rank_by=rank_by, same_task=same_task,
                    probe_steps=probe_steps, mixture_steps=mixture_steps,
                )
            except ValueError as e:
                raise typer.BadParameter(str(e)) from None
            name = run_name and (f"{run_name}-s{one}" if len(seed_list) > 1 else run_name)
            existing = runs_dir / name if name else None
            if existing is not None and (existing / "config.json").is_file():
                if read_json(existing / "config.json").get("train") != cfg.to_dict():
                    raise XPromptError(
                        f"run {existing} exists with another config; choose another --run-name or --resume it"
                    )
                configs.append((cfg, existing))  # the same command again on the same run: continue it
            else:
                configs.append((cfg, name))
    first = configs[0][0]
    spec = _load_task(first.task, tasks_dir)
    spec.check_languages([first.lang], "train")
    dirs = _data_dirs(data_dir)
    bb, resolved, reason = _open_backbone(first.backbone, cache_dir, device, first.dtype, trust_remote_code, device_map,
                                          first.revision, first.allow_bin_weights)
    compute = {"dtype": resolved.value, "reason": reason, "device": device.value, **hardware.describe(device.value)}
    for cfg, target in configs:
        _train_one(cfg, bb, spec, target, runs_dir, dirs, data_dir, device, cache_dir / ENCODED, tasks_dir, compute)


def _train_one(cfg: TrainConfig, bb, spec, target, runs_dir: Path, dirs: list[Path], data_dir: Optional[Path],
               device: Device = Device.CPU, encoded_cache: Optional[Path] = None, tasks_dir: Optional[Path] = None,
               compute: Optional[dict] = None) -> None:
    """Train one run: ``target`` is an existing run folder to resume, or the new run's name (None: default).
    Under a launcher, rank 0 creates, locks, writes and prints; the other processes only compute."""
    import contextlib

    import torch

    from . import distributed
    from .registry import index_run
    from .store import default_run_name, new_run_dir, read_json, run_lock, write_json
    from .training import train as run_training

    _repeatable()
    rank, world = distributed.rank_world()
    main = rank == 0
    runs_dir_is_new = not runs_dir.exists()
    resume = target if isinstance(target, Path) else None
    if resume is not None:
        run_dir = resume
        saved = read_json(resume / "config.json")
        if (resume / "prompt" / "prompt.safetensors").is_file():
            raise XPromptError(f"run {resume} already finished; evaluate it with 'xprompt eval --run {resume}'")
        if saved["backbone"]["sha256"] != bb.sha256:
            raise XPromptError(f"{resume}: the backbone's weights changed since the run started; start a new run")
        changed = {k: (v, _versions().get(k)) for k, v in saved.get("versions", {}).items() if _versions().get(k) != v}
        if changed:
            err_console.print("warning: versions differ from the run's start, so the resumed prompt may not be "
                              "bit-identical: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    else:
        run_dir = None
        if main:
            run_dir = new_run_dir(runs_dir, target or default_run_name(cfg.task, cfg.lang, cfg.method.value, cfg.seed))
            write_json(run_dir / "config.json", {
                "train": cfg.to_dict(), "xprompt_version": __version__, "git_commit": _git_commit(),
                "versions": _versions(), "compute": compute or {},
                "backbone": {"name": bb.name, "kind": bb.kind, "sha256": bb.sha256, "revision": bb.revision},
                "task_version": spec.version, "data_dir": str(data_dir) if data_dir else None,
            })
        run_dir = distributed.broadcast(run_dir)
    if main:
        console.print(f"run [bold]{run_dir}[/bold]: {cfg.task}/{cfg.lang}, {cfg.method.value} prompt "
                      f"x{cfg.prompt_length}, seed {cfg.seed}, {bb.name}"
                      + (f", {world} processes" if world > 1 else ""))
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False, disable=not main,
    ) as progress:
        bar = progress.add_task("train", total=None, info="")

        def on_step(step, total, loss, rate):
            progress.update(bar, completed=step, total=total, info=f"loss {loss:.3f} | {rate:.1f} ex/s")

        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with run_lock(run_dir) if main else contextlib.nullcontext():
                summary = run_training(cfg, bb, spec, run_dir, dirs, on_step=on_step, device=device,
                                       cache_dir=encoded_cache, tasks_dir=tasks_dir)
        except KeyboardInterrupt:
            if not (run_dir / "checkpoint").is_dir():
                if main:
                    _discard(run_dir, resume, runs_dir_is_new)
                raise XPromptError("interrupted before the first checkpoint; nothing was kept") from None
            raise XPromptError(
                f"interrupted; the checkpoint is saved: continue with 'xprompt train --resume {run_dir}'"
            ) from None
        except XPromptError:
            if main and not (run_dir / "checkpoint").is_dir():
                _discard(run_dir, resume, runs_dir_is_new)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    if not main:
        return
    index_run(run_dir.parent, run_dir)
    console.print(
        f"done in {summary['train_seconds']:.0f}s ({summary['train_examples_per_s']:.1f} ex/s); "
        f"{summary['data']}; best step {summary['best_step']} with {100 * summary['select_accuracy']:.1f} "
        f"held-out {cfg.lang} accuracy; prompt saved to {run_dir / 'prompt'}"
    )


@command("eval")
def evaluate_cmd(
    langs: Annotated[str, typer.Option(help="Comma-separated languages, or 'all'.")] = "all",
    run: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help="Run directory (default: the latest under --runs-dir). Under torchrun write --run-dir: its parser takes --run for its own --run-path.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task to evaluate on (default: the run's task).")] = None,
    split: Annotated[str, typer.Option(help="dev or test (test files carry no labels: predictions only).")] = "dev",
    limit: Annotated[Optional[int], typer.Option(help="At most N rows per language.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone (default: the run's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 64,
    dtype: DTypeOption = DType.AUTO,
    device: Annotated[Device, typer.Option(help="cpu, cuda or auto (under torchrun the languages are shared out over the processes).")] = Device.CPU,
    device_map: Annotated[Optional[str], typer.Option(help="'auto': spread a backbone too large for one device over the GPUs (accelerate's device_map); the prompt sits with the input embeddings. Not with torchrun.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
    shots: Annotated[Optional[int], typer.Option(help="Few-shot: adapt a copy of the prompt on K examples per class of each target language (its train split, else K from dev, evaluating on the rest of dev) and report both numbers.")] = None,
    adapt_steps: Annotated[int, typer.Option(help="Training steps of each few-shot adaptation.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the few-shot sample and adaptation.")] = 42,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of the backbone (default: the one the run was trained at).")] = None,
    allow_bin_weights: AllowBin = False,
    trust_remote_code: TrustRemote = False,
    runs_dir: RunsDir = Path("runs"),
    data_dir: DataDir = None,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Apply a run's prompt unchanged to each language; print and store the results.
    With --shots K, also adapt a copy per language on K target examples per class.
    Under torchrun / accelerate launch the languages are shared out over the processes and merged."""
    from . import distributed
    from .evaluation import evaluate_languages, load_run_model
    from .registry import index_run
    from .reports import language_rows, summarize
    from .store import latest_run, load_prompt, read_json, write_json, write_text

    if split not in ("dev", "test", "train"):
        raise typer.BadParameter(f"unknown split '{split}'; known: dev, test, train")
    if limit is not None and limit < 1:
        raise typer.BadParameter("--limit must be at least 1")
    run_dir = run or latest_run(runs_dir)
    _, card = load_prompt(run_dir)
    spec = _load_task(task or card["task"], tasks_dir)
    wanted = spec.split_languages(split) if langs == "all" else [x.strip() for x in langs.split(",") if x.strip()]
    spec.check_languages(wanted, split)
    dirs = _data_dirs(data_dir)
    rank, world = distributed.setup()
    bb, dtype, _ = _open_backbone(backbone or card["backbone"], cache_dir, device, dtype, trust_remote_code, device_map,
                                  revision or card.get("backbone_revision"),
                                  allow_bin_weights or bool(card.get("backbone_bin_weights")))
    model, card = load_run_model(run_dir, bb)
    model.place(distributed.local_device(device))
    if shots:
        if world > 1:
            raise XPromptError("--shots adaptation runs in one process; start it without torchrun")
        _adapt(run_dir, card, model, bb, spec, wanted, split, dirs, data_dir, shots, adapt_steps, seed,
               limit, batch_size, dtype, cache_dir / ENCODED, device)
        return
    bridge = spec.bridge_from(card["task"], card["labels"])
    source = card.get("train_language", spec.source_language) if card["task"] == spec.name else None

    def on_language(lang, result):
        if not as_json:
            acc = f"{100 * result['accuracy']:.1f}" if result["labeled"] else "no labels"
            err_console.print(f"  {lang}: {result['n']} rows, {acc}, {result['pairs_per_s']} pairs/s")

    mine = evaluate_languages(
        model, spec, bb.tokenizer, wanted[rank::world], split, dirs, limit, batch_size, dtype=dtype,
        on_language=on_language, bridge=bridge, cache_dir=cache_dir / ENCODED,
        template=card.get("template_style", "agnostic"),
    )
    merged = {lang: result for part in distributed.gather(mine) for lang, result in part.items()}
    if rank != 0:
        return
    results = {lang: merged[lang] for lang in wanted}
    for lang, result in results.items():
        lines = ["id\tprediction"] + [f"{i}\t{p}" for i, p in zip(result.pop("ids"), result.pop("predictions"))]
        write_text(run_dir / "predictions" / f"{spec.name}.{split}.{lang}.tsv", "\n".join(lines) + "\n")
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    entry = metrics.setdefault("eval", {}).setdefault(spec.name, {}).setdefault(split, {})
    for lang, result in results.items():
        entry[lang] = {**result, "limit": limit, "dtype": dtype.value}
    summary = summarize(results, source)
    write_json(metrics_path, metrics)
    index_run(run_dir.parent, run_dir)
    if as_json:
        print(json.dumps({"run": str(run_dir), "task": spec.name, "split": split, "results": results,
                          "summary": summary}, indent=2, sort_keys=True))
        return
    trained_on = f"{card['task']}/{card.get('train_language')}"
    table = Table(title=f"{spec.name} {split}: prompt of {run_dir.name} (trained on {trained_on}), unchanged")
    for column in ("language", "n", "accuracy", "macro-F1"):
        table.add_column(column, justify="left" if column == "language" else "right")
    for row in language_rows(results, source):
        table.add_row(*row)
    console.print(table)
    unlabeled = [lang for lang, r in results.items() if not r["labeled"]]
    if unlabeled:
        console.print(f"no labels found in the {split} files of {', '.join(unlabeled)}: predictions written only")
    console.print(f"predictions: {run_dir / 'predictions'}/{spec.name}.{split}.<lang>.tsv")


def _adapt(run_dir, card, model, bb, spec, langs, split, dirs, data_dir, shots, steps, seed, limit, batch_size, dtype,
           encoded_cache=None, device=Device.CPU):
    """Target-language few-shot: per language, continue a copy of the prompt on K examples per
    class, then evaluate the zero-shot and the adapted prompt on the same rows."""
    from .evaluation import evaluate_languages, load_run_model
    from .registry import index_run
    from .store import read_json, write_json

    if card["task"] != spec.name:
        raise XPromptError(f"--shots adapts on the run's own task ({card['task']}); drop --task {spec.name}")
    if split != "dev":
        raise XPromptError("--shots reports accuracies, so it needs --split dev")
    base = read_json(run_dir / "config.json")["train"]
    table = Table(title=f"{spec.name} {split}: zero-shot prompt of {run_dir.name} vs {shots}-shot adaptation "
                        f"({steps} steps, seed {seed})")
    for column in ("language", "n", "zero-shot", f"{shots}-shot", "change", "adapted from"):
        table.add_column(column, justify="left" if column in ("language", "adapted from") else "right")
    for lang in langs:
        source_split = "train" if lang in spec.split_languages("train") else "dev"
        try:
            cfg = TrainConfig.from_dict({**base, "lang": lang, "shots": shots, "seed": seed, "max_steps": steps,
                                         "dtype": DType(dtype).value,
                                         "eval_every": max(1, steps // 2), "source_split": source_split,
                                         "init_from": str(run_dir)})
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        name = f"{run_dir.name}-adapt-{lang}-k{shots}-s{seed}"
        adapted_dir = run_dir.parent / name
        if not (adapted_dir / "prompt" / "prompt.safetensors").is_file():
            _train_one(cfg, bb, spec, adapted_dir if adapted_dir.is_dir() else name, run_dir.parent, dirs, data_dir,
                       device=device, encoded_cache=encoded_cache)
        used = read_json(adapted_dir / "metrics.json")["train"].get("used_ids") or []
        exclude = {lang: set(used)}
        style = card.get("template_style", "agnostic")
        zero = evaluate_languages(model, spec, bb.tokenizer, [lang], split, dirs, limit, batch_size, dtype=dtype,
                                  exclude_ids=exclude, cache_dir=encoded_cache, template=style)[lang]
        adapted_model, _ = load_run_model(adapted_dir, bb)
        few = evaluate_languages(adapted_model, spec, bb.tokenizer, [lang], split, dirs, limit, batch_size,
                                 dtype=dtype, exclude_ids=exclude, cache_dir=encoded_cache, template=style)[lang]
        metrics = read_json(adapted_dir / "metrics.json")
        for result in (zero, few):
            result.pop("ids")
            result.pop("predictions")
        entry = {**few, "zero_shot": zero, "rows": f"{split} minus the {len(used)} adaptation rows" if used else split}
        metrics.setdefault("eval", {}).setdefault(spec.name, {}).setdefault(split, {})[lang] = entry
        write_json(adapted_dir / "metrics.json", metrics)
        index_run(run_dir.parent, adapted_dir)
        table.add_row(lang, str(few["n"]), f"{100 * zero['accuracy']:.1f}", f"{100 * few['accuracy']:.1f}",
                      f"{100 * (few['accuracy'] - zero['accuracy']):+.1f}", f"{source_split} ({name})")
    console.print(table)


class Format(str, Enum):
    MD = "md"
    CSV = "csv"
    JSON = "json"
    HTML = "html"


@command("runs")
def runs_cmd(
    task: Annotated[Optional[str], typer.Option(help="Only runs of this task.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Only runs of this method.")] = None,
    lang: Annotated[Optional[str], typer.Option(help="Only runs trained on this language.")] = None,
    rebuild: Annotated[bool, typer.Option(help="Recreate the index from the run folders first.")] = False,
    runs_dir: RunsDir = Path("runs"),
):
    """List the runs in the registry (an SQLite index beside the run folders)."""
    from .registry import list_runs, rebuild as rebuild_index

    if rebuild:
        console.print(f"indexed {rebuild_index(runs_dir)} runs")
    table = Table(title=f"runs in {runs_dir}")
    for column in ("run", "task", "lang", "method", "len", "shots", "seed", "done", "held-out acc", "evaluated"):
        table.add_column(column)
    for run in list_runs(runs_dir, task=task, method=method, lang=lang):
        evaluated = sorted({f"{r['task']}/{r['split']}" for r in run["results"]})
        acc = run["select_accuracy"]
        table.add_row(run["run_id"], run["task"], run["lang"], run["method"], str(run["prompt_length"]),
                      str(run["shots"] or "all"), str(run["seed"]), "yes" if run["finished"] else "no",
                      "" if acc is None else f"{100 * acc:.1f}", ", ".join(evaluated))
    console.print(table)


@command("similar", library_app)
def library_similar(
    run: Annotated[Path, typer.Argument(help="The run whose prompt to compare with the others.")],
    measure: Annotated[str, typer.Option(help="Rank by flat (cosine of the flattened prompts), mean (cosine of the mean prompt vectors) or neurons (shared activated FFN neurons).")] = "flat",
    top_k: Annotated[int, typer.Option(help="Show the K most similar prompts.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    allow_bin_weights: AllowBin = False,
    runs_dir: RunsDir = Path("runs"),
    cache_dir: CacheDir = _default_cache(),
):
    """Rank the library's prompts (finished runs under --runs-dir on the same backbone, of the same
    shape) by similarity to RUN's prompt: all three measures of the transferability paper."""
    from .data import sequence_ends
    from .evaluation import load_run_model
    from .similarity import MEASURES, activated_neurons, flat_cosine, mean_cosine, neuron_overlap, prompt_shapes
    from .store import load_prompt

    if measure not in MEASURES:
        raise typer.BadParameter(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    tensors, card = load_prompt(run)
    bb, _, _ = _open_backbone(card["backbone"], cache_dir, revision=card.get("backbone_revision"),
                              allow_bin_weights=allow_bin_weights or bool(card.get("backbone_bin_weights")), quiet=True)
    ids = sequence_ends(bb.tokenizer)
    model, _ = load_run_model(run, bb)
    active = activated_neurons(model, *ids)
    rows, skipped = [], 0
    candidates = sorted(p.parent.parent for p in Path(runs_dir).glob("*/prompt/prompt.safetensors"))
    for other in candidates:
        if other.resolve() == Path(run).resolve():
            continue
        other_tensors, other_card = load_prompt(other)
        same_shape = prompt_shapes(other_tensors) == prompt_shapes(tensors)  # label sets may differ
        if other_card.get("backbone_sha256") != card.get("backbone_sha256") or not same_shape:
            skipped += 1
            continue
        other_model, _ = load_run_model(other, bb)
        rows.append({
            "run": other.name, "task": other_card["task"], "lang": other_card.get("train_language"),
            "flat": flat_cosine(tensors, other_tensors), "mean": mean_cosine(tensors, other_tensors),
            "neurons": neuron_overlap(active, activated_neurons(other_model, *ids)),
        })
    rows.sort(key=lambda r: r[measure], reverse=True)
    rows = rows[:top_k]
    if as_json:
        print(json.dumps({"run": str(run), "measure": measure, "similar": rows, "skipped": skipped}, indent=2))
        return
    table = Table(title=f"prompts most similar to {Path(run).name} ({card['task']}/{card.get('train_language')}), by {measure}")
    for column in ("run", "task", "lang", "flat cosine", "mean cosine", "neuron overlap"):
        table.add_column(column, justify="right" if "cos" in column or "overlap" in column else "left")
    for r in rows:
        table.add_row(r["run"], r["task"], str(r["lang"]), f"{r['flat']:.3f}", f"{r['mean']:.3f}", f"{r['neurons']:.3f}")
    console.print(table)
    if skipped:
        console.print(f"{skipped} prompt(s) of another backbone or shape left out")


def _backbone_identity(name: str, cache_dir: Path) -> tuple[str, dict]:
    """(weights sha256, config) of a backbone without loading its weights where it is on disk."""
    from .backbones import EMBEDDED_NAME, load_backbone, weights_sha256
    from .backbones.embedded import embedded_folder
    from .store import read_json

    folder = embedded_folder(cache_dir) if name == EMBEDDED_NAME else Path(name)
    if folder.is_dir() and (folder / "config.json").is_file():
        return weights_sha256(folder), read_json(folder / "config.json")
    bb = load_backbone(name, cache_dir)
    return bb.sha256, bb.model.config.to_dict()


@command("list", library_app)
def library_list(runs_dir: RunsDir = Path("runs")):
    """Every trained prompt under --runs-dir: task, language, backbone and weights hash, method, shape, held-out score."""
    from .store import load_prompt

    table = Table(title=f"prompt library in {runs_dir}")
    for column in ("run", "task", "lang", "backbone", "weights", "method", "shape", "held-out acc"):
        table.add_column(column)
    for run in sorted(p.parent.parent for p in Path(runs_dir).glob("*/prompt/prompt.safetensors")):
        tensors, card = load_prompt(run)
        acc = card.get("selection", {}).get("select_accuracy")
        shape = " + ".join("x".join(map(str, t.shape)) for k, t in tensors.items() if k != "verbalizer.weight")
        table.add_row(run.name, card.get("task", "?"), str(card.get("train_language")), str(card.get("backbone")),
                      str(card.get("backbone_sha256"))[:12], str(card.get("method")), shape,
                      "" if acc is None else f"{100 * acc:.1f}")
    console.print(table)


@command("show", library_app)
def library_show(run: Annotated[Path, typer.Argument(help="The run whose prompt card to show.")]):
    """A library prompt's card: task, languages, labels, backbone and hash, method and shape, how it
    was trained and initialised, its held-out score and its evaluations."""
    from .store import load_prompt, read_json

    tensors, card = load_prompt(run)
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    shown = {
        **{k: v for k, v in card.items() if k != "selection"},
        "tensors": {k: list(t.shape) for k, t in tensors.items()},
        "training": card.get("selection", {}),
        "evaluations": {task: {split: {lang: r.get("accuracy") for lang, r in langs.items()}
                               for split, langs in splits.items()}
                        for task, splits in metrics.get("eval", {}).items()},
    }
    shown["training"].pop("used_ids", None)
    print(json.dumps(shown, indent=2, ensure_ascii=False))


@command("remove", library_app)
def library_remove(
    run: Annotated[Path, typer.Argument(help="The run to delete from the library (its whole folder).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
):
    """Delete a run's folder (prompt, checkpoint, results) and its rows in the index."""
    import shutil

    from .registry import forget_run
    from .store import run_lock

    if not (run / "config.json").is_file() and not (run / "prompt").is_dir():
        raise XPromptError(f"{run} is not a run folder (no config.json or prompt/); nothing removed")
    if not yes and not typer.confirm(f"delete {run} and everything in it?"):
        raise typer.Exit(1)
    # refused while a trainer holds the run; renamed first, so that an interrupted delete never
    # leaves a half-removed run that still looks finished
    doomed = run.with_name(f".removing-{run.name}")
    with run_lock(run):
        run.rename(doomed)
    forget_run(run.parent, run.name)
    shutil.rmtree(doomed)
    console.print(f"removed {run}")


@command("transfer", library_app)
def library_transfer(
    task: Annotated[str, typer.Option(help="Target task card name.")],
    lang: Annotated[Optional[str], typer.Option(help="Target language (default: the task's source language).")] = None,
    split: Annotated[str, typer.Option(help="Split to score on (dev; never test).")] = "dev",
    limit: Annotated[int, typer.Option(help="Rows of the split to score on (the first N).")] = 300,
    backbone: Annotated[str, typer.Option(help="The backbone whose library prompts to score.")] = "e5-small",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    dtype: DTypeOption = DType.AUTO,
    revision: Revision = None,
    allow_bin_weights: AllowBin = False,
    runs_dir: RunsDir = Path("runs"),
    data_dir: DataDir = None,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Task similarity by zero-shot transfer: every library prompt on this backbone applied unchanged
    to a target task's rows. Label vectors are the prompt's own for a prompt of this task or of a task
    the card maps labels from (its 'transfer'), else the class means of up to 256 of the task's
    training rows read through the prompt; no training step."""
    import numpy as np

    from .config import TrainConfig
    from .data import load_split
    from .library import library_prompts, transfer_scores
    from .training import init_sample

    spec = _load_task(task, tasks_dir)
    lang = lang or spec.source_language
    spec.check_languages([lang], split)
    dirs = _data_dirs(data_dir)
    bb, dtype, _ = _open_backbone(backbone, cache_dir, dtype=dtype, revision=revision, allow_bin_weights=allow_bin_weights)
    candidates = library_prompts(runs_dir, bb.sha256)
    if not candidates:
        raise XPromptError(f"no prompt under {runs_dir} was trained on '{backbone}'; build a library first "
                           "(scripts/build_library.py)")
    rows = load_split(spec, lang, split, dirs)
    rows = rows.select(range(min(limit, len(rows))))
    defaults = TrainConfig()
    sample = None  # without a train split only prompts with a declared label map can be scored
    if "train" in spec.splits:
        train_lang = lang if lang in spec.split_languages("train") else spec.source_language
        sample = init_sample(load_split(spec, train_lang, "train", dirs), defaults.init_examples, defaults.seed)
    with console.status(f"scoring {len(candidates)} prompts on {len(rows)} {task}/{lang} {split} rows"):
        scores = transfer_scores(bb, spec, lang, candidates, rows, sample, dtype, defaults.max_length, cache_dir / ENCODED)
    counts = np.bincount(np.asarray(rows["label"]), minlength=len(spec.labels))
    majority = float(counts.max() / len(rows))
    result = sorted(({"run": c.run.name, "task": c.card.get("task"), "lang": c.card.get("train_language"),
                      "label_vectors": used, "accuracy": a}
                     for c, (a, used) in zip(candidates, scores)), key=lambda r: -(r["accuracy"] or -1))
    if as_json:
        print(json.dumps({"task": task, "lang": lang, "split": split, "n": len(rows), "majority": majority,
                          "transfer": result}, indent=2))
        return
    table = Table(title=f"zero-shot transfer to {task}/{lang} {split} (first {len(rows)} rows; majority label {100 * majority:.1f})")
    for column in ("run", "task", "lang", "label vectors", "accuracy"):
        table.add_column(column, justify="right" if column == "accuracy" else "left")
    for r in result:
        table.add_row(r["run"], r["task"], str(r["lang"]), r["label_vectors"],
                      "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}")
    console.print(table)


@command("export", library_app)
def library_export(
    run: Annotated[Path, typer.Argument(help="The run whose prompt to export.")],
    out: Annotated[Path, typer.Option(help="Folder to write <run-name>/ into (config, prompt, metrics).")],
):
    """Copy a run's prompt (safetensors + card), config and metrics into a portable folder."""
    from .store import copy_prompt_folder, load_prompt

    load_prompt(run)  # refuses a folder without a readable prompt
    target = out / run.name
    copy_prompt_folder(run, target)
    console.print(f"exported {run} to {target}")


@command("import", library_app)
def library_import(
    folder: Annotated[Path, typer.Argument(help="An exported prompt folder (holding prompt/).")],
    backbone: Annotated[Optional[str], typer.Option(help="The backbone it must fit (default: the one its card names).")] = None,
    runs_dir: RunsDir = Path("runs"),
    cache_dir: CacheDir = _default_cache(),
):
    """Add an exported prompt to the library; refuses one trained on other backbone weights or of a shape the backbone cannot hold."""
    from .registry import index_run
    from .similarity import check_prompt_fits
    from .store import copy_prompt_folder, load_prompt

    tensors, card = load_prompt(folder)
    name = backbone or card.get("backbone")
    if not name:
        raise XPromptError(f"{folder}/prompt/xprompt.json names no backbone; pass --backbone")
    sha, config = _backbone_identity(name, cache_dir)
    if card.get("backbone_sha256") != sha:
        raise XPromptError(
            f"{folder}: the prompt was trained on weights {str(card.get('backbone_sha256'))[:12]} "
            f"('{card.get('backbone')}'), backbone '{name}' has {sha[:12]}; a prompt only works on its own backbone"
        )
    check_prompt_fits(tensors, int(config["hidden_size"]), int(config["num_hidden_layers"]), f"{folder}/prompt")
    target = runs_dir / folder.name
    copy_prompt_folder(folder, target, {"imported_from": str(folder.resolve())})
    index_run(runs_dir, target)
    console.print(f"imported {folder} as {target}")


@command("report")
def report_cmd(
    task: Annotated[str, typer.Option(help="Task whose evaluations to rank.")] = "xnli",
    split: Annotated[str, typer.Option(help="dev or test (test files carry no labels here).")] = "dev",
    fmt: Annotated[Format, typer.Option("--format", help="md, csv, json or html (one self-contained page with charts).")] = Format.MD,
    out: Annotated[Optional[Path], typer.Option(help="Write the report here instead of printing it.")] = None,
    xtreme: Annotated[Optional[Path], typer.Option(help="Also write XTREME submission files (<dir>/<task>/test-<lang>.tsv) from the test predictions of --run or the best row.")] = None,
    run: Annotated[Optional[Path], typer.Option(help="The run whose test predictions --xtreme uses.")] = None,
    runs_dir: RunsDir = Path("runs"),
    tasks_dir: TasksDir = None,
):
    """Leaderboard over every run: sweeps (runs differing only in seed) as mean +- std per language,
    the averages over targets and with the source language, the gap, and published reference rows.
    Reads stored results only; never runs a model."""
    from .registry import list_runs
    from .reports import leaderboard, published_rows, render, xtreme_files
    from .store import write_text
    from .tasks import DEFAULT_TASKS_DIR

    _load_task(task, tasks_dir)
    rows = leaderboard(list_runs(runs_dir), task, split)
    published_file = (tasks_dir or DEFAULT_TASKS_DIR) / "published" / "reference.yaml"
    published = published_rows(published_file, task) if published_file.is_file() else []
    text = render(rows, published, fmt.value, title=f"xprompt leaderboard: {task} {split}")
    if xtreme is not None:
        source = run or (Path(runs_dir) / rows[0]["runs"][0] if rows else None)
        if source is None:
            raise XPromptError(f"no evaluated run of {task} under {runs_dir}; pass --run for --xtreme")
        written = xtreme_files(source, task, xtreme)
        if not written:
            raise XPromptError(f"{source} has no test predictions of {task}; run 'xprompt eval --split test' first")
        err_console.print(f"wrote {len(written)} XTREME files under {xtreme / task} from {source.name}")
    if out:
        write_text(out, text)
        console.print(f"wrote {out}")
    else:
        print(text, end="")


def main() -> None:
    app()
