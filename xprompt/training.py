"""Training: the loop only. Model selection uses held-out source-language rows, never target languages."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

from . import __version__, distributed
from .backbones import Backbone
from .config import TrainConfig
from .data import batches, encode, holdout_split, load_split, sample_shots, sequence_ends, slice_batch
from .errors import XPromptError
from .evaluation import (
    autocast,
    build_model,
    check_backbone,
    make_verbalizer,
    predict,
    resolve_choices,
    resolve_template,
    task_label_words,
)
from .hardware import resolve_dtype
from .library import LIBRARY, init_from_library, snapshot
from .model import PromptModel
from .peft_io import is_adapter, read_adapter, write_adapter
from .prompts import vocab_init
from .store import (
    append_jsonl,
    atomic_write,
    load_prompt,
    read_json,
    save_prompt,
    truncate_log,
    write_json,
)
from .tasks import TaskSpec


@dataclass
class TrainData:
    train: object  # encoded datasets.Dataset
    select: object
    describe: str
    used_ids: list[str]  # ids of the rows training and selection saw (kept out of evaluation)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, task: TaskSpec, tokenizer, data_dirs: list[Path] | None,
                 cache_dir: Path | None = None) -> TrainData:
    """The training rows and the held-out selection rows, both from the training language and
    ``cfg.source_split`` (the train split; or dev for target-language few-shot adaptation)."""
    task.check_languages([cfg.lang], cfg.source_split)
    pool = load_split(task, cfg.lang, cfg.source_split, data_dirs)
    if cfg.shots:
        train_rows = sample_shots(pool, cfg.shots, cfg.seed, len(task.labels))
        select_rows = sample_shots(pool, cfg.shots, cfg.seed + 1, len(task.labels), exclude=set(train_rows))
        train, select = pool.select(train_rows), pool.select(select_rows)
        describe = (f"{cfg.shots} shots per class from {cfg.lang} {cfg.source_split}; "
                    f"selection on {len(select)} other {cfg.lang} rows")
    else:
        size = min(cfg.select_size, len(pool) // 5)
        train, select = holdout_split(pool, size, cfg.seed)
        describe = f"{len(train)} {cfg.lang} rows; selection on {len(select)} held-out {cfg.lang} rows"
    template = task.template_for(cfg.lang, cfg.template)
    return TrainData(
        encode(train, template, tokenizer, cfg.max_length, cache_dir),
        encode(select, template, tokenizer, cfg.max_length, cache_dir),
        describe,
        [*train["id"], *select["id"]],
    )


INITS = ("vocab", "random", "text", "label-words")


@torch.no_grad()
def init_prompt_and_verbalizer(model: PromptModel, backbone: Backbone, train, cfg: TrainConfig,
                               task: TaskSpec | None = None) -> list[int]:
    """The prompt's input vectors by ``cfg.init``; deep layers from the states they produce; label
    vectors from the class-mean states of (up to ``init_examples``) training rows read through it.
    Returns the labels that had no training row (their vectors start at the mean of all states)."""
    model.prompt.embeddings.copy_(initial_vectors(backbone, model.prompt.length, cfg, task))
    model.init_layer_prompts(*sequence_ends(backbone.tokenizer))
    return set_class_means(model, init_sample(train, cfg.init_examples, cfg.seed), backbone.tokenizer.pad_token_id, cfg.dtype)


def initial_vectors(backbone: Backbone, length: int, cfg: TrainConfig, task: TaskSpec | None) -> torch.Tensor:
    """``vocab``: embeddings of frequent word pieces, sampled (Lester et al.'s best simple start);
    ``random``: normal with the embedding matrix's spread; ``text``: the embeddings of
    ``cfg.init_text``'s pieces, repeated to the prompt length; ``label-words``: the mean piece
    embedding of each label word of the training language (from the task card), then sampled vocabulary."""
    table = backbone.input_embeddings().weight
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "vocab":
        return vocab_init(table, length, gen)
    if cfg.init == "random":
        return (torch.randn(length, table.shape[1], generator=gen) * table.float().std()).float()
    tok = backbone.tokenizer
    if cfg.init == "text":
        ids = tok(cfg.init_text or "", add_special_tokens=False)["input_ids"]
        if not ids:
            raise XPromptError("--init text needs a non-empty --init-text")
        rows = (ids * (length // len(ids) + 1))[:length]
        return table[torch.tensor(rows)].detach().clone().float()
    words = task.languages[cfg.lang].label_words if task is not None and cfg.lang in task.languages else {}
    if not words:
        raise XPromptError(f"--init label-words: task {cfg.task} declares no languages.{cfg.lang}.label_words "
                           f"in its card; add them or use another --init")
    vectors = [table[torch.tensor(tok(words[label], add_special_tokens=False)["input_ids"])].float().mean(0)
               for label in task.labels][:length]
    rest = vocab_init(table, length - len(vectors), gen) if length > len(vectors) else table.new_zeros(0, table.shape[1]).float()
    return torch.cat([torch.stack(vectors).detach(), rest])


def init_sample(train, examples: int, seed: int):
    """A stratified sample of up to ``examples`` rows: as many of every class, so that each class
    (119 in IFLYTEK) has a mean even when a plain random sample would miss it."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(train["label"]):
        by_class.setdefault(label, []).append(i)
    per_class = max(1, examples // max(1, len(by_class)))
    rng = random.Random(seed)
    chosen = [i for rows in by_class.values() for i in rng.sample(rows, min(per_class, len(rows)))]
    return train.select(sorted(chosen))


@torch.no_grad()
def set_class_means(model: PromptModel, sample, pad_id: int, dtype) -> list[int]:
    """Label vectors from the class-mean states of ``sample`` read with the model's current prompt."""
    if not model.verbalizer.needs_init:
        return []
    states, labels = [], []
    model.eval()
    device = model.prompt.embeddings.device
    with autocast(dtype, device.type):
        for batch in batches(sample, 64, pad_id):
            states.append(model.states({k: v.to(device) for k, v in batch.items()}).float().cpu())
            labels.append(batch["labels"])
    return model.verbalizer.init_from_class_means(torch.cat(states), torch.cat(labels))


def prompt_card(cfg: TrainConfig, task: TaskSpec, backbone: Backbone, extra: dict, verbalizer_kind: str = "soft") -> dict:
    return {
        "xprompt_version": __version__,
        "method": cfg.method.value,
        "prompt_length": cfg.prompt_length,
        "reparam": cfg.reparam if cfg.method.value == "ptuning" else None,
        "prefix_projection": cfg.prefix_projection,  # saved as the resulting tables: loads without it
        "position": cfg.prompt_position,
        "tower_layers": cfg.tower_layers or (backbone.num_layers // 2 if cfg.method.value == "unified" else None),
        "init": cfg.init,
        "readout": cfg.readout,
        "task": task.name,
        "task_version": task.version,
        "template": task.template_for(cfg.lang, resolve_template(cfg.template, verbalizer_kind)),
        # agnostic: one template for every language; native: each language's own
        "template_style": resolve_template(cfg.template, verbalizer_kind),
        "labels": list(task.labels),
        "verbalizer": verbalizer_kind,
        **({"label_words": task_label_words(task), "label_reduce": cfg.label_reduce}
           if verbalizer_kind in ("hard", "soft-words") else {}),
        "train_language": cfg.lang,
        "backbone": backbone.name,
        "backbone_kind": backbone.kind,
        "backbone_revision": backbone.revision,
        "backbone_bin_weights": backbone.bin_weights,
        "backbone_sha256": backbone.sha256,
        "hidden_size": backbone.hidden_size,
        **extra,
    }


def start_from_runs(model: PromptModel, run_dirs: list[Path], weights: list[float] | None,
                    backbone: Backbone, task: TaskSpec) -> str:
    """Start from saved prompts (same backbone and shape): one run's prompt, or the weighted
    average of several (weights normalised to sum 1; equal by default). Returns what was done."""
    sources = []
    for run_dir in run_dirs:
        if is_adapter(run_dir):  # a PEFT PromptTuning adapter folder
            tensors, config = read_adapter(run_dir, backbone.hidden_size)
            sources.append((tensors, {"task": None, "labels": None, "peft": config.get("base_model_name_or_path")}))
            continue
        tensors, card = load_prompt(run_dir)
        check_backbone(card, backbone, str(Path(run_dir) / "prompt"))
        sources.append((tensors, card))
    return _start_from(model, sources, weights, task, [str(r) for r in run_dirs])


def _start_from(model: PromptModel, sources: list[tuple[dict, dict]], weights: list[float] | None,
                task: TaskSpec, names: list[str]) -> str:
    """Load the weighted average of loaded prompts into the model. The label vectors are taken
    (averaged) too when every source is a prompt of this task; otherwise they keep their
    class-mean initialisation, as in SPoT's cross-task transfer."""
    if weights is not None and len(weights) != len(sources):
        raise XPromptError(f"--init-weights has {len(weights)} values for {len(sources)} --init-from runs")
    w = torch.tensor(weights if weights is not None else [1.0] * len(sources), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise XPromptError(f"--init-weights must be non-negative and not all zero, got {weights}")
    w = (w / w.sum()).tolist()
    where = ", ".join(f"{name}/prompt" for name in names)
    average = lambda key: sum(wi * t[key].double() for wi, (t, _) in zip(w, sources)).float()  # noqa: E731
    averaged = {}
    for key in model.prompt.tensors():
        shapes = {tuple(t[key].shape) if key in t else None for t, _ in sources}
        if len(shapes) != 1:
            raise XPromptError(f"{where}: '{key}' differs in shape between the runs ({sorted(map(str, shapes))})")
        if None in shapes:
            raise XPromptError(f"{where}: '{key}' is missing; were they all trained with --method {model.prompt.method.value}?")
        averaged[key] = average(key)
    model.prompt.load_tensors(averaged, where)
    # label vectors only from prompts of this very task: two tasks' "0"/"1" need not mean the same
    wanted = set(model.verbalizer.tensors())
    same_labels = bool(wanted) and all(card.get("task") == task.name and card.get("labels") == list(task.labels)
                                       and all(k in t and t[k].shape == model.verbalizer.tensors()[k].shape for k in wanted)
                                       for t, card in sources)
    if same_labels:
        model.verbalizer.load_tensors({k: average(k) for k in wanted}, where)
    kind = "prompt and label vectors" if same_labels else "prompt (label vectors from class means)"
    if len(sources) == 1:
        return f"{kind} from {names[0]}"
    return f"{kind} from the weighted average of " + ", ".join(f"{n} ({x:.3g})" for n, x in zip(names, w))


CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(run_dir: Path, model: PromptModel, optimizer, scheduler, progress: dict, best: dict) -> None:
    """Everything a resumed run needs, atomically: trainable tensors, the best tensors so far,
    AdamW moments (safetensors), and step, data position, scheduler and best score (JSON)."""
    tensors = {f"model.{k}": v.clone() for k, v in {**model.prompt.state_tensors(), **model.verbalizer.tensors()}.items()}
    tensors.update({f"best.{k}": v for k, v in best["tensors"].items()})
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value.detach().clone().reshape(value.shape)
    folder = Path(run_dir) / CHECKPOINT_DIR
    # The tensors go to a file named by the step and state.json, written last, points at it:
    # a crash at any moment leaves a consistent pair (the previous one or the new one).
    name = f"state-{progress['step']:08d}.safetensors"
    atomic_write(folder / name, lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / "state.json", {
        **progress,
        "tensors": name,
        "best_step": best["step"],
        "best_accuracy": best["accuracy"],
        "scheduler": scheduler.state_dict(),
        "param_groups": opt["param_groups"],
    })
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, model: PromptModel, optimizer, scheduler) -> tuple[dict, dict] | None:
    """Restore a checkpoint into model, optimizer and scheduler; None when the run has none."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "state.json").is_file():
        return None
    meta = read_json(folder / "state.json")
    path = folder / str(meta.get("tensors", ""))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise XPromptError(f"{path}: unreadable checkpoint ({e}); delete {folder} to start over") from None
    where = str(folder)
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    model.prompt.load_state_tensors(pick("model."), where)
    model.verbalizer.load_tensors(pick("model."), where)
    state: dict[int, dict] = {}
    for key, value in pick("optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    best = {"step": meta["best_step"], "accuracy": meta["best_accuracy"], "tensors": pick("best.")}
    return meta, best


def train(
    cfg: TrainConfig,
    backbone: Backbone,
    task: TaskSpec,
    run_dir: Path,
    data_dirs: list[Path] | None = None,
    on_step=None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    tasks_dir: Path | None = None,
) -> dict:
    """Train one prompt; writes ``prompt/``, ``log.jsonl``, ``metrics.json`` and a ``checkpoint/``
    (every ``eval_every`` steps and on Ctrl-C) into ``run_dir``. A run that has a checkpoint
    resumes from it: data order, optimizer and schedule continue exactly where they stopped.

    Under ``torchrun`` / ``accelerate launch`` every process runs this function: each computes
    the gradients of its share of every global batch, one all_reduce sums them (the prompt's
    only), and only rank 0 writes."""
    rank, world = distributed.rank_world()
    main = rank == 0
    where = distributed.local_device(device)
    seed_everything(cfg.seed)
    kind, readout = resolve_choices(backbone, cfg.verbalizer, cfg.readout)
    dtype, _ = resolve_dtype(cfg.dtype, where)
    # every "auto" settled (the card says which)
    position = cfg.prompt_position if sequence_ends(backbone.tokenizer)[0] is not None else "first"  # (m)T5: no <s>
    cfg = dataclasses.replace(cfg, verbalizer=kind, readout=readout, template=resolve_template(cfg.template, kind),
                              dtype=dtype, prompt_position=position)
    data = prepare_data(cfg, task, backbone.tokenizer, data_dirs, cache_dir)
    verbalizer = make_verbalizer(backbone, cfg.verbalizer, list(task.labels), task_label_words(task), cfg.lang,
                                 cfg.label_reduce, cfg.readout)
    model = build_model(backbone, len(task.labels), cfg.method, cfg.prompt_length, cfg.readout, cfg.reparam,
                        cfg.prompt_position, verbalizer, cfg.tower_layers, cfg.prefix_projection).place(where)
    if backbone.sharded:
        where = backbone.input_device()  # batches go where the input embeddings are
    missing = init_prompt_and_verbalizer(model, backbone, data.train, cfg, task)
    pad = backbone.tokenizer.pad_token_id
    # every process scores its shard of the selection rows; the counts are summed
    select_part = data.select.shard(world, rank, contiguous=True) if world > 1 else data.select

    def select_accuracy() -> float:
        preds = predict(model, select_part, 64, pad, cfg.dtype)
        correct, n = distributed.sum_ints(int((preds == np.asarray(select_part["label"])).sum()), len(select_part))
        return correct / n

    init_note = None
    if cfg.init_from == LIBRARY:
        init_note = init_from_library(model, cfg, backbone, task, Path(run_dir), select_accuracy, data.train, where,
                                      data_dirs, tasks_dir, cache_dir, main)
    elif cfg.init_from:
        init_note = start_from_runs(model, [Path(x) for x in cfg.init_from.split(",")], cfg.init_weights, backbone, task)

    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    log_path = Path(run_dir) / "log.jsonl"
    log = (lambda record: append_jsonl(log_path, record)) if main else (lambda record: None)

    restored = load_checkpoint(run_dir, model, optimizer, scheduler)
    if restored:
        progress, best = restored
        if main:
            truncate_log(log_path, progress["step"])  # steps after the checkpoint are run again
        log({"step": progress["step"], "resumed": True})
    else:
        if main:
            log_path.unlink(missing_ok=True)  # a run restarted before its first checkpoint starts afresh
        progress = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "seconds": 0.0}
        best = {"step": 0, "accuracy": select_accuracy(), "tensors": snapshot(model)}
        log({"step": 0, "select_accuracy": best["accuracy"]})
    step, epoch, seen = progress["step"], progress["epoch"], progress["seen"]
    started = time.perf_counter() - progress["seconds"]
    window_loss, window_n = 0.0, 0
    position = progress["batch"]

    def save_progress(batch_in_epoch: int) -> None:
        progress.update(step=step, epoch=epoch, batch=batch_in_epoch, seen=seen,
                        seconds=time.perf_counter() - started)
        if main:
            save_checkpoint(run_dir, model, optimizer, scheduler, progress, best)

    try:
        while step < total:
            skip = progress["batch"] if epoch == progress["epoch"] else 0
            epoch_batches = batches(data.train, cfg.batch_size, pad, shuffle=True, seed=cfg.seed, epoch=epoch)
            for position, batch in enumerate(epoch_batches, 1):
                if position <= skip:
                    continue
                model.train()
                loss = accumulate_gradients(model, batch, cfg, where, rank, world)
                loss = distributed.sum_gradients(params, loss)
                if not torch.isfinite(loss):
                    raise XPromptError(
                        f"loss became {loss.item()} at step {step + 1}; lower --lr (now {cfg.lr}) "
                        f"or use --dtype fp32 (now {cfg.dtype.value})"
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += len(batch["labels"])
                window_loss += loss.item()
                window_n += 1
                rate = seen / (time.perf_counter() - started)
                if step % 20 == 0 or step == total:
                    log({"step": step, "loss": round(window_loss / window_n, 5),
                                            "lr": scheduler.get_last_lr()[0], "examples_per_s": round(rate, 2)})
                    window_loss, window_n = 0.0, 0
                if step % cfg.eval_every == 0 or step == total:
                    acc = select_accuracy()
                    log({"step": step, "select_accuracy": acc})
                    if acc > best["accuracy"]:
                        best = {"step": step, "accuracy": acc, "tensors": snapshot(model)}
                    save_progress(position)
                if on_step:
                    on_step(step, total, loss.item(), rate)
                if step >= total:
                    break
            else:
                epoch += 1
                continue
            break
    except KeyboardInterrupt:
        save_progress(position)
        raise

    seconds = time.perf_counter() - started
    summary = {
        "train_rows": len(data.train),
        "dtype": cfg.dtype.value,
        "data": data.describe,
        "steps": total,
        "best_step": best["step"],
        "select_accuracy": round(best["accuracy"], 4),
        "train_seconds": round(seconds, 1),
        "train_examples_per_s": round(seen / seconds, 2),
        "trainable_parameters": sum(p.numel() for p in params),
        "init_from": cfg.init_from,
        "init": init_note or f"{cfg.init} prompt start, class-mean label vectors",
        "used_ids": data.used_ids if cfg.source_split != "train" else None,
    }
    if world > 1:
        summary["processes"] = world
    if missing:
        summary["labels_without_train_rows"] = [task.labels[i] for i in missing]
    if main:
        card = prompt_card(cfg, task, backbone, {"selection": summary}, model.verbalizer.kind)
        write_json(Path(run_dir) / "metrics.json", {"train": summary})
        config = backbone.model.config
        write_adapter(Path(run_dir) / "prompt", best["tensors"], card, str(backbone.path or backbone.name),
                      config.num_attention_heads, config.num_hidden_layers)  # PEFT's twin, for soft/ptuning
        save_prompt(run_dir, best["tensors"], card)  # last: a saved prompt marks a finished run
    return summary


def accumulate_gradients(model: PromptModel, batch: dict, cfg: TrainConfig, device, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Backward pass over this process's rows of a global batch (every ``world``-th row), in
    ``cfg.grad_accum`` micro-batches. Each micro-batch's summed loss is divided by the global
    batch size, so the gradients add up to the gradient of the global batch's mean loss whatever
    the number of processes and micro-batches. Returns this process's share of that loss."""
    size = len(batch["labels"])
    rows = torch.arange(rank, size, world)
    total = torch.zeros((), device=device)
    for part in torch.tensor_split(rows, min(cfg.grad_accum, max(1, len(rows)))):
        if len(part) == 0:
            continue
        piece = {k: v.to(device) for k, v in slice_batch(batch, part).items()}
        with autocast(cfg.dtype, device.type):
            logits = model(piece)
        loss = torch.nn.functional.cross_entropy(logits.float(), piece["labels"].to(logits.device), reduction="sum") / size
        loss.backward()
        total += loss.detach()
    model.verbalizer.end_step(distributed.sum_tensor if world > 1 else None)  # once per global batch
    return total
