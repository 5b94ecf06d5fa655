"""Data: load a split of a task in a language, sample K shots, tokenise through a template, batch.

A split is looked for, in order, under the user's ``--data-dir``, in the copy the repository
carries (``tasks/data``), and finally on the Hugging Face hub through ``datasets`` (online users).
Rows come back as a ``datasets.Dataset`` with the task's fields, ``id`` and ``label`` (the label's
index in the task, or -1 where the file carries no labels, as our test files).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset

from .config import TrainConfig
from .errors import XPromptError
from .phases import silent
from .tasks import TaskSpec, template_parts

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "tasks" / "data"
NO_LABEL = -1


def _candidates(root: Path, relative: str) -> list[Path]:
    path = root / relative
    if path.suffix == ".gz":
        return [path, path.with_suffix("")]
    return [path, path.with_name(path.name + ".gz")]


def find_split_file(task: TaskSpec, lang: str, split: str, data_dirs: list[Path]) -> Path | None:
    """The first existing file for (task, lang, split) under the given roots, or None."""
    source = task.splits.get(split)
    if source is None:
        return None
    relative = source.path_for(lang)
    for root in data_dirs:
        for path in _candidates(Path(root), relative):
            if path.is_file():
                return path
    return None


def read_jsonl(path: Path, task: TaskSpec) -> Dataset:
    """Read a JSON-lines file (optionally gzipped); every error names the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict] = []
    labeled: bool | None = None
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise XPromptError(f"{where}: malformed JSON ({e.msg}); fix or remove the line") from None
                if not isinstance(obj, dict):
                    raise XPromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                row = {"id": str(obj.get("id", len(rows)))}
                for name in task.fields:
                    value = obj.get(task.columns.get(name, name))
                    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                        value = task.list_separator.join(value)  # e.g. CSL's keyword lists
                    if not isinstance(value, str):
                        problem = "missing" if value is None else f"not a string ({type(value).__name__})"
                        raise XPromptError(f"{where}: field '{name}' is {problem}")
                    row[name] = value
                key = task.target if task.kind == "generation" else "label"
                has_label = obj.get(key) is not None
                if has_label and str(obj[key]) in task.drop_labels:
                    continue
                if labeled is None:
                    labeled = has_label
                elif labeled != has_label:
                    raise XPromptError(f"{where}: some rows carry a '{key}' and some do not")
                if task.kind == "generation":  # the text to write; no class label
                    if has_label and not isinstance(obj[key], str):
                        raise XPromptError(f"{where}: field '{key}' is not a string ({type(obj[key]).__name__})")
                    row["target"], row["label"] = obj.get(key) or "", NO_LABEL
                else:
                    row["label"] = task.label_id(obj["label"], where) if has_label else NO_LABEL
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise XPromptError(f"{path}: cannot read ({e}); check the file is complete JSON lines") from None
    if not rows:
        raise XPromptError(f"{path}: the split is empty")
    return Dataset.from_list(rows)


def _load_from_hub(task: TaskSpec, lang: str, split: str) -> Dataset:
    hub = task.hub or {}
    hub_split = (hub.get("splits") or {}).get(split)
    if not hub.get("path") or not hub_split:
        raise XPromptError(f"task {task.name} declares no hub source for its {split} split")
    import datasets

    name = hub.get("name")
    try:
        ds = datasets.load_dataset(hub["path"], name.format(lang=lang) if name else None, split=hub_split)
    except Exception as e:  # network, unknown config, ...: one line for the user
        raise XPromptError(
            f"no local file for {task.name}/{split}/{lang} and the hub ({hub['path']}) failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; pass --data-dir with "
            f"<task>/<split>.<lang>.jsonl[.gz] files"
        ) from None
    feature = ds.features.get("label")
    names = getattr(feature, "names", None)

    def convert(row: dict, index: int) -> dict | None:
        out = {"id": str(row.get("id", index))}
        out.update({f: row[f] for f in task.fields})
        value = row.get("label")
        if value is None or (isinstance(value, int) and value < 0):
            out["label"] = NO_LABEL
        else:
            name = names[value] if names else value
            if str(name) in task.drop_labels:
                return None  # e.g. OCNLI's "-" (no annotator majority), as read_jsonl drops it
            out["label"] = task.label_id(name, f"{hub['path']}[{index}]")
        return out

    rows = [r for r in (convert(row, i) for i, row in enumerate(ds)) if r is not None]
    if any(r["label"] != NO_LABEL for r in rows):
        # a labelled split: the hub's -1 rows are the ones without a gold label (OCNLI's "-"), not test rows
        rows = [r for r in rows if r["label"] != NO_LABEL]
    if not rows:
        raise XPromptError(f"{hub['path']} gave no rows for {task.name}/{split}/{lang}")
    return Dataset.from_list(rows)


