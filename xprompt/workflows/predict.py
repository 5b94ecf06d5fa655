"""Applying trained prompts to people's own text: ``read_rows`` (JSON lines, CSV or TSV, streamed,
every error naming its line), ``Predictor`` (one or several runs on one backbone: per-label
probabilities of each run and, for several, their mean) and ``predict_file`` (a file in, a JSON-lines
file out, written whole or not at all)."""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from datasets import Dataset

from ..backbones import Backbone
from ..checks import refuse_tuned
from ..config import DType
from ..data import NO_LABEL, batches, encode
from ..errors import XPromptError
from ..evaluation import member_probabilities, probabilities
from ..fileio import atomic_write, read_json
from ..hardware import compute, eval_batch_size
from ..mixed import MixedModel
from ..model import load_run_model
from ..store import load_card, recorded_tasks_dir
from ..tasks import DEFAULT_TASKS_DIR, TaskSpec, load_task

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def parse_fields(text: str | None) -> dict[str, str]:
    """``--fields premise=col1,hypothesis=col2`` (or ``text=review``): task field -> the input's column."""
    mapping = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, column = part.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise XPromptError(f"--fields takes field=column pairs separated by commas, got {part!r}")
        mapping[name.strip()] = column.strip()
    return mapping


def read_rows(path: Path, fields: list[str], mapping: dict[str, str] | None = None, lang: str | None = None,
              fmt: str | None = None, label_field: str | None = None) -> Iterator[dict]:
    """The rows of a JSON-lines, CSV or TSV file, one at a time (any size): ``{"id", "lang", "line",
    <field>: text}`` (and ``label``, from ``label_field``, where given); a row's own ``lang`` wins over
    ``lang``; ``id`` is the row's, else its line."""
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise XPromptError(f"{path}: unknown input format; name it .jsonl, .csv or .tsv")
    mapping = mapping or {}
    unknown = set(mapping) - set(fields)
    if unknown:
        raise XPromptError(f"--fields names {', '.join(sorted(unknown))}, which the task does not have; its fields: "
                           f"{', '.join(fields)}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                records = ((n, line) for n, line in enumerate(f, 1) if line.strip())
                for n, line in records:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise XPromptError(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove the line") from None
                    if not isinstance(obj, dict):
                        raise XPromptError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                    yield _row(obj, n, path, fields, mapping, lang, label_field)
            else:
                reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
                for obj in reader:
                    yield _row(obj, reader.line_num, path, fields, mapping, lang, label_field)
    except FileNotFoundError:
        raise XPromptError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise XPromptError(f"{path}: cannot read ({e}); check it is UTF-8 {fmt.upper()}") from None


def _row(obj: dict, line: int, path: Path, fields: list[str], mapping: dict[str, str], lang: str | None,
         label_field: str | None = None) -> dict:
    row = {"line": line, "id": str(obj.get("id") if obj.get("id") not in (None, "") else line),
           "lang": str(obj.get("lang") or lang or "")}
    for name in fields:
        column = mapping.get(name, name)
        value = obj.get(column)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else ("empty" if isinstance(value, str) else f"not text ({type(value).__name__})")
            hint = f" (map it with --fields {name}=COLUMN)" if column == name else ""
            raise XPromptError(f"{path}:{line}: field '{column}' is {problem}{hint}")
        row[name] = value
    if label_field:
        label = obj.get(label_field)
        if label is None or str(label).strip() == "":
            raise XPromptError(f"{path}:{line}: label field '{label_field}' is missing (--label-field names the column)")
        row["label"] = str(label).strip()
    return row


@dataclass
class Predictor:
    """Trained prompts of one backbone, ready to label rows: the runs' models, their shared task and
    labels. ``predict`` returns, per row, the label and per-label probabilities (with several runs: the
    mean of theirs, and each run's own under ``runs``)."""

    run_dirs: list[Path]
    backbone: Backbone
    task: TaskSpec
    card: dict
    models: list = field(default_factory=list)
    dtype: DType = DType.FP32
    batch_size: int = 16
    max_length: int = 128
    int8: bool = False  # the frozen matrix products on int8 weights (``hardware.compute``; opt-in)

    @classmethod
    def load(cls, run_dirs: list[Path], backbone: Backbone, tasks_dir: Path | None = None, dtype: DType = DType.FP32,
             device: str = "cpu", batch_size: int | None = None, int8: bool = False) -> "Predictor":
        run_dirs = [Path(r) for r in run_dirs]
        cards = [load_card(run) for run in run_dirs]
        for what in ("task", "labels", "template_style"):
            if len({json.dumps(card.get(what)) for card in cards}) > 1:
                raise XPromptError(f"runs predicted together must share their {what}: "
                                   + ", ".join(f"{run.name}: {card.get(what)}" for run, card in zip(run_dirs, cards)))
        if len(run_dirs) > 1:
            refuse_tuned({run.name: card for run, card in zip(run_dirs, cards)}, "an ensemble of several runs")
        task = load_task(cards[0]["task"], Path(tasks_dir or recorded_tasks_dir(run_dirs[0]) or DEFAULT_TASKS_DIR))
        if task.kind == "generation":
            raise XPromptError(f"{run_dirs[0]} writes text (a generation task); predict labels classes")
        models = [load_run_model(run, backbone)[0].place(device) for run in run_dirs]
        config = run_dirs[0] / "config.json"
        max_length = int(read_json(config).get("train", {}).get("max_length", 128)) if config.is_file() else 128
        return cls(run_dirs, backbone, task, cards[0], models, DType(dtype), batch_size or eval_batch_size(device),
                   max_length, int8)

    @property
    def labels(self) -> list[str]:
        return list(self.card["labels"])

    def template(self, lang: str) -> str:
        style = self.card.get("template_style", "agnostic")
        if style == "native" and lang not in self.task.languages:
            raise XPromptError(f"the run scores {self.task.name}'s native templates and label words: name a language "
                               f"of the card (--lang or a 'lang' field): {', '.join(self.task.language_codes)}")
        return self.task.template_for(lang or self.task.source_language, style)

    def predict(self, rows: list[dict]) -> list[dict]:
        """``rows``: dicts with the task's fields (and ``lang`` where the run reads native words), or texts
        for a task of one field. Returns
        one dict per row, in order: ``label``, ``probabilities`` and, for several runs, ``runs``."""
        fields = list(self.task.fields)
        if any(isinstance(row, str) for row in rows):
            if len(fields) != 1:
                raise XPromptError(f"{self.task.name} reads {', '.join(fields)}: pass each row as a dict of them")
            rows = [{fields[0]: row} if isinstance(row, str) else row for row in rows]
        missing = [(i, name) for i, row in enumerate(rows) for name in fields if not isinstance(row.get(name), str)]
        if missing:
            raise XPromptError(f"row {missing[0][0]}: field '{missing[0][1]}' is missing or not text")
        out: list[dict | None] = [None] * len(rows)
        by_lang: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_lang.setdefault(str(row.get("lang") or ""), []).append(i)
        pad = self.backbone.tokenizer.pad_token_id
        for lang, index in by_lang.items():
            data = Dataset.from_dict({**{name: [rows[i][name] for i in index] for name in self.task.fields},
                                      "label": [NO_LABEL] * len(index)})
            encoded = encode(data, self.template(lang), self.backbone.tokenizer, self.max_length)
            each = self._probabilities(encoded, lang or self.card.get("train_language"), pad)
            mean = np.mean(each, axis=0)
            for k, i in enumerate(index):
                result = labelled(self.labels, mean[k])
                if len(self.models) > 1:
                    result["runs"] = {run.name: labelled(self.labels, p[k]) for run, p in zip(self.run_dirs, each)}
                out[i] = result
        return out  # type: ignore[return-value]


    def _probabilities(self, encoded, lang: str, pad: int) -> list[np.ndarray]:
        """Each run's probabilities of the rows; several runs score them in one mixed pass per batch."""
        if len(self.models) == 1:
            self.models[0].verbalizer.use_language(lang)
            return [probabilities(self.models[0], encoded, self.batch_size, pad, self.dtype, self.int8)]
        mixed = MixedModel(self.models)
        mixed.use_language(lang)
        each = member_probabilities(mixed, encoded, self.batch_size * len(self.models), pad, self.dtype, int8=self.int8)
        return [each[i] for i in range(len(self.models))]


def labelled(labels: list[str], probs) -> dict:
    """One row's answer: the most probable label and every label's probability (6 decimals)."""
    return {"label": labels[int(probs.argmax())], "probabilities": {label: round(float(p), 6) for label, p in zip(labels, probs)}}


def count_rows(path: Path) -> int:
    """Lines that can hold a row (a progress bar's total; CSV/TSV: less the header)."""
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    return max(0, lines - (FORMATS.get(Path(path).suffix.lower()) in ("csv", "tsv")))


def predict_file(predictor: Predictor, source: Path, out: Path, mapping: dict[str, str] | None = None,
                 lang: str | None = None, chunk: int = 512, overwrite: bool = False, on_rows=None) -> int:
    """Label every row of ``source`` into ``out`` (JSON lines: id, line, lang, the input's fields,
    label, probabilities, runs, template), ``chunk`` rows at a time (memory bounded by the chunk);
    ``out`` appears only when every row is done. Returns the rows written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise XPromptError(f"{out} exists; choose another --out or pass --overwrite")
    fields = list(predictor.task.fields)
    runs = [run.name for run in predictor.run_dirs]
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "w", encoding="utf-8") as f:
            batch: list[dict] = []
            for row in itertools.chain(read_rows(source, fields, mapping, lang), [None]):  # streamed
                if row is not None:
                    batch.append(row)
                if batch and (row is None or len(batch) >= chunk):
                    for row_in, result in zip(batch, predictor.predict(batch)):
                        record = {"id": row_in["id"], "line": row_in["line"], "lang": row_in["lang"] or None,
                                  "input": {name: row_in[name] for name in fields}, **result, "run": runs,
                                  "template": predictor.template(row_in["lang"])}
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += len(batch)
                    if on_rows:
                        on_rows(len(batch))
                    batch = []
        if not written:
            raise XPromptError(f"{source}: no rows to label")

    atomic_write(out, write)
    return written


def predict_mixed(requests: list[tuple["Predictor", list[dict]]]) -> list[list[dict]]:
    """Rows for several one-run ``Predictor``s at once, each row scored by its own run's prompt in mixed
    batches (``mixed.MixedModel``): the runs on one backbone share every pass of it. Rows go together
    by language only where a run scores label words of the language (label vectors read none). Per
    request, per row: ``{"label", "probabilities"}``, as each ``Predictor.predict`` gives them."""
    import torch
    from datasets import concatenate_datasets

    out: list[list] = [[None] * len(rows) for _, rows in requests]
    passes: dict[tuple, list[tuple[int, int, str]]] = {}
    for g, (predictor, rows) in enumerate(requests):
        words = predictor.models[0].verbalizer.kind not in ("soft", "centered", "linear") or \
            predictor.card.get("template_style") == "native"
        for r, row in enumerate(rows):
            lang = str(row.get("lang") or predictor.card.get("train_language") or "")
            passes.setdefault((id(predictor.backbone), lang if words else ""), []).append((g, r, lang))
    for (_, lang), items in passes.items():
        order = list(dict.fromkeys(g for g, _, _ in items))  # the requests in this pass, each a member
        lead = requests[order[0]][0]
        mixed = MixedModel([requests[g][0].models[0] for g in order])
        if lang:
            mixed.use_language(lang)
        parts, where = [], []
        for k, g in enumerate(order):
            predictor, rows = requests[g]
            mine = [(r, row_lang) for gg, r, row_lang in items if gg == g]
            data = Dataset.from_dict({**{f: [rows[r][f] for r, _ in mine] for f in predictor.task.fields},
                                      "label": [NO_LABEL] * len(mine)})
            encoded = encode(data, predictor.template(lang or mine[0][1]), predictor.backbone.tokenizer,
                             predictor.max_length)
            parts.append(encoded.select_columns(["input_ids", "mask_pos", "label", "length"]))
            where += [(g, r, k) for r, _ in mine]
        encoded, member_of = concatenate_datasets(parts), torch.tensor([k for *_, k in where])
        device = next(mixed.parameters()).device
        mixed.eval()
        with torch.inference_mode(), compute(mixed, lead.dtype, device.type, lead.int8):
            for batch in batches(encoded, lead.batch_size, lead.backbone.tokenizer.pad_token_id):
                index = batch["index"]
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "mask_pos")}
                for rows_at, i, logits in mixed.scores(inputs, member_of[index].to(device)):
                    probs = torch.softmax(logits, dim=-1).cpu().numpy()
                    labels = requests[order[i]][0].labels
                    for at, p in zip(rows_at.cpu().tolist(), probs):
                        g, r, _ = where[int(index[at])]
                        out[g][r] = labelled(labels, p)
    return out
