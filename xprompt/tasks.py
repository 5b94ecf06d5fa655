"""Tasks are data: one YAML card per task under ``tasks/``, validated on load.

A card names the input fields, the ordered labels, the languages, one language-agnostic template
with ``<mask>`` (the default for every language), per-language cloze templates and native label
words (for backbones with an LM head), and where each split comes from.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import XPromptError

MASK = "<mask>"
SPLITS = ("train", "dev", "test")
METRICS = ("accuracy", "macro_f1", "chrf", "bleu", "chrf++")  # classification (scikit-learn), generation (sacrebleu)
KINDS = ("classification", "generation")
DEFAULT_TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


@dataclass(frozen=True)
class SplitSource:
    """Where one split lives, relative to a data root: ``file`` with ``{lang}``, or per-language ``files``."""

    file: str
    files: dict[str, str] = field(default_factory=dict)
    languages: tuple[str, ...] | None = None  # None: every language of the task

    def path_for(self, lang: str) -> str:
        return self.files.get(lang) or self.file.format(lang=lang)


@dataclass(frozen=True)
class LanguageSpec:
    template: str
    label_words: dict[str, str]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    version: int
    fields: tuple[str, ...]
    labels: tuple[str, ...]
    template: str
    source_language: str
    languages: dict[str, LanguageSpec]
    splits: dict[str, SplitSource]
    hub: dict | None = None
    metric: str = "accuracy"
    description: str = ""
    label_names: dict[str, str] = field(default_factory=dict)
    list_separator: str = ", "  # joins a field given as a list of strings
    train_defaults: dict = field(default_factory=dict)  # recipe for this task, e.g. {lr: 0.01}; flags win
    drop_labels: tuple[str, ...] = ()  # rows with these labels are skipped (OCNLI's "-")
    transfer: dict[str, dict[str, str]] = field(default_factory=dict)  # source task -> {label: source label}
    official_languages: tuple[str, ...] = ()  # the benchmark's own language set: every average is over it
    kind: str = "classification"  # or generation: the model writes the ``target`` field's text
    target: str | None = None  # generation: the field to write
    columns: dict[str, str] = field(default_factory=dict)  # a field read from another column of the data
    aggregate: str = "mean"  # how languages are averaged: unweighted mean
    kshot: dict[str, str] = field(default_factory=dict)  # published k-shot files: {train, dev} with {shots} {seed} {lang}
    path: Path | None = None

    @property
    def language_codes(self) -> list[str]:
        return list(self.languages)

    @property
    def official_targets(self) -> list[str]:
        """The official languages other than the source language: the set every target average is over."""
        return [lang for lang in self.official_languages if lang != self.source_language]

    @property
    def extra_languages(self) -> list[str]:
        """Languages the card serves beyond the official set (e.g. XNLI's Korean): own columns, never averaged."""
        return [lang for lang in self.languages if lang not in self.official_languages]

    def template_for(self, lang: str, style: str = "agnostic") -> str:
        """The template a language's rows are encoded with: the card's one language-agnostic
        ``template`` (``agnostic``), or the language's own cloze template (``native``; the
        agnostic one for a language the card declares none for), or the agnostic one without its
        ``<mask>`` (``unmasked``: a prompt that holds the ``<mask>`` itself, ``--prompt-text``)."""
        if style == "native" and lang in self.languages:
            return self.languages[lang].template
        if style == "unmasked":
            return unmasked(self.template)
        if style not in ("agnostic", "native"):
            raise XPromptError(f"unknown template style {style!r}; use agnostic, native or unmasked")
        return self.template

    def split_languages(self, split: str) -> list[str]:
        source = self.splits.get(split)
        if source is None:
            return []
        return list(source.languages) if source.languages else self.language_codes

    def kshot_file(self, use: str, lang: str, shots: int, seed: int, roots: list[Path]) -> Path:
        """The published k-shot file (``use``: train or dev) of ``shots`` per class and ``seed``, under
        the first root holding it; an unpublished K or seed names the ones that exist."""
        relative = self.kshot[use].format(lang=lang, shots=shots, seed=seed)
        for root in roots:
            for path in (Path(root) / relative, Path(root) / (relative[:-3] if relative.endswith(".gz") else relative + ".gz")):
                if path.is_file():
                    return path
        plain = self.kshot[use].removesuffix(".gz")
        parts = re.split(r"(\{shots\}|\{seed\}|\{lang\})", plain)
        regex = re.compile("".join({"{shots}": r"(?P<shots>\d+)", "{seed}": r"(?P<seed>\d+)"}.get(part, re.escape(
            lang if part == "{lang}" else part)) for part in parts))
        found = sorted({(int(m["shots"]), int(m["seed"])) for root in roots if Path(root).is_dir()
                        for f in Path(root).glob(plain.format(lang=lang, shots="*", seed="*") + "*")
                        if (m := regex.fullmatch(f.relative_to(root).as_posix().removesuffix(".gz")))})
        listed = ", ".join(f"--shots {k} --seed {s}" for k, s in found) or "none"
        raise XPromptError(f"task {self.name} publishes no {use} split for --shots {shots} --seed {seed} in {lang} "
                           f"({relative}); published: {listed}")

    def label_id(self, value, where: str) -> int:
        """The index of a label as it appears in a data file (strings or ints)."""
        key = str(value)
        try:
            return self.labels.index(key)
        except ValueError:
            raise XPromptError(
                f"{where}: label {value!r} is not a label of task {self.name} "
                f"(known: {', '.join(self.labels)})"
            ) from None

    def bridge_from(self, source: "TaskSpec | str", source_labels: list[str]) -> list[int]:
        """For a prompt trained on ``source``: this task's label index for each source label index,
        through the card's declared ``transfer`` map (identity when the tasks are the same)."""
        name = source if isinstance(source, str) else source.name
        if name == self.name and list(source_labels) == list(self.labels):
            return list(range(len(self.labels)))
        mapping = self.transfer.get(name)
        if mapping is None:
            known = ", ".join(self.transfer) or "none"
            raise XPromptError(
                f"task {self.name} declares no label map from {name} (its 'transfer' covers: {known}); "
                f"evaluate the prompt on {name} or add transfer.{name} to {self.path or self.name}"
            )
        back = {src: self.labels.index(own) for own, src in mapping.items()}
        missing = [label for label in source_labels if label not in back]
        if missing:
            raise XPromptError(f"{self.path or self.name}: transfer.{name} lacks source label(s) {', '.join(missing)}")
        return [back[label] for label in source_labels]

    def check_languages(self, langs: list[str], split: str | None = None) -> None:
        known = self.split_languages(split) if split else self.language_codes
        unknown = [lang for lang in langs if lang not in known]
        if unknown:
            what = f"the {split} split of {self.name}" if split else f"task {self.name}"
            raise XPromptError(
                f"unknown language(s) for {what}: {', '.join(unknown)}; known: {', '.join(known)}"
            )


def template_parts(template: str) -> list[tuple[str, str]]:
    """Split a template into ``("text", s)``, ``("field", name)`` and ``("mask", "")`` parts.

    Fields use ``str.format`` syntax and are parsed with ``string.Formatter``: nothing is evaluated.
    """
    parts: list[tuple[str, str]] = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        for i, chunk in enumerate(literal.split(MASK)):
            if i:
                parts.append(("mask", ""))
            if chunk:
                parts.append(("text", chunk))
        if name is not None:
            if not name.isidentifier() or spec or conv:
                raise ValueError(f"template field {{{name}}} must be a plain field name")
            parts.append(("field", name))
    return parts


def unmasked(template: str) -> str:
    """A template without its ``<mask>`` and the blanks around it: ``"{text} <mask>"`` -> ``"{text}"``."""
    return re.sub(r"\s*" + re.escape(MASK) + r"\s*", " ", template).strip()


def validate_template(template: str, fields: tuple[str, ...], where: str, masks_wanted: int = 1) -> None:
    try:
        parts = template_parts(template)
    except ValueError as e:
        raise XPromptError(f"{where}: bad template {template!r}: {e}") from None
    masks = sum(kind == "mask" for kind, _ in parts)
    if masks != masks_wanted:
        what = "exactly one" if masks_wanted == 1 else "no"
        raise XPromptError(f"{where}: template {template!r} must contain {what} {MASK} (has {masks})")
    used = [name for kind, name in parts if kind == "field"]
    missing = [f for f in fields if f not in used]
    unknown = [f for f in used if f not in fields]
    if missing:
        raise XPromptError(f"{where}: template {template!r} lacks field(s) {{{'}, {'.join(missing)}}}")
    if unknown:
        raise XPromptError(
            f"{where}: template {template!r} uses unknown field(s) {', '.join(unknown)}; "
            f"the task's fields are {', '.join(fields)}"
        )


def _require(card: dict, key: str, where: str):
    if key not in card:
        raise XPromptError(f"{where}: missing required key '{key}'")
    return card[key]


def parse_task(card: dict, where: str) -> TaskSpec:
    """Build and validate a TaskSpec from a parsed YAML card."""
    if not isinstance(card, dict):
        raise XPromptError(f"{where}: a task card must be a YAML mapping")
    name = str(_require(card, "name", where))
    kind = str(card.get("kind", "classification"))
    if kind not in KINDS:
        raise XPromptError(f"{where}: kind '{kind}' is not one of {', '.join(KINDS)}")
    generation = kind == "generation"
    fields = tuple(_require(card, "fields", where))
    target = str(_require(card, "target", where)) if generation else None
    labels = tuple(str(label) for label in (card.get("labels") or [] if generation else _require(card, "labels", where)))
    if not generation and (len(set(labels)) != len(labels) or len(labels) < 2):
        raise XPromptError(f"{where}: 'labels' must hold at least two distinct labels")
    template = str(_require(card, "template", where))
    masks = 0 if generation else 1  # a generation input has no <mask>: the decoder writes the target
    validate_template(template, fields, f"{where}: template", masks)
    languages: dict[str, LanguageSpec] = {}
    for lang, spec in (_require(card, "languages", where) or {}).items():
        spec = spec or {}
        lw = {str(k): str(v) for k, v in (spec.get("label_words") or {}).items()}
        here = f"{where}: languages.{lang}"
        missing = [label for label in labels if label not in lw]
        if missing and lw:  # label words are optional (label-vector verbalizers read none); all or none
            raise XPromptError(f"{here}: label_words lacks label(s) {', '.join(missing)}")
        extra = [k for k in lw if k not in labels]
        if extra:
            raise XPromptError(f"{here}: label_words has unknown label(s) {', '.join(extra)}")
        words = list(lw.values())
        dupes = sorted({w for w in words if words.count(w) > 1})
        if dupes:
            raise XPromptError(f"{here}: label word(s) {', '.join(dupes)} used for more than one label")
        lang_template = str(spec.get("template", template))
        validate_template(lang_template, fields, f"{here}.template", masks)
        languages[str(lang)] = LanguageSpec(lang_template, lw)
    if not languages:
        raise XPromptError(f"{where}: 'languages' is empty")
    splits: dict[str, SplitSource] = {}
    for split, spec in (_require(card, "splits", where) or {}).items():
        if split not in SPLITS:
            raise XPromptError(f"{where}: unknown split '{split}' (known: {', '.join(SPLITS)})")
        langs = spec.get("languages")
        if langs:
            unknown = [lang for lang in langs if lang not in languages]
            if unknown:
                raise XPromptError(f"{where}: splits.{split} names unknown language(s) {unknown}")
        splits[split] = SplitSource(
            file=str(_require(spec, "file", f"{where}: splits.{split}")),
            files={str(k): str(v) for k, v in (spec.get("files") or {}).items()},
            languages=tuple(langs) if langs else None,
        )
    transfer: dict[str, dict[str, str]] = {}
    for other, mapping in (card.get("transfer") or {}).items():
        mapping = {str(k): str(v) for k, v in (mapping or {}).items()}
        if sorted(mapping) != sorted(labels):
            raise XPromptError(f"{where}: transfer.{other} must map every label of {name} exactly once")
        transfer[str(other)] = mapping
    kshot = {str(k): str(v) for k, v in (card.get("kshot") or {}).items()}
    if kshot and (set(kshot) - {"train", "dev"} or "train" not in kshot
                  or any("{shots}" not in v or "{seed}" not in v for v in kshot.values())):
        raise XPromptError(f"{where}: kshot takes train (and dev) file patterns with {{shots}}, {{seed}} and {{lang}}")
    source = str(card.get("source_language", "en"))
    if source not in languages:
        raise XPromptError(f"{where}: source_language '{source}' is not among the languages")
    official = tuple(str(x) for x in card.get("official_languages") or languages)
    unknown = [lang for lang in official if lang not in languages]
    if unknown:
        raise XPromptError(f"{where}: official_languages names unknown language(s) {', '.join(unknown)}")
    if source not in official:
        raise XPromptError(f"{where}: official_languages must include the source language '{source}'")
    aggregate = str(card.get("aggregate", "mean"))
    if aggregate != "mean":
        raise XPromptError(f"{where}: aggregate '{aggregate}' is not supported (mean: unweighted over languages)")
    metric = str(card.get("metric", "chrf" if kind == "generation" else "accuracy"))
    if metric not in METRICS:
        raise XPromptError(f"{where}: metric '{metric}' is not one of {', '.join(METRICS)}")
    return TaskSpec(
        name=name,
        version=int(card.get("version", 1)),
        fields=fields,
        labels=labels,
        template=template,
        source_language=source,
        languages=languages,
        splits=splits,
        hub=card.get("hub"),
        metric=metric,
        aggregate=aggregate,
        kind=kind,
        target=target,
        columns={str(k): str(v) for k, v in (card.get("columns") or {}).items()},
        official_languages=official,
        description=str(card.get("description", "")),
        label_names={str(k): str(v) for k, v in (card.get("label_names") or {}).items()},
        drop_labels=tuple(str(x) for x in card.get("drop_labels") or ()),
        train_defaults=_train_defaults(card.get("train_defaults"), where),
        list_separator=str(card.get("list_separator", ", ")),
        transfer=transfer,
        kshot=kshot,
    )


def _train_defaults(value, where: str) -> dict:
    allowed = {"lr": float}
    value = value or {}
    if not isinstance(value, dict) or set(value) - set(allowed):
        raise XPromptError(f"{where}: train_defaults may set only {', '.join(allowed)}")
    try:
        return {k: allowed[k](v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise XPromptError(f"{where}: train_defaults values must be numbers") from None


def task_names(tasks_dir: Path = DEFAULT_TASKS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(tasks_dir).glob("*.yaml"))


def load_tasks(tasks_dir: Path = DEFAULT_TASKS_DIR) -> list["TaskSpec"]:
    """Every task card in ``tasks_dir``, loaded and validated."""
    return [load_task(name, tasks_dir) for name in task_names(tasks_dir)]


def load_task(name: str, tasks_dir: Path = DEFAULT_TASKS_DIR) -> TaskSpec:
    """Load ``<tasks_dir>/<name>.yaml`` (or a path to a card) and validate it."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(tasks_dir) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(task_names(tasks_dir)) or "none"
        raise XPromptError(f"unknown task '{name}' (no {path}); known tasks: {known}")
    try:
        card = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise XPromptError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    task = parse_task(card, str(path))
    return TaskSpec(**{**task.__dict__, "path": path})
