"""Evaluating a run as a user asks for it: ``evaluate_run`` (a saved prompt applied unchanged to many
languages, shared out over processes under torchrun, predictions and metrics saved, the index
refreshed) and ``adapt`` (target-language few-shot: a copy of the prompt continued on K target
rows per language, scored against the zero-shot prompt on the same remaining rows)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..backbones import Backbone
from ..checks import refuse_tuned
from ..config import DType, TrainConfig
from ..errors import XPromptError
from ..evaluation import evaluate_languages
from ..fileio import json_text, read_json, update_json, write_json, write_text
from ..model import PromptModel, load_run_model
from ..lineage import (excluded_ids, load_lineage, make_lineage, new_run_id, run_id, score_protocol,
                       write_lineage)
from ..registry import index_run
from ..reports import summarize
from ..store import load_card
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


def evaluate_run(run_dir: Path, model: PromptModel, card: dict, backbone: Backbone, task: TaskSpec, langs: list[str],
                 split: str = "dev", data_dirs: list[Path] | None = None, limit: int | None = None,
                 batch_size: int = 64, dtype: DType = DType.FP32, cache_dir: Path | None = None,
                 on_language=None, generation: dict | None = None, int8: bool = False, phase=None) -> Evaluation:
    """Apply a run's prompt unchanged to each language (this process's share of them under a
    launcher); on rank 0, write ``predictions/<task>.<split>.<lang>.tsv``, merge the results into
    ``metrics.json`` (with the rows, limit and dtype of each) and refresh the index."""
    rank, world = distributed.rank_world()
    bridge = task.bridge_from(card["task"], card["labels"])
    source = card.get("train_language", task.source_language) if card["task"] == task.name else None
    lineage = load_lineage(run_dir)
    mine = evaluate_languages(model, task, backbone.tokenizer, langs[rank::world], split, data_dirs, limit, batch_size,
                              dtype=dtype, on_language=on_language, bridge=bridge, cache_dir=cache_dir,
                              template=card.get("template_style", "agnostic"),
                              exclude_ids=excluded_ids(lineage, task.name, split) or None, generation=generation,
                              int8=int8, phase=phase)
    merged = {lang: result for part in distributed.gather(mine) for lang, result in part.items()}
    if rank != 0:
        return Evaluation(run_dir, card, source, None, None)
    results = {lang: merged[lang] for lang in langs}
    for lang, result in results.items():
        lines = ["id\tprediction"] + [f"{i}\t{p}" for i, p in zip(result.pop("ids"), result.pop("predictions"))]
        write_text(Path(run_dir) / "predictions" / f"{task.name}.{split}.{lang}.tsv", "\n".join(lines) + "\n")
    for lang, result in results.items():
        result["protocol"] = score_protocol(lineage, task.name, split, lang)

    def merge(metrics: dict) -> dict:  # under the file's lock: two evals of one run (other languages) both land
        entry = metrics.setdefault("eval", {}).setdefault(task.name, {}).setdefault(split, {})
        entry.update({lang: {**result, "limit": limit, "dtype": "int8" if int8 else DType(dtype).value}
                      for lang, result in results.items()})
        return metrics

    update_json(Path(run_dir) / "metrics.json", merge, dump=json_text)
    index_run(Path(run_dir).parent, run_dir)
    return Evaluation(run_dir, card, source, results, summarize(results, source, task.metric, task.official_languages))


def ensemble_folder(runs_dir: Path, run_dirs: list[Path]) -> Path:
    """An ensemble's folder: named by its members' run ids (never their folder names), so the same
    members always meet in the same folder and other members never do."""
    ids = sorted(run_id(run) for run in run_dirs)
    return Path(runs_dir) / f"ensemble-{hashlib.sha256(','.join(ids).encode()).hexdigest()[:10]}"


def ensemble_home(run_dirs: list[Path]) -> Path:
    """Where an ensemble's folder goes: beside its member of the smallest run id (whatever their order)."""
    return min(run_dirs, key=run_id).parent