def load_split(
    task: TaskSpec,
    lang: str,
    split: str,
    data_dirs: list[Path] | None = None,
    use_hub: bool = True,
) -> Dataset:
    """Load one split of a task in one language (see the module doc for the search order)."""
    if split not in task.splits:
        raise XPromptError(f"task {task.name} has no {split} split (has: {', '.join(task.splits)})")
    task.check_languages([lang], split)
    roots = [*(data_dirs or []), BUNDLED_DATA_DIR]
    path = find_split_file(task, lang, split, roots)
    if path is not None:
        return read_jsonl(path, task)
    if use_hub:
        return _load_from_hub(task, lang, split)
    wanted = task.splits[split].path_for(lang)
    raise XPromptError(
        f"no file {wanted} under {', '.join(str(r) for r in roots)}; pass --data-dir DIR holding it"
    )


def sample_shots(ds: Dataset, shots: int, seed: int, num_labels: int, exclude: set[int] | None = None) -> list[int]:
    """Row indices of ``shots`` examples per class, drawn with ``seed`` (sorted, reproducible)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {c: [] for c in range(num_labels)}
    for i, label in enumerate(ds["label"]):
        if label != NO_LABEL and (not exclude or i not in exclude):
            by_class[label].append(i)
    chosen: list[int] = []
    for label, rows in by_class.items():
        if len(rows) < shots:
            raise XPromptError(
                f"--shots {shots} asks for more examples than class {label} has ({len(rows)}); lower --shots"
            )
        chosen.extend(rng.sample(rows, shots))
    return sorted(chosen)


def holdout_split(ds: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split off ``size`` rows (seeded) for model selection; returns (train, held_out)."""
    if size >= len(ds):
        raise XPromptError(f"cannot hold out {size} of {len(ds)} rows for selection; lower --select-size")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:size])
    keep = sorted(order[size:])
    return ds.select(keep), ds.select(held)


def sequence_ends(tokenizer) -> tuple[int | None, int | None]:
    """The ids that open and close an input: ``<s>``/``</s>`` (BERT's [CLS]/[SEP]); (m)T5 has no
    opening id (None)."""
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return bos, eos


class TemplateEncoder:
    """Tokenise rows through a template: ``<s> parts... </s>`` with the ``<mask>`` position recorded.

    Literal text and each field are tokenised separately, so the ``<mask>`` token is always one
    token, and when a row is too long the longest field is cut from its end first.
    """

    MAX_TARGET = 64  # target tokens kept for generation (with </s>)

    def __init__(self, template: str, tokenizer, max_length: int = 128):
        self.parts = template_parts(template)
        self.mask_id = mask_token_id(tokenizer) if any(kind == "mask" for kind, _ in self.parts) else None
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._literal = None  # the template's text: tokenised and checked at the first batch (not for a cached split)

    def __call__(self, batch: dict) -> dict:
        tok = self.tokenizer
        if self._literal is None:
            self._literal = {text: tok(text, add_special_tokens=False)["input_ids"] for kind, text in self.parts
                             if kind == "text"}
            fixed = 2 + 1 + sum(len(ids) for ids in self._literal.values())
            if fixed >= self.max_length:
                raise XPromptError(f"the template alone needs {fixed} tokens; raise --max-length")
        fields = [name for kind, name in self.parts if kind == "field"]
        encoded = {
            name: tok(batch[name], add_special_tokens=False)["input_ids"] for name in set(fields)
        }
        out_ids, out_mask = [], []
        for i in range(len(batch[fields[0]])):
            pieces = {name: list(encoded[name][i]) for name in set(fields)}
            budget = self.max_length - 2 - 1 - sum(len(v) for v in self._literal.values())
            while sum(len(v) for v in pieces.values()) > budget:
                longest = max(pieces, key=lambda n: len(pieces[n]))
                excess = sum(len(v) for v in pieces.values()) - budget
                second = max((len(v) for n, v in pieces.items() if n != longest), default=0)
                cut = max(1, min(excess, len(pieces[longest]) - second))
                del pieces[longest][-cut:]
            start, end = sequence_ends(tok)
            ids = [] if start is None else [start]  # (m)T5 inputs have no <s>
            mask_pos = -1
            for kind, value in self.parts:
                if kind == "text":
                    ids.extend(self._literal[value])
                elif kind == "field":
                    ids.extend(pieces[value])
                else:
                    mask_pos = len(ids)
                    ids.append(self.mask_id)
            ids.append(end)
            out_ids.append(ids)
            out_mask.append(mask_pos)
        out = {"input_ids": out_ids, "mask_pos": out_mask, "length": [len(x) for x in out_ids]}
        if "target" in batch:  # generation: the text to write, then </s>
            targets = tok(batch["target"], add_special_tokens=False)["input_ids"]
            out["target_ids"] = [t[: self.MAX_TARGET - 1] + [tok.eos_token_id] for t in targets]
        return out


