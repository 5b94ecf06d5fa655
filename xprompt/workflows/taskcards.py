"""A task card from your own labelled file (``xprompt task new``): the labels read from the data, an
agnostic template over the fields, label words only where you give them, the rows copied as the train
split's JSON lines beside the card; the card is validated by the same loader as every bundled one."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import XPromptError
from ..fileio import write_text
from ..tasks import MASK, parse_task
from .predict import parse_fields, read_rows

DATA_FOLDER = "data"  # beside the cards: <tasks-dir>/data/<name>/train.<lang>.jsonl


def parse_field_list(text: str) -> tuple[list[str], dict[str, str]]:
    """``--fields text`` or ``--fields premise=col1,hypothesis=col2``: the fields in order, and the
    columns of those read from another one."""
    names = [part.strip().partition("=")[0].strip() for part in text.split(",") if part.strip()]
    mapping = parse_fields(",".join(part for part in text.split(",") if "=" in part))
    if not names or any(not name.isidentifier() for name in names):
        raise XPromptError(f"--fields takes field names (letters, digits, '_'), optionally as field=column: {text!r}")
    return names, mapping


def parse_label_words(text: str | None) -> dict[str, str] | None:
    """``--label-words good=great,bad=awful``."""
    if not text:
        return None
    pairs = [part.partition("=") for part in text.split(",")]
    if any(not label.strip() or not sep or not word.strip() for label, sep, word in pairs):
        raise XPromptError(f"--label-words takes label=word pairs, got {text!r}")
    return {label.strip(): word.strip() for label, _, word in pairs}


def default_template(fields: list[str]) -> str:
    """One template for every language, the fields in order and the <mask> last."""
    return " ".join(f"{{{name}}}" for name in fields) + f" {MASK}"


def new_task(name: str, train: Path, fields: list[str], tasks_dir: Path, label_field: str = "label",
             lang: str = "en", mapping: dict[str, str] | None = None, template: str | None = None,
             label_words: dict[str, str] | None = None, overwrite: bool = False) -> tuple[Path, dict]:
    """Write ``<tasks_dir>/<name>.yaml`` and its train split; returns (card path, card)."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise XPromptError(f"task name {name!r} may hold only letters, digits, '_' and '-'")
    path = Path(tasks_dir) / f"{name}.yaml"
    if path.exists() and not overwrite:
        raise XPromptError(f"{path} exists; choose another name or pass --overwrite")
    rows = list(read_rows(train, fields, mapping, lang, label_field=label_field))
    labels = sorted({row["label"] for row in rows})
    if len(labels) < 2:
        raise XPromptError(f"{train}: the '{label_field}' column holds {len(labels)} distinct label(s); a task needs two")
    data = Path(tasks_dir) / DATA_FOLDER / name / f"train.{lang}.jsonl"
    card = {"name": name, "version": 1, "description": f"made by 'xprompt task new' from {Path(train).name}",
            "fields": list(fields), "labels": labels, "template": template or default_template(list(fields)),
            "source_language": lang, "official_languages": [lang],
            "languages": {lang: {"label_words": label_words} if label_words else {}},
            "splits": {"train": {"file": str(data.resolve()), "languages": [lang]}}}
    parse_task(card, str(path))  # the loader's own checks, before anything is written
    write_text(data, "".join(json.dumps({"id": row["id"], **{f: row[f] for f in fields}, "label": row["label"]},
                                        ensure_ascii=False) + "\n" for row in rows))
    write_text(path, yaml.safe_dump(card, allow_unicode=True, sort_keys=False))
    return path, {**card, "rows": len(rows), "per_label": {label: sum(r["label"] == label for r in rows) for label in labels}}