def evaluate_ensemble(run_dirs: list[Path], backbone: Backbone, task: TaskSpec, langs: list[str], split: str = "dev",
                      data_dirs: list[Path] | None = None, limit: int | None = None, batch_size: int = 64,
                      dtype: DType = DType.FP32, cache_dir: Path | None = None, folder: Path | None = None,
                      on_language=None, device="cpu") -> Evaluation:
    """Several runs' prompts as one prediction per row: the mean of their label probabilities, one pass
    over each language's rows. The members must share task, labels and template style. The ensemble
    is a row of its own: a folder (default ``ensemble-<hash of the members' run ids>`` beside one of them)
    whose config.json and lineage.json are written from its members every time (their lineages are
    its parents: its protocol and the rows it leaves out are derived from theirs), with metrics.json
    and predictions, in the index like any run."""
    from ..model import EnsembleModel

    run_dirs = [Path(r) for r in run_dirs]
    refuse_tuned({run.name: load_card(run) for run in run_dirs}, "an ensemble of several runs")
    loaded = [load_run_model(run, backbone) for run in run_dirs]
    cards = [card for _, card in loaded]
    for what in ("task", "labels", "template_style"):
        values = {json_key(card.get(what)) for card in cards}
        if len(values) > 1:
            raise XPromptError(f"an ensemble's runs must share their {what}: {', '.join(sorted(values))}")
    folder = folder or ensemble_folder(ensemble_home(run_dirs), run_dirs)
    members = [load_lineage(run) for run in run_dirs]
    base = read_json(run_dirs[0] / "config.json")
    identity = run_id(folder) if (folder / "config.json").is_file() else new_run_id()
    sources = {m["lang"] for m in members if m.get("kind") != "adapt"}  # an adaptation's language is a target
    source = sources.pop() if len(sources) == 1 else task.source_language
    lineage = make_lineage(identity, folder.name, "ensemble", cards[0]["task"], source,
                           "ensemble", [], [("ensembled", m) for m in members], task.language_codes)
    write_json(folder / "config.json", {
        **{k: base.get(k) for k in ("backbone", "compute", "task_version", "data_dir")}, "run_id": identity,
        "train": {**base["train"], "method": "ensemble", "seed": None, "members": sorted(run.name for run in run_dirs),
                  "member_ids": sorted(m["run_id"] for m in members),
                  "member_configs": [read_json(run / "config.json")["train"] for run in run_dirs]},
        "ensemble": [str(run) for run in run_dirs]})
    write_lineage(folder, lineage)
    card = {**cards[0], "method": "ensemble", "protocol": lineage["protocol"], "run_id": identity}
    model = EnsembleModel([m.place(device) for m, _ in loaded])
    return evaluate_run(folder, model, card, backbone, task, langs, split, data_dirs, limit, batch_size, dtype,
                        cache_dir, on_language)


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


# what an adaptation takes from its base run: the fields that shape the prompt and how it is read out, and
# the base's rate and batch; self-training, augmentation, library and other starts are the base's own history
ADAPT_INHERITS = ("task", "backbone", "revision", "allow_bin_weights", "method", "prompt_length", "verbalizer",
                  "label_reduce", "prompt_position", "tower_layers", "prompt_text", "reparam", "prefix_projection", "template",
                  "readout", "max_length", "lr", "batch_size", "grad_accum", "init_examples", "tune")


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
    refuse_tuned({Path(run_dir).name: card}, "few-shot adaptation (it continues the prompt alone)")
    base = read_json(Path(run_dir) / "config.json")["train"]
    shape = {k: base[k] for k in ADAPT_INHERITS if k in base}  # the prompt's shape; nothing of how it was trained
    style = card.get("template_style", "agnostic")
    rows = []
    for lang in langs:
        source_split = "train" if lang in task.split_languages("train") else "dev"
        try:
            cfg = TrainConfig.from_dict({**shape, "lang": lang, "shots": shots, "seed": seed, "max_steps": steps,
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
