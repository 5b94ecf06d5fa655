"""``xprompt library``: the trained prompts under a runs folder, listed, compared, scored on a task,
removed, exported and imported. Each command calls one library or workflow function and renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import DType, TrainConfig
from ..errors import XPromptError
from .common import (ENCODED, AllowBin, AsJson, CacheDir, DataDir, DTypeOption, IncludeAdapted, Revision, RunsDir, TasksDir,
                     _data_dirs, _default_cache, _load_task, _open_backbone, _pct, _table, command, console, library_app,
                     opt)


@command("similar", library_app)
def library_similar(
    run: Annotated[Path, typer.Argument(help="The run whose prompt to compare with the others.")],
    measure: Annotated[str, typer.Option(help="Rank by flat (cosine of the flattened prompts), mean (cosine of the mean prompt vectors) or neurons (shared activated FFN neurons); the cosines compare what each method trains.")] = "flat",
    top_k: Annotated[int, typer.Option(help="Show the K most similar prompts.")] = 10,
    as_json: AsJson = False,
    include_adapted: IncludeAdapted = False,
    allow_bin_weights: AllowBin = False,
    runs_dir: RunsDir = Path("runs"),
    cache_dir: CacheDir = _default_cache(),
):
    """Rank the library's prompts (finished runs under --runs-dir on the same backbone, of the same
    shape) by similarity to RUN's prompt: all three measures of the transferability paper."""
    from ..library import similar_prompts
    from ..similarity import MEASURES
    from ..store import load_prompt

    if measure not in MEASURES:
        raise typer.BadParameter(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    _, card = load_prompt(run)
    bb, _, _ = _open_backbone(card["backbone"], cache_dir, revision=card.get("backbone_revision"),
                              allow_bin_weights=allow_bin_weights or bool(card.get("backbone_bin_weights")), quiet=True)
    rows, skipped = similar_prompts(run, bb, runs_dir, include_adapted)
    rows = sorted(rows, key=lambda r: r[measure], reverse=True)[:top_k]
    if as_json:
        print(json.dumps({"run": str(run), "measure": measure, "similar": rows, "skipped": skipped}, indent=2))
        return
    _table(f"prompts most similar to {Path(run).name} ({card['task']}/{card.get('train_language')}), by {measure}",
           ["run", "task", "lang", "flat cosine", "mean cosine", "neuron overlap"],
           [[r["run"], r["task"], r["lang"], f"{r['flat']:.3f}", f"{r['mean']:.3f}", f"{r['neurons']:.3f}"] for r in rows],
           right=("flat cosine", "mean cosine", "neuron overlap"))
    if skipped:
        console.print(f"{skipped} prompt(s) of another backbone or shape left out")


@command("list", library_app)
def library_list(runs_dir: RunsDir = Path("runs")):
    """Every trained prompt under --runs-dir: task, language, backbone and weights hash, method, protocol, shape, held-out score."""
    from ..workflows.catalogue import list_prompts

    columns = ["run", "task", "lang", "backbone", "weights", "method", "protocol", "shape"]
    _table(f"prompt library in {runs_dir}", [*columns, "held-out acc"],
           [[r[c] for c in columns] + ["" if r["select_accuracy"] is None else _pct(r["select_accuracy"])]
            for r in list_prompts(runs_dir)])


@command("show", library_app)
def library_show(run: Annotated[Path, typer.Argument(help="The run whose prompt card to show.")]):
    """A library prompt's card: task, languages, labels, backbone and hash, method and shape, how it
    was trained and initialised, its held-out score and its evaluations."""
    from ..workflows.catalogue import show_prompt

    print(json.dumps(show_prompt(run), indent=2, ensure_ascii=False))


@command("remove", library_app)
def library_remove(
    run: Annotated[Path, typer.Argument(help="The run to delete from the library (its whole folder).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
):
    """Delete a run's folder (prompt, checkpoint, results) and its rows in the index."""
    from ..workflows.catalogue import remove_run

    if not (run / "config.json").is_file() and not (run / "prompt").is_dir():
        raise XPromptError(f"{run} is not a run folder (no config.json or prompt/); nothing removed")
    if not yes and not typer.confirm(f"delete {run} and everything in it?"):
        raise typer.Exit(1)
    remove_run(run)
    console.print(f"removed {run}")


@command("transfer", library_app)
def library_transfer(
    task: Annotated[str, typer.Option(help="Target task card name.")],
    lang: Annotated[Optional[str], typer.Option(help="Target language (default: the task's source language).")] = None,
    split: Annotated[str, typer.Option(help="Split to score on (dev; never test).")] = "dev",
    limit: Annotated[int, typer.Option(help="Rows of the split to score on (the first N).")] = 300,
    backbone: Annotated[str, typer.Option(help="The backbone whose library prompts to score.")] = "e5-small",
    as_json: AsJson = False,
    dtype: DTypeOption = DType.AUTO,
    seed: Annotated[int, typer.Option(help="Seed of the training rows whose class means give label vectors.")] = TrainConfig.seed,
    init_examples: Annotated[int, opt("init_examples")] = TrainConfig.init_examples,
    max_length: Annotated[int, opt("max_length")] = TrainConfig.max_length,
    include_adapted: IncludeAdapted = False,
    revision: Revision = None,
    allow_bin_weights: AllowBin = False,
    runs_dir: RunsDir = Path("runs"),
    data_dir: DataDir = None,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Task similarity by zero-shot transfer: every library prompt on this backbone applied unchanged
    to a target task's rows. Label vectors are the prompt's own for a prompt of this task or of a task
    the card maps labels from (its 'transfer'), else the class means of --init-examples of the task's
    training rows read through the prompt; label words are the task's own; no training step."""
    from ..data import NO_LABEL, load_split
    from ..workflows.catalogue import transfer_listing

    spec = _load_task(task, tasks_dir)
    lang = lang or spec.source_language
    spec.check_languages([lang], split)
    # an accuracy needs labelled rows: refuse an unlabelled split (the test files here) before any model loads
    rows = load_split(spec, lang, split, _data_dirs(data_dir))
    unlabeled = sum(label == NO_LABEL for label in rows.select(range(min(limit, len(rows))))["label"])
    if unlabeled:
        raise XPromptError(f"the {split} rows of {task}/{lang} carry no labels here ({unlabeled} of the first "
                           f"{min(limit, len(rows))} unlabelled), so no transfer accuracy can be scored on them; "
                           f"score on labelled rows with --split dev")
    bb, dtype, _ = _open_backbone(backbone, cache_dir, dtype=dtype, revision=revision, allow_bin_weights=allow_bin_weights)
    with console.status(f"scoring the library's prompts on {task}/{lang} {split} rows"):
        out = transfer_listing(bb, spec, lang, split, limit, runs_dir, _data_dirs(data_dir), seed, init_examples,
                               max_length, dtype, cache_dir / ENCODED, include_adapted)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    _table(f"zero-shot transfer to {task}/{lang} {split} (first {out['n']} rows; majority label {_pct(out['majority'])})",
           ["run", "task", "lang", "label vectors", "accuracy"],
           [[r["run"], r["task"], r["lang"], r["label_vectors"], _pct(r["accuracy"])] for r in out["transfer"]],
           right=("accuracy",))


@command("export", library_app)
def library_export(
    run: Annotated[Path, typer.Argument(help="The run whose prompt to export.")],
    out: Annotated[Path, typer.Option(help="Folder to write <run-name>/ into (config, prompt, metrics).")],
):
    """Copy a run's prompt (safetensors + card), config and metrics into a portable folder."""
    from ..workflows.catalogue import export_prompt

    target, peft = export_prompt(run, out)
    console.print(f"exported {run} to {target}; {peft}", highlight=False)


@command("import", library_app)
def library_import(
    folder: Annotated[Path, typer.Argument(help="An exported prompt folder (holding prompt/).")],
    backbone: Annotated[Optional[str], typer.Option(help="The backbone it must fit (default: the one its card names).")] = None,
    runs_dir: RunsDir = Path("runs"),
    cache_dir: CacheDir = _default_cache(),
):
    """Add an exported prompt to the library; refuses one trained on other backbone weights or of a shape the backbone cannot hold."""
    from ..workflows.catalogue import import_prompt

    console.print(f"imported {folder} as {import_prompt(folder, runs_dir, cache_dir, backbone)}")
