"""The prompt library as a user manages it: list, show, remove, export and import prompts, and the
task-similarity listing (every library prompt zero-shot on a task's rows). Each returns data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..backbones import EMBEDDED_NAME, Backbone, load_backbone, weights_sha256
from ..backbones.embedded import embedded_folder
from ..data import load_split
from ..errors import XPromptError
from ..fileio import read_json
from ..lineage import load_lineage, score_protocol, tree_lines
from ..library import library_prompts, transfer_scores
from ..registry import forget_run, index_run
from ..similarity import check_prompt_fits
from ..start import init_sample
from ..store import copy_prompt_folder, load_prompt, run_lock, run_protocol
from ..tasks import TaskSpec


def list_prompts(runs_dir: Path) -> list[dict]:
    """Every trained prompt under ``runs_dir``: task, language, backbone and weights hash, method,
    tensor shapes, held-out score."""
    rows = []
    for run in sorted(p.parent.parent for p in Path(runs_dir).glob("*/prompt/prompt.safetensors")):
        tensors, card = load_prompt(run)
        rows.append({"run": run.name, "task": card.get("task", "?"), "lang": card.get("train_language"),
                     "backbone": card.get("backbone"), "weights": str(card.get("backbone_sha256"))[:12],
                     "method": card.get("method"), "protocol": run_protocol(run),
                     "shape": " + ".join("x".join(map(str, t.shape)) for k, t in tensors.items()
                                         if not k.startswith("verbalizer.")),
                     "select_accuracy": card.get("selection", {}).get("select_accuracy")})
    return rows


def describe_lineage(run: Path) -> dict:
    """A run's lineage as ``xprompt runs --lineage`` shows it: the tree of runs it came from with what
    each read, and every stored score with the protocol derived for it now and the rows it left out."""
    if not (Path(run) / "config.json").is_file():
        raise XPromptError(f"{run} is not a run folder (no config.json)")
    lineage = load_lineage(run)
    metrics = read_json(Path(run) / "metrics.json") if (Path(run) / "metrics.json").is_file() else {}
    scores = []
    for task, splits in sorted(metrics.get("eval", {}).items()):
        for split, langs in sorted(splits.items()):
            for lang, result in sorted(langs.items()):
                scores.append({"task": task, "split": split, "lang": lang, "n": result.get("n"),
                               "excluded": result.get("excluded") or 0, "stored": result.get("protocol"),
                               "derived": score_protocol(lineage, task, split, lang)})
    return {"run": str(run), "protocol": run_protocol(run), "tree": tree_lines(lineage), "scores": scores}


def show_prompt(run: Path) -> dict:
    """A prompt's card with its tensor shapes, how it was trained and its evaluations."""
    tensors, card = load_prompt(run)
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    shown = {
        **{k: v for k, v in card.items() if k != "selection"},
        "tensors": {k: list(t.shape) for k, t in tensors.items()},
        "training": dict(card.get("selection", {})),
        "evaluations": {task: {split: {lang: r.get("accuracy") for lang, r in langs.items()}
                               for split, langs in splits.items()}
                        for task, splits in metrics.get("eval", {}).items()},
    }
    shown["training"].pop("used_ids", None)
    return shown


def remove_run(run: Path) -> None:
    """Delete a run's folder and its rows in the index; refused while a trainer holds it. Renamed
    first, so an interrupted delete never leaves a half-removed run that still looks finished."""
    if not (run / "config.json").is_file() and not (run / "prompt").is_dir():
        raise XPromptError(f"{run} is not a run folder (no config.json or prompt/); nothing removed")
    doomed = run.with_name(f".removing-{run.name}")
    with run_lock(run):
        run.rename(doomed)
    forget_run(run.parent, run.name)
    shutil.rmtree(doomed)