def mask_token_id(tokenizer) -> int:
    """The template's ``<mask>``: the tokenizer's mask token, or T5's first sentinel ``<extra_id_0>``."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    sentinel = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    if sentinel is None or sentinel == tokenizer.unk_token_id:
        raise XPromptError("the backbone's tokenizer has neither a <mask> token nor T5's <extra_id_0>, "
                           "one of which the template's <mask> needs")
    return sentinel


def span_sentinels(tokenizer) -> tuple[int, int] | None:
    """T5's first two sentinels (``<extra_id_0>``, ``<extra_id_1>``) when the template's ``<mask>``
    becomes ``<extra_id_0>`` (a tokenizer without a mask token), for span-format decoder targets."""
    if tokenizer.mask_token_id is not None:
        return None
    ids = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>"])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        return None
    return ids[0], ids[1]


ENCODING_VERSION = 2  # bump when TemplateEncoder's output changes: old cache files are then ignored
def _tokenizer_key(tokenizer) -> str | None:
    """A hash of the tokenizer's full definition (fast tokenizers only), computed once per tokenizer
    object and kept on it (never by ``id()``, which a later object can reuse)."""
    key = getattr(tokenizer, "_xprompt_key", None)
    if key is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        key = hashlib.sha256(backend.to_str().encode()).hexdigest()
        tokenizer._xprompt_key = key
    return key


def encoding_key(ds: Dataset, template: str, tokenizer, max_length: int) -> str | None:
    """The cache key of a tokenised split: its rows, the template, the tokenizer and max_length."""
    tok = _tokenizer_key(tokenizer)
    if tok is None:
        return None
    fields = sorted({name for kind, name in template_parts(template) if kind == "field"} | {"id", "label"}
                    | ({"target"} & set(ds.column_names)))
    digest = hashlib.sha256(json.dumps([ENCODING_VERSION, template, max_length, tok]).encode())
    for name in fields:
        digest.update(json.dumps(list(ds[name]), ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def encode(ds: Dataset, template: str, tokenizer, max_length: int = 128, cache_dir: Path | None = None) -> Dataset:
    """Add ``input_ids``, ``mask_pos`` and ``length`` columns to a split. With ``cache_dir`` the
    result is an Arrow file there, keyed by rows + template + tokenizer + max_length, so a split
    is tokenised once and every later run or evaluation memory-maps it."""
    encoder = TemplateEncoder(template, tokenizer, max_length)
    key = encoding_key(ds, template, tokenizer, max_length) if cache_dir is not None else None
    if key is None:
        return ds.map(encoder, batched=True, batch_size=512, desc=None, load_from_cache_file=False)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return ds.map(encoder, batched=True, batch_size=512, desc=None, load_from_cache_file=True,
                  cache_file_name=str(Path(cache_dir) / f"encoded-{key}.arrow"), new_fingerprint=key)


def batches(
    ds: Dataset,
    batch_size: int,
    pad_id: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[dict]:
    """Dynamically padded batches. Evaluation sorts by length (least padding); training shuffles,
    then sorts within windows of 50 batches so each batch holds examples of similar length."""
    generation = "target_ids" in ds.column_names
    cols = ds.select_columns(["input_ids", "mask_pos", "label", "length", *(["target_ids"] if generation else [])])[:]
    lengths = cols["length"]
    if shuffle:
        order = list(range(len(ds)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        window = batch_size * 50
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: lengths[j])
        ]
        groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        random.Random(seed * 100_003 + epoch + 1).shuffle(groups)
    else:
        order = sorted(range(len(ds)), key=lambda j: lengths[j])
        groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    ids_col, mask_col, label_col = cols["input_ids"], cols["mask_pos"], cols["label"]
    for group in groups:
        width = max(lengths[i] for i in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            input_ids[row, : lengths[i]] = torch.tensor(ids_col[i])
            attention[row, : lengths[i]] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "mask_pos": torch.tensor([mask_col[i] for i in group]),
            "labels": torch.tensor([label_col[i] for i in group]),
            "index": torch.tensor(group),
        }
        if generation:  # targets padded with -100, which the loss ignores
            targets = [cols["target_ids"][i] for i in group]
            batch["target_ids"] = torch.full((len(group), max(map(len, targets))), -100, dtype=torch.long)
            for row, t in enumerate(targets):
                batch["target_ids"][row, : len(t)] = torch.tensor(t)
        yield batch


def slice_batch(batch: dict, rows: torch.Tensor) -> dict:
    """Some rows of a padded batch, trimmed to the longest of them (a micro-batch or a process's share)."""
    out = {k: v[rows] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(1).max())
    out["input_ids"] = out["input_ids"][:, :width]
    out["attention_mask"] = out["attention_mask"][:, :width]
    return out


def select_count(select_size: int, pool: int) -> int:
    """Rows held out for selection: the default size at most a fifth of the pool; a chosen one as is
    (the rest of the pool trains)."""
    return min(select_size, pool // 5 if select_size == TrainConfig.select_size else pool - 1)


@dataclass
class TrainData:
    train: object  # encoded datasets.Dataset, and the held-out selection rows'
    select: object
    describe: str
    used_ids: list[str]  # ids of the rows training and selection saw (kept out of evaluation)
    train_ids: list[str]; select_ids: list[str]  # noqa: E702
    select_split: str = "train"  # the split the selection rows came from (a published k-shot dev split: dev)


def prepare_data(cfg: TrainConfig, task: TaskSpec, tokenizer, data_dirs: list[Path] | None,
                 cache_dir: Path | None = None, phase=silent) -> TrainData:
    """The training rows and the held-out selection rows, both from the training language and
    ``cfg.source_split`` (the train split; or dev for target-language few-shot adaptation)."""
    task.check_languages([cfg.lang], cfg.source_split)
    published = bool(cfg.shots and task.kshot and cfg.source_split == "train")  # the card's k-shot files, as they are
    select_split = ("dev" if "dev" in task.kshot else "train") if published else cfg.source_split
    pool = None if published else load_split(task, cfg.lang, cfg.source_split, data_dirs)
    if published:
        train, select = (read_jsonl(task.kshot_file(use, cfg.lang, cfg.shots, cfg.seed, [*(data_dirs or []), BUNDLED_DATA_DIR]),
                                    task) for use in ("train", select_split))
        describe = (f"the published {cfg.shots}-shot split of seed {cfg.seed} ({len(train)} {cfg.lang} rows); "
                    f"selection on its {len(select)}-row {cfg.lang} {select_split} split")
    elif cfg.shots:
        train_rows = sample_shots(pool, cfg.shots, cfg.seed, len(task.labels))
        select_rows = sample_shots(pool, cfg.shots, cfg.seed + 1, len(task.labels), exclude=set(train_rows))
        train, select = pool.select(train_rows), pool.select(select_rows)
        describe = f"{cfg.shots} shots per class from {cfg.lang} {cfg.source_split}; selection on {len(select)} other {cfg.lang} rows"
    else:
        train, select = holdout_split(pool, select_count(cfg.select_size, len(pool)), cfg.seed)
        describe = f"{len(train)} {cfg.lang} rows; selection on {len(select)} held-out {cfg.lang} rows"
    template, n = task.template_for(cfg.lang, cfg.template), len(train) + len(select)
    with phase(f"tokenising {n:,} {cfg.lang} rows ({len(train):,} training, {len(select):,} for selection)", n):
        encoded = [encode(part, template, tokenizer, cfg.max_length, cache_dir) for part in (train, select)]
    return TrainData(*encoded, describe, [*train["id"], *select["id"]], list(train["id"]), list(select["id"]), select_split)
