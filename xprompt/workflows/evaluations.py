"""Evaluating a run as a user asks for it: ``evaluate_run`` (a saved prompt applied unchanged to many
languages, shared out over processes under torchrun, predictions and metrics saved, the index
refreshed) and ``adapt`` (target-language few-shot: a copy of the prompt continued on K target
rows per language, scored against the zero-shot prompt on the same remaining rows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..backbones import Backbone
from ..config import DType, TrainConfig
from ..errors import XPromptError
from ..evaluation import evaluate_languages
from ..fileio import read_json, write_json, write_text
from ..model import PromptModel, load_run_model
from ..registry import index_run
from ..reports import summarize
from ..tasks import TaskSpec
from .runs import train_run


@dataclass
class Evaluation:
    """What ``evaluate_run`` hands back (on rank 0; ``results`` is None on the other processes)."""

    run_dir: Path
    card: dict
    source: str | None  # the training language when the task is the run's own (its "en" column), else None
    results: dict | None
    summary: dict | None


def excluded_rows(run_dir: Path, card: dict, task: TaskSpec, split: str) -> dict[str, set[str]] | None:
    """The rows an adapted run trained on (its target language's dev rows): never scored."""
    metrics = Path(run_dir) / "metrics.json"
    used = read_json(metrics).get("train", {}).get("used_ids") if metrics.is_file() else None
    if used and card["task"] == task.name and split == card.get("selection", {}).get("source_split", "dev"):
        return {card["train_language"]: set(used)}
    return None


def transductive_languages(card: dict, split: str) -> set[str]:
    """The languages whose ``split`` rows the run read while training (self-training's unlabeled
    inputs): its results there are transductive."""
    read = card.get("selection", {}).get("self_training") or {}
    return set(read.get("languages", [])) if read.get("source") == f"{split} inputs" else set()


def evaluate_run(run_dir: Path, model: PromptModel, card: dict, backbone: Backbone, task: TaskSpec, langs: list[str],
                 split: str = "dev", data_dirs: list[Path] | None = None, limit: int | None = None,
                 batch_size: int = 64, dtype: DType = DType.FP32, cache_dir: Path | None = None,
                 on_language=None, generation: dict | None = None) -> Evaluation:
    """Apply a run's prompt unchanged to each language (this process's share of them under a
    launcher); on rank 0, write ``predictions/<task>.<split>.<lang>.tsv``, merge the results into
    ``metrics.json`` (with the rows, limit and dtype of each) and refresh the index."""
    rank, world = distributed.rank_world()
    bridge = task.bridge_from(card["task"], card["labels"])
    source = card.get("train_language", task.source_language) if card["task"] == task.name else None
    mine = evaluate_languages(model, task, backbone.tokenizer, langs[rank::world], split, data_dirs, limit, batch_size,
                              dtype=dtype, on_language=on_language, bridge=bridge, cache_dir=cache_dir,
                              template=card.get("template_style", "agnostic"),
                              exclude_ids=excluded_rows(run_dir, card, task, split), generation=generation)
    merged = {lang: result for part in distributed.gather(mine) for lang, result in part.items()}
    if rank != 0:
        return Evaluation(run_dir, card, source, None, None)
    results = {lang: merged[lang] for lang in langs}
    for lang, result in results.items():
        lines = ["id\tprediction"] + [f"{i}\t{p}" for i, p in zip(result.pop("ids"), result.pop("predictions"))]
        write_text(Path(run_dir) / "predictions" / f"{task.name}.{split}.{lang}.tsv", "\n".join(lines) + "\n")
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    entry = metrics.setdefault("eval", {}).setdefault(task.name, {}).setdefault(split, {})
    transductive = transductive_languages(card, split) if card["task"] == task.name else set()
    for lang, result in results.items():
        result["protocol"] = "transductive" if lang in transductive else card.get("protocol", "zero-shot")
        entry[lang] = {**result, "limit": limit, "dtype": DType(dtype).value}
    write_json(metrics_path, metrics)
    index_run(Path(run_dir).parent, run_dir)
    return Evaluation(run_dir, card, source, results, summarize(results, source, task.metric, task.official_languages))


def evaluate_ensemble(run_dirs: list[Path], backbone: Backbone, task: TaskSpec, langs: list[str], split: str = "dev",
                      data_dirs: list[Path] | None = None, limit: int | None = None, batch_size: int = 64,
                      dtype: DType = DType.FP32, cache_dir: Path | None = None, folder: Path | None = None,
                      on_language=None, device="cpu") -> Evaluation:
    """Several runs' prompts as one prediction per row: the mean of their label probabilities, one pass
    over each language's rows. The members must share task, labels, template style and protocol
    (zero-shot or transductive; adapted runs scored elsewhere are refused). The ensemble is a row of
    its own: a folder (default ``ensemble-<hash of the members>`` beside the first) with config.json,
    metrics.json and predictions, in the index like any run."""
    import hashlib

    from ..model import EnsembleModel

    run_dirs = [Path(r) for r in run_dirs]
    loaded = [load_run_model(run, backbone) for run in run_dirs]
    cards = [card for _, card in loaded]
    for what in ("task", "labels", "template_style", "protocol"):
        values = {json_key(card.get(what)) for card in cards}
        if len(values) > 1:
            raise XPromptError(f"an ensemble's runs must share their {what}: {', '.join(sorted(values))}")
    if cards[0].get("protocol", "zero-shot") == "few-shot-target":
        raise XPromptError("adapted (few-shot-target) runs cannot be ensembled: each left out other rows")
    names = sorted(run.name for run in run_dirs)
    folder = folder or run_dirs[0].parent / f"ensemble-{hashlib.sha256(','.join(names).encode()).hexdigest()[:10]}"
    if not (folder / "config.json").is_file():
        base = read_json(run_dirs[0] / "config.json")
        members = [read_json(run / "config.json")["train"] for run in run_dirs]
        write_json(folder / "config.json", {
            **{k: base.get(k) for k in ("backbone", "compute", "task_version", "data_dir")},
            "train": {**base["train"], "method": "ensemble", "seed": None, "members": names,
                      "member_configs": members},
            "ensemble": [str(run) for run in run_dirs]})
    read = {lang for card in cards for lang in (card.get("selection", {}).get("self_training") or {}).get("languages", [])}
    sources = {(card.get("selection", {}).get("self_training") or {}).get("source") for card in cards} - {None}
    card = {**cards[0], "method": "ensemble",
            "selection": {"self_training": {"languages": sorted(read), "source": sources.pop()}} if sources else {}}
    model = EnsembleModel([m.place(device) for m, _ in loaded])
    return evaluate_run(folder, model, card, backbone, task, langs, split, data_dirs, limit, batch_size, dtype,
                        cache_dir, on_language)


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def adapted_name(run_dir: Path, lang: str, shots: int, steps: int, seed: int) -> str:
    """An adapted run's folder name: everything that makes it another run (the base, the language,
    K, the steps and the seed)."""
    return f"{Path(run_dir).name}-adapt-{lang}-k{shots}-t{steps}-s{seed}"


def adapt(run_dir: Path, model: PromptModel, card: dict, backbone: Backbone, task: TaskSpec, langs: list[str],
          shots: int, steps: int, seed: int, data_dirs: list[Path] | None = None, data_dir: Path | None = None,
          limit: int | None = None, batch_size: int = 64, dtype: DType = DType.FP32, cache_dir: Path | None = None,
          device: str = "cpu", events=None) -> list[dict]:
    """Target-language few-shot: per language, continue a copy of the prompt on K examples per class
    (the language's train split, else K from dev, evaluating on the rest of dev), then score the
    zero-shot and the adapted prompt on the same rows. Adapted runs are ``few-shot-target`` runs:
    never the default run to evaluate, left out of the library unless asked for. Returns a row per
    language: n, both accuracies, the adapted run and where its rows came from."""
    if card["task"] != task.name:
        raise XPromptError(f"--shots adapts on the run's own task ({card['task']}); drop --task {task.name}")
    base = read_json(Path(run_dir) / "config.json")["train"]
    style = card.get("template_style", "agnostic")
    rows = []
    for lang in langs:
        source_split = "train" if lang in task.split_languages("train") else "dev"
        try:
            cfg = TrainConfig.from_dict({**base, "lang": lang, "shots": shots, "seed": seed, "max_steps": steps,
                                         "dtype": DType(dtype).value, "protocol": "few-shot-target",
                                         "eval_every": max(1, steps // 2), "source_split": source_split,
                                         "init_from": str(run_dir), "init_weights": None})
        except ValueError as e:
            raise XPromptError(f"cannot adapt {run_dir}: {e}") from None
        name = adapted_name(run_dir, lang, shots, steps, seed)
        adapted_dir = Path(run_dir).parent / name
        if not (adapted_dir / "prompt" / "prompt.safetensors").is_file():
            train_run(cfg, backbone, task, adapted_dir if adapted_dir.is_dir() else name, Path(run_dir).parent,
                      data_dirs or [], data_dir, device=device, cache_dir=cache_dir, events=events)
        used = read_json(adapted_dir / "metrics.json")["train"].get("used_ids") or []
        exclude = {lang: set(used)}
        zero = evaluate_languages(model, task, backbone.tokenizer, [lang], "dev", data_dirs, limit, batch_size,
                                  dtype=dtype, exclude_ids=exclude, cache_dir=cache_dir, template=style)[lang]
        adapted_model, _ = load_run_model(adapted_dir, backbone)
        few = evaluate_languages(adapted_model, task, backbone.tokenizer, [lang], "dev", data_dirs, limit, batch_size,
                                 dtype=dtype, exclude_ids=exclude, cache_dir=cache_dir, template=style)[lang]
        for result in (zero, few):
            result.pop("ids")
            result.pop("predictions")
        metrics = read_json(adapted_dir / "metrics.json")
        metrics.setdefault("eval", {}).setdefault(task.name, {}).setdefault("dev", {})[lang] = {**few, "zero_shot": zero}
        write_json(adapted_dir / "metrics.json", metrics)
        index_run(Path(run_dir).parent, adapted_dir)
        rows.append({"lang": lang, "n": few["n"], "zero_shot": zero["accuracy"], "adapted": few["accuracy"],
                     "run": name, "source_split": source_split})
    return rows