def export_prompt(run: Path, out: Path) -> tuple[Path, str]:
    """Copy a run's prompt (safetensors + card, and its PEFT twin where the method has one), config,
    metrics and lineage into ``out/<run-name>``. Returns the folder and what PEFT can do with it."""
    _, card = load_prompt(run)  # refuses a folder without a readable prompt
    target = out / run.name
    copy_prompt_folder(run, target)
    if (target / "prompt" / "adapter_config.json").is_file():
        return target, (f"PEFT twin: AutoPeftModelForFeatureExtraction.from_pretrained('{target / 'prompt'}') loads it on "
                        f"its backbone; xprompt_head.json and xprompt_head.safetensors score its states (README: PEFT)")
    return target, (f"method '{card.get('method')}' has no PEFT twin on a {card.get('backbone_kind', 'encoder')} "
                    "backbone: only xprompt reads this prompt (PEFT twins: soft, ptuning, prefix on encoders)")


def backbone_identity(name: str, cache_dir: Path) -> tuple[str, dict]:
    """(weights sha256, config) of a backbone, without loading its weights where it is on disk."""
    folder = embedded_folder(cache_dir) if name == EMBEDDED_NAME else Path(name)
    if folder.is_dir() and (folder / "config.json").is_file():
        return weights_sha256(folder), read_json(folder / "config.json")
    bb = load_backbone(name, cache_dir)
    return bb.sha256, bb.model.config.to_dict()


def import_prompt(folder: Path, runs_dir: Path, cache_dir: Path, backbone: str | None = None) -> Path:
    """Add an exported prompt to the library; refuses one trained on other backbone weights or of a
    shape the backbone cannot hold."""
    tensors, card = load_prompt(folder)
    name = backbone or card.get("backbone")
    if not name:
        raise XPromptError(f"{folder}/prompt/xprompt.json names no backbone; pass --backbone")
    sha, config = backbone_identity(name, cache_dir)
    if card.get("backbone_sha256") != sha:
        raise XPromptError(
            f"{folder}: the prompt was trained on weights {str(card.get('backbone_sha256'))[:12]} "
            f"('{card.get('backbone')}'), backbone '{name}' has {sha[:12]}; a prompt only works on its own backbone"
        )
    check_prompt_fits(tensors, int(config["hidden_size"]), int(config["num_hidden_layers"]), f"{folder}/prompt")
    target = runs_dir / folder.name
    copy_prompt_folder(folder, target, {"imported_from": str(folder.resolve())})
    index_run(runs_dir, target)
    return target


def transfer_listing(backbone: Backbone, task: TaskSpec, lang: str, split: str, limit: int, runs_dir: Path,
                     data_dirs: list[Path], seed: int, init_examples: int, max_length: int, dtype,
                     cache_dir: Path | None = None, include_adapted: bool = False) -> dict:
    """Task similarity by zero-shot transfer: every library prompt on this backbone applied
    unchanged to the first ``limit`` rows of a task's split. Label vectors are the prompt's own for
    a prompt of this task or of one the card maps labels from, else the class means of
    ``init_examples`` training rows (drawn with ``seed``) read through the prompt; label words are
    the task's own. No training step."""
    task.check_languages([lang], split)
    candidates = library_prompts(runs_dir, backbone.sha256, include_adapted=include_adapted)
    if not candidates:
        raise XPromptError(f"no prompt under {runs_dir} was trained on '{backbone.name}'; build a library first "
                           "(scripts/build_library.py)")
    rows = load_split(task, lang, split, data_dirs)
    rows = rows.select(range(min(limit, len(rows))))
    sample = None  # without a train split only prompts with a declared label map can be scored
    if "train" in task.splits:
        train_lang = lang if lang in task.split_languages("train") else task.source_language
        sample = init_sample(load_split(task, train_lang, "train", data_dirs), init_examples, seed)
    scores = transfer_scores(backbone, task, lang, candidates, rows, sample, dtype, max_length, cache_dir)
    counts = np.bincount(np.asarray(rows["label"]), minlength=len(task.labels))
    result = sorted(({"run": c.run.name, "task": c.card.get("task"), "lang": c.card.get("train_language"),
                      "label_vectors": used, "accuracy": a} for c, (a, used) in zip(candidates, scores)),
                    key=lambda r: -(r["accuracy"] or -1))
    return {"task": task.name, "lang": lang, "split": split, "n": len(rows),
            "majority": float(counts.max() / len(rows)), "transfer": result}
