"""``xprompt task new``: a task card from your own labelled file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import HELP_FLAGS, command, console

task_app = typer.Typer(no_args_is_help=True, help="Task cards from your own data.", context_settings=HELP_FLAGS)


@command("new", group=task_app)
def new_cmd(
    name: Annotated[str, typer.Argument(help="The task's name (letters, digits, '_' and '-').")],
    train: Annotated[Path, typer.Option("--train", help="Your labelled rows: JSON lines, CSV or TSV.")],
    fields: Annotated[str, typer.Option(help="The text fields, comma-separated, in template order; field=column maps one to another column of your file.")] = "text",
    label_field: Annotated[str, typer.Option(help="The column holding each row's label.")] = "label",
    lang: Annotated[str, typer.Option(help="The language of your rows (the source language).")] = "en",
    template: Annotated[Optional[str], typer.Option(help="The template, with every field as {field} and one <mask> (default: the fields in order, then <mask>).")] = None,
    label_words: Annotated[Optional[str], typer.Option(help="label=word pairs, comma-separated: only for verbalizers that score label words (hard, soft-words); the default verbalizer learns label vectors.")] = None,
    tasks_dir: Annotated[Path, typer.Option("--tasks-dir", help="Where the card goes (then pass the same --tasks-dir to train; runs remember it).")] = Path("tasks-mine"),
    overwrite: Annotated[bool, typer.Option(help="Replace a card of that name.")] = False,
):
    """Write a validated task card from your labelled file: the labels read from the data, the rows
    as its train split. Then: xprompt train --task NAME --tasks-dir DIR."""
    from ..workflows.taskcards import new_task, parse_field_list, parse_label_words

    names, mapping = parse_field_list(fields)
    words = parse_label_words(label_words)
    path, card = new_task(name, train, names, tasks_dir, label_field, lang, mapping, template, words, overwrite)
    counts = ", ".join(f"{label} {n}" for label, n in card["per_label"].items())
    console.print(f"wrote {path}: {card['rows']} {lang} rows ({counts}), template {card['template']!r}; train with "
                  f"'xprompt train --task {name} --lang {lang} --tasks-dir {tasks_dir}'", highlight=False, markup=False)
