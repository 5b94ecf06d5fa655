"""Training runs as a user starts them: ``train`` (one prompt: its data, model, start, the loop,
the saved prompt and card) and ``train_runs`` (one run per seed: the run folder and its provenance,
the existing-run policy, locking, signals, and what is discarded when a run fails early)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__, distributed
from ..augment import neighbour_swap
from ..backbones import Backbone
from ..config import DType, TrainConfig
from ..data import prepare_data, sequence_ends
from ..errors import XPromptError
from ..evaluation import generate_texts, predict, text_scores
from ..fileio import read_json, write_json
from ..hardware import eval_batch_size, resolve_dtype
from ..lineage import external, load_lineage, make_lineage, new_run_id, read_record, run_id, write_lineage
from ..model import build_model
from ..checks import check_run, is_adapter, settle_readout_template
from ..peft_io import write_adapter
from ..pretraining import CORPUS_LANGUAGE
from ..registry import index_run
from ..selftrain import self_train
from ..start import init_prompt_and_verbalizer, init_sample, prompt_card, restore, set_class_means
from ..store import default_run_name, new_run_dir, run_lock, save_prompt
from ..tasks import TaskSpec
from ..training import fit
from ..tuning import PREFIX as TUNED, BackboneTuning, stored_bytes
from ..transfer import CHOICE_FILE, LIBRARY, init_from_library, library_starts, start_from_runs
from ..generation import generation_head
from ..verbalizers import make_verbalizer, resolve_choices, task_label_words


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def repeatable() -> None:
    """What ``--seed`` promises: the same seed gives the same bits (on CPU and, with cuBLAS's fixed
    workspace and deterministic kernels, on CUDA; the workspace is set before the first CUDA call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def settle(cfg: TrainConfig, backbone: Backbone, device) -> TrainConfig:
    """Every ``auto`` of a config settled for this backbone and device (the card says which)."""
    kind, readout = resolve_choices(backbone, cfg.verbalizer, cfg.readout)
    readout, template = settle_readout_template(cfg, kind, readout)  # and --prompt-text's <mask>
    dtype, _ = resolve_dtype(cfg.dtype, device)
    # (m)T5 has no <s>, and a --prompt-text prompt leads: the prompt comes first
    position = cfg.prompt_position if sequence_ends(backbone.tokenizer)[0] is not None and not cfg.prompt_text else "first"
    return dataclasses.replace(cfg, verbalizer=kind, readout=readout, template=template, dtype=dtype,
                               prompt_position=position)


def train(cfg: TrainConfig, backbone: Backbone, task: TaskSpec, run_dir: Path, data_dirs: list[Path] | None = None,
          on_step=None, device: str = "cpu", cache_dir: Path | None = None, tasks_dir: Path | None = None,
          on_phase=None) -> dict:
    """Train one prompt into ``run_dir``: ``prompt/`` (safetensors, card, PEFT twin), ``metrics.json``,
    ``log.jsonl`` and a ``checkpoint/`` (a run with one resumes exactly). Under ``torchrun`` every
    process runs this; only rank 0 writes. ``on_phase`` (``xprompt.phases``) hears every phase
    before the first step: tokenising, the label vectors' class means, the step-0 selection pass."""
    from ..phases import phase_or_silent

    phase = phase_or_silent(on_phase)
    rank, world = distributed.rank_world()
    main = rank == 0
    where = distributed.local_device(device)
    seed_everything(cfg.seed)
    cfg = settle(cfg, backbone, where)
    tuning = BackboneTuning.start(cfg, backbone)  # --tune full/bitfit/lora/head: trains its own copy of the backbone
    backbone = tuning.backbone if tuning is not None else backbone
    data = prepare_data(cfg, task, backbone.tokenizer, data_dirs, cache_dir, phase)
    if task.kind == "generation":
        if cfg.shots:
            raise XPromptError("--shots samples K rows per class: a generation task has no classes")
        verbalizer = generation_head(backbone)
    else:
        verbalizer = make_verbalizer(backbone, cfg.verbalizer, list(task.labels), task_label_words(task), cfg.lang,
                                     cfg.label_reduce, cfg.readout)
    model = build_model(backbone, len(task.labels), cfg.method, cfg.prompt_length, cfg.readout, cfg.reparam,
                        cfg.prompt_position, verbalizer, cfg.tower_layers, cfg.prefix_projection,
                        cfg.prompt_text).place(where)
    if tuning is not None:
        tuning.attach(model)
    if backbone.sharded:
        where = backbone.input_device()  # batches go where the input embeddings are
    missing = init_prompt_and_verbalizer(model, backbone, data.train, cfg, task, phase)
    pad = backbone.tokenizer.pad_token_id
    # every process scores its shard of the selection rows; the counts are summed
    select_part = data.select.shard(world, rank, contiguous=True) if world > 1 else data.select

    passes = []
    last_rows: dict = {}  # a plain dict, not the scorer itself: no reference cycle keeps the model alive

    def select_accuracy() -> float:
        """The selection accuracy; its first pass (step 0, before any step) is a phase of its own."""
        passes.append(1)
        if len(passes) > 1:
            return score_selection()
        with phase(f"step-0 selection pass on {len(data.select):,} held-out {cfg.lang} rows", len(select_part)) as advance:
            return score_selection(advance)

    def score_selection(on_rows=None) -> float:
        if task.kind == "generation":  # chrF of what it writes for the held-out rows, over every process's share
            texts = [t for part in distributed.gather(generate_texts(model, select_part, backbone.tokenizer,
                                                                      dtype=cfg.dtype)) for t in part]
            references = [t for part in distributed.gather(list(select_part["target"])) for t in part]
            return text_scores(texts, references, cfg.lang, (task.metric,))[task.metric]
        hits = predict(model, select_part, eval_batch_size(where), pad, cfg.dtype, on_rows) == np.asarray(select_part["label"])
        if world == 1:  # the per-row record (evaluation.selection_rows): one process sees every row
            last_rows["rows"] = "".join("01"[int(h)] for h in hits)
        correct, n = distributed.sum_ints(int(hits.sum()), len(select_part))
        return correct / n

    select_accuracy.last_rows = last_rows
    init_note = None
    if cfg.init_from == LIBRARY:
        init_note = init_from_library(model, cfg, backbone, task, Path(run_dir), select_accuracy, data.train, where,
                                      data_dirs, tasks_dir, cache_dir, main)
    elif cfg.init_from:
        init_note, took = start_from_runs(model, [Path(x) for x in cfg.init_from.split(",")], cfg.init_weights,
                                          backbone, task)
        if not took:  # class means read through the prompt it starts from, not the discarded vocabulary one
            set_class_means(model, init_sample(data.train, cfg.init_examples, cfg.seed), pad, cfg.dtype)

    transform = augmented = None
    if cfg.augment == "neighbours":
        transform, augmented = neighbour_swap(backbone, data.train, cfg.augment_rate, cfg.seed)
    done = fit(model, data.train, select_accuracy, cfg, run_dir, where, pad, on_step, transform, majority_share(data.select))
    fits, self_training = [done], None
    if cfg.unlabeled:  # rounds from the best prompt so far, selected on English held-out rows again
        restore(model, done.best["tensors"])
        done, self_training = self_train(model, cfg, task, data.train, select_accuracy, run_dir, where, pad,
                                         backbone.tokenizer, data_dirs, cache_dir, on_step, transform)
        fits.append(done)
    seconds, seen = sum(f.seconds for f in fits), sum(f.seen for f in fits)
    step_seconds = sum(f.step_seconds if f.step_seconds is not None else f.seconds for f in fits)
    select_seconds, select_passes = sum(f.select_seconds for f in fits), sum(f.select_passes for f in fits)
    summary = {
        "train_rows": len(data.train),
        "dtype": cfg.dtype.value,
        "data": data.describe,
        "steps": sum(f.steps for f in fits),
        "best_step": done.best["step"],
        "select_accuracy": round(done.best["accuracy"], 4),
        **({"checkpoint_average": fits[0].average} if fits[0].average else {}),
        **({"restarts": fits[0].restarts} if fits[0].restarts else {}),
        "train_seconds": round(seconds, 1),  # the loop's wall time, its selection passes included
        "train_examples": seen,
        "step_seconds": round(step_seconds, 4),  # the training steps alone
        "train_examples_per_s": round(seen / step_seconds, 2) if step_seconds > 0 else None,  # steps only
        "select_seconds": round(select_seconds, 4),  # every selection pass, step 0's included
        "select_passes": select_passes,
        "select_rows": len(data.select),
        "trainable_parameters": done.trainable_parameters,
        "init_from": cfg.init_from,
        "init": init_note or f"{cfg.init} prompt start, class-mean label vectors",
        "source_split": cfg.source_split,
        "used_ids": data.used_ids if cfg.source_split != "train" else None,
    }
    lineage = run_lineage(cfg, task, Path(run_dir), data, self_training)
    summary["protocol"] = lineage["protocol"]
    if augmented:
        summary["augment"] = augmented
    if self_training:
        summary["self_training"] = self_training
    if world > 1:
        summary["processes"] = world
    if missing:
        summary["labels_without_train_rows"] = [task.labels[i] for i in missing]
    if main:
        card = prompt_card(cfg, task, backbone, {"selection": summary}, model.verbalizer.kind, model.prompt)
        card.update(protocol=lineage["protocol"], run_id=lineage["run_id"])
        write_json(Path(run_dir) / "metrics.json", {"train": summary})
        write_lineage(run_dir, lineage)
        best = {k: v for k, v in done.best["tensors"].items() if not k.startswith(TUNED)}  # the prompt and head
        if tuning is not None:  # what it changed of the backbone, beside the prompt
            card["tune"] = tuning.save(Path(run_dir) / "prompt", done.best["tensors"])
        elif cfg.tune != "prompt":
            card["tune"] = {"mode": cfg.tune}
        config = backbone.model.config
        if tuning is None:  # a PEFT twin of the prompt alone would miss the tuned backbone
            write_adapter(Path(run_dir) / "prompt", best, card, backbone.name,  # its name, never a cache path
                          config.num_attention_heads, config.num_hidden_layers)  # where the method has one
        save_prompt(run_dir, best, card)  # last: a saved prompt marks a finished run
        summary["stored_bytes"] = stored_bytes(Path(run_dir) / "prompt")  # what it keeps to be applied again
        if "tune" in card:
            summary["tune"] = card["tune"]
        write_json(Path(run_dir) / "metrics.json", {"train": summary})
    return summary


SAFETY_NET_ROWS = 200  # fewer held-out rows: an accuracy near the majority class is noise, the net stays off


def majority_share(rows) -> float | None:
    """The majority class's share of the held-out rows, for the safety net; None where it stays off
    (rows without class labels, as in generation, or fewer than ``SAFETY_NET_ROWS``)."""
    if "label" not in rows.column_names or len(rows) < SAFETY_NET_ROWS:
        return None
    counts = np.bincount(np.asarray(rows["label"], dtype=np.int64))
    return float(counts.max() / counts.sum())


def run_lineage(cfg: TrainConfig, task: TaskSpec, run_dir: Path, data, self_training: dict | None) -> dict:
    """What this run read (its training and selection rows; self-training's unlabeled inputs) and the
    lineage of every run it started from; its protocol derived from them (``xprompt.lineage``)."""
    supervised = cfg.lang != CORPUS_LANGUAGE  # a pre-training corpus: labels made from the text itself
    role = "target" if cfg.protocol == "few-shot-target" else "source"
    use = "train" if supervised else "pretrain"
    reads = [read_record(task.name, cfg.source_split, cfg.lang, use, data.train_ids, supervised, role),
             read_record(task.name, data.select_split, cfg.lang, "select", data.select_ids, supervised, role)]
    for lang in (self_training or {}).get("languages", []):
        split = "file" if cfg.unlabeled_file else cfg.unlabeled_split
        reads.append(read_record(task.name, split, lang, "pseudo-label", labels=False, role="target",
                                 rows=self_training.get("pool_rows", {}).get(lang)))
    parents = []
    if cfg.init_from == LIBRARY:
        parents = [("library", load_lineage(path)) for path in library_starts(read_json(run_dir / CHOICE_FILE))]
    elif cfg.init_from:
        relation = "adapted-from" if role == "target" else "init-from"
        parents = [(relation, external(path) if is_adapter(Path(path)) else load_lineage(Path(path)))
                   for path in cfg.init_from.split(",")]
    kind = "adapt" if role == "target" else ("train" if supervised else "pretrain")
    return make_lineage(run_id(run_dir), Path(run_dir).name, kind, task.name, cfg.lang, cfg.method, reads, parents,
                        task.language_codes)


# ---------------------------------------------------------------- runs folders: sweeps, resuming, provenance


def versions() -> dict:
    import datasets
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resume_plan(run_dir: Path) -> tuple[TrainConfig, Path | None, Path | None]:
    """The config of an interrupted run (with the dtype it started with), its data folder and its
    task cards' folder (None: the defaults)."""
    saved = read_json(Path(run_dir) / "config.json")
    cfg = TrainConfig.from_dict(saved["train"])
    if cfg.dtype is DType.AUTO and saved.get("compute", {}).get("dtype"):
        cfg.dtype = DType(saved["compute"]["dtype"])  # the dtype it started with: the same computation
    folder = lambda key: Path(saved[key]) if saved.get(key) else None  # noqa: E731
    return cfg, folder("data_dir"), folder("tasks_dir")


def plan_runs(configs: list[TrainConfig], runs_dir: Path, run_name: str | None) -> list[tuple[TrainConfig, Path | str | None]]:
    """Where each config trains: a new run's name (None: the default), or an existing run with the
    very same config (the same command again: continue it). Another config under the same name is refused."""
    plan = []
    for cfg in configs:
        name = run_name and (f"{run_name}-s{cfg.seed}" if len(configs) > 1 else run_name)
        existing = Path(runs_dir) / name if name else None
        if existing is not None and (existing / "config.json").is_file():
            if _as_written(read_json(existing / "config.json").get("train")) != cfg.to_dict():
                raise XPromptError(f"run {existing} exists with another config; choose another --run-name or --resume it")
            plan.append((cfg, existing))
        else:
            plan.append((cfg, name))
    return plan


@dataclass
class RunEvents:
    """What a caller hears while runs train (all optional): a run starts, a step ends, a warning, a run ends."""

    started: object = None  # (run_dir, cfg, world) -> a context manager around the run (e.g. a progress bar)
    step: object = None  # (step, total, loss, examples_per_s)
    phase: object = None  # (description, rows) -> a context manager yielding advance(rows) (``xprompt.phases``)
    warning: object = None  # (text)
    finished: object = None  # (run_dir, cfg, summary)


def _discard(run_dir: Path, resume: Path | None, runs_dir_is_new: bool) -> None:
    """Remove a run directory that failed before its first checkpoint (never a resumed one), and
    the runs folder too if this command created it."""
    if resume is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        if runs_dir_is_new:
            shutil.rmtree(run_dir.parent, ignore_errors=True)


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C, outside the training loop (loading, pseudo-labelling, writing the prompt:
    nothing there is half done in a checkpoint); inside it ``fit`` defers both to the step's end."""
    raise KeyboardInterrupt


def train_run(cfg: TrainConfig, backbone: Backbone, task: TaskSpec, target, runs_dir: Path, data_dirs: list[Path],
              data_dir: Path | None = None, device: str = "cpu", cache_dir: Path | None = None,
              tasks_dir: Path | None = None, compute: dict | None = None, events: RunEvents | None = None):
    """Train one run: ``target`` is an existing run folder to resume, a folder just made for a new
    run (no config.json yet), or the new run's name (None: default). Under a launcher, rank 0
    creates, locks and writes; the others only compute. Returns (run_dir, summary)."""
    events = events or RunEvents()
    repeatable()
    rank, world = distributed.rank_world()
    main = rank == 0
    runs_dir = Path(runs_dir)
    runs_dir_is_new = not runs_dir.exists()
    check_run(cfg, task)  # before any folder is made
    resume = target if isinstance(target, Path) and (target / "config.json").is_file() else None
    if resume is not None:
        run_dir = resume
        saved = read_json(resume / "config.json")
        if (resume / "prompt" / "prompt.safetensors").is_file():
            raise XPromptError(f"run {resume} already finished; evaluate it with 'xprompt eval --run {resume}'")
        if saved["backbone"]["sha256"] != backbone.sha256:
            raise XPromptError(f"{resume}: the backbone's weights changed since the run started; start a new run")
        now = versions()
        changed = {k: (v, now.get(k)) for k, v in saved.get("versions", {}).items() if now.get(k) != v}
        if changed and events.warning:
            events.warning("versions differ from the run's start, so the resumed prompt may not be bit-identical: "
                           + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    else:
        run_dir = target if isinstance(target, Path) else None
        if main:
            if run_dir is None:
                run_dir = new_run_dir(runs_dir, target or default_run_name(cfg.task, cfg.lang, cfg.method, cfg.seed))
            write_json(run_dir / "config.json", {
                "run_id": new_run_id(), "train": cfg.to_dict(), "xprompt_version": __version__, "git_commit": git_commit(),
                "versions": versions(), "compute": compute or {},
                "backbone": {"name": backbone.name, "kind": backbone.kind, "sha256": backbone.sha256,
                             "revision": backbone.revision},
                "task_version": task.version, "data_dir": str(data_dir) if data_dir else None,
                "tasks_dir": str(tasks_dir) if tasks_dir else None,
            })
        run_dir = distributed.broadcast(run_dir)
    around = events.started(run_dir, cfg, world) if events.started and main else contextlib.nullcontext()
    with around:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with run_lock(run_dir) if main else contextlib.nullcontext():
                summary = train(cfg, backbone, task, run_dir, data_dirs, on_step=events.step, device=device,
                                cache_dir=cache_dir, tasks_dir=tasks_dir, on_phase=events.phase if main else None)
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
    if main:
        index_run(run_dir.parent, run_dir)
        if events.finished:
            events.finished(run_dir, cfg, summary)
    return run_dir, summary


def train_runs(plan: list[tuple[TrainConfig, Path | str | None]], backbone: Backbone, task: TaskSpec, runs_dir: Path,
               data_dirs: list[Path], data_dir: Path | None = None, device: str = "cpu", cache_dir: Path | None = None,
               tasks_dir: Path | None = None, compute: dict | None = None, events: RunEvents | None = None) -> list:
    """Every planned run, one after the other (a seed sweep); returns [(run_dir, summary)]."""
    return [train_run(cfg, backbone, task, target, runs_dir, data_dirs, data_dir, device, cache_dir, tasks_dir,
                      compute, events) for cfg, target in plan]


def _as_written(stored: dict | None) -> dict | None:
    """A stored run config as this version writes it (a field added since, at its default, reads as absent;
    one written empty by an earlier version reads the same), so the same command continues the same run."""
    try:
        return TrainConfig.from_dict(stored).to_dict() if stored else stored
    except (TypeError, ValueError):
        return stored
