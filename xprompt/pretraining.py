"""PPT (Gu et al. 2022, "Pre-trained Prompt Tuning for Few-shot Learning"): a prompt pre-trained on
unlabeled text with self-supervised tasks cast in the formats of the downstream tasks, as the start
of few-shot prompt tuning. Two of PPT's formats are built here from documents (a document: a list of
sentences):

- ``pair`` (sentence-pair classification, PPT's next-sentence prediction with three classes): for a
  sentence, the sentence that follows it (``next``), another sentence of the same document
  (``same-document``) or a sentence of another document (``other-document``); the format of NLI and
  paraphrase tasks (XNLI, PAWS-X, OCNLI).
- ``choice`` (multiple choice, next-sentence selection): a sentence and four candidates, the one
  that follows it and three from other documents; the label is the letter of the right one.

PPT's third format, single-sentence classification, needs pseudo-labels from a classifier trained on
other data (PPT labels review text with a sentiment model); the only such labels here are a task's
own gold labels, which would make pre-training supervised transfer (the prompt library's job), so it
is left out.

The pre-training task is written as a task card and JSON-lines files inside the run's folder, so the
pre-trained prompt is a run like any other (resumable, in the registry and the library, a start for
``--init-from``); selection uses held-out pre-training rows only.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from .errors import XPromptError

PAIR_LABELS = ["next", "same-document", "other-document"]
CHOICE_LABELS = ["A", "B", "C", "D"]
FORMATS = ("pair", "choice")
CORPUS_LANGUAGE = "mixed"  # a pre-training corpus mixes languages: its task's one "language" (labels made from text)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: split after . ! ? (followed by a space) and after 。！？."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def read_corpus(path: Path) -> list[list[str]]:
    """Documents from ``path``: JSON lines with a ``text`` field (one document a line, split into
    sentences), or plain text with documents separated by blank lines and one sentence a line
    (``.gz`` either way). Documents of fewer than two sentences carry no pair and are dropped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise XPromptError(f"{path}: cannot read the corpus ({e})") from None
    docs: list[list[str]] = []
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise XPromptError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise XPromptError(f"{path}:{lineno}: expected an object with a string 'text' field")
            docs.append(split_sentences(obj["text"]))
    else:
        docs = [[s.strip() for s in block.splitlines() if s.strip()] for block in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise XPromptError(f"{path}: no document of two or more sentences; documents are blank-line-separated "
                           "paragraphs of one sentence a line, or JSON lines with a 'text' field")
    return docs


def pair_rows(docs: list[list[str]], seed: int) -> list[dict]:
    """Sentence-pair rows, as many of each class: for every sentence that has a next one, the pair
    with its next sentence, with another sentence of its document when it has one that is not
    adjacent, and with a sentence of another document (drawn with ``seed``)."""
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {label: [] for label in PAIR_LABELS}
    for d, doc in enumerate(docs):
        for i in range(len(doc) - 1):
            rows["next"].append({"sentence1": doc[i], "sentence2": doc[i + 1], "label": "next"})
            far = [j for j in range(len(doc)) if abs(j - i) > 1]
            if far:
                rows["same-document"].append({"sentence1": doc[i], "sentence2": doc[rng.choice(far)],
                                              "label": "same-document"})
            other = rng.choice([k for k in range(len(docs)) if k != d]) if len(docs) > 1 else None
            if other is not None:
                rows["other-document"].append({"sentence1": doc[i], "sentence2": rng.choice(docs[other]),
                                               "label": "other-document"})
    for label in PAIR_LABELS:  # then as many of each class, drawn from all documents
        rng.shuffle(rows[label])
    n = min(len(r) for r in rows.values())
    if n == 0:
        raise XPromptError("the corpus gives no pair of every class: it needs several documents, some of three "
                           "sentences or more")
    out = [row for label in PAIR_LABELS for row in rows[label][:n]]
    rng.shuffle(out)
    return [{"id": f"pair-{i}", **row} for i, row in enumerate(out)]


def choice_rows(docs: list[list[str]], seed: int) -> list[dict]:
    """Multiple-choice rows: a sentence, and as options its next sentence and three sentences of
    other documents in a seeded order; the label is the next sentence's letter."""
    rng = random.Random(seed)
    if len(docs) < 2:
        raise XPromptError("the multiple-choice format needs at least two documents")
    rows = []
    for d, doc in enumerate(docs):
        others = [s for k, other in enumerate(docs) if k != d for s in other]
        for i in range(len(doc) - 1):
            options = [doc[i + 1], *rng.sample(others, min(3, len(others)))]
            while len(options) < 4:
                options.append(rng.choice(others))
            order = list(range(4))
            rng.shuffle(order)
            shown = [options[k] for k in order]
            rows.append({"context": doc[i], "options": " ".join(f"({CHOICE_LABELS[k]}) {s}" for k, s in enumerate(shown)),
                         "label": CHOICE_LABELS[order.index(0)]})
    rng.shuffle(rows)
    return [{"id": f"choice-{i}", **row} for i, row in enumerate(rows)]


def task_card(fmt: str, languages: list[str]) -> dict:
    """The card of a pre-training task (a task like any other, with no dev or test split)."""
    if fmt == "pair":
        fields, labels, template = ["sentence1", "sentence2"], PAIR_LABELS, "{sentence1} ? <mask> , {sentence2}"
    elif fmt == "choice":
        fields, labels, template = ["context", "options"], CHOICE_LABELS, "{context} ? <mask> : {options}"
    else:
        raise XPromptError(f"unknown pre-training format '{fmt}'; known: {', '.join(FORMATS)}")
    words = {label: label for label in labels}
    return {"name": f"ppt-{fmt}", "version": 1, "kind": "classification",
            "description": f"PPT pre-training, {fmt} format (self-supervised, from unlabeled documents)",
            "fields": fields, "labels": labels, "template": template, "source_language": CORPUS_LANGUAGE,
            "splits": {"train": {"file": f"ppt/train.{fmt}.{{lang}}.jsonl"}},
            "languages": {CORPUS_LANGUAGE: {"label_words": words}}, "official_languages": [CORPUS_LANGUAGE]}


def bundled_corpus(data_dir: Path) -> tuple[list[list[str]], dict]:
    """The default corpus, from training splits the repository carries (never dev or test text):
    the MultiNLI pool's premises of two or more sentences (English) and ChnSentiCorp's training
    reviews and FewCLUE's training texts of two or more sentences (Chinese). Returns the documents
    and their statistics."""
    sources = [("en", "mnli/train_9k.en.jsonl.gz", ["premise"]),
               ("zh", "chnsenticorp/train.zh.jsonl.gz", ["text"]),
               ("zh", "fewclue/eprstmt/train_few_all.zh.jsonl.gz", ["sentence"]),
               ("zh", "fewclue/iflytek/train_few_all.zh.jsonl.gz", ["sentence"]),
               ("zh", "fewclue/csl/train_few_all.zh.jsonl.gz", ["abst"])]
    docs, stats = [], {}
    for lang, relative, keys in sources:
        seen = set()
        with gzip.open(Path(data_dir) / relative, "rt", encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                for key in keys:
                    text = obj.get(key)
                    if isinstance(text, str) and text not in seen:
                        seen.add(text)
                        sentences = split_sentences(text)
                        if len(sentences) >= 2:
                            docs.append(sentences)
                            entry = stats.setdefault(lang, {"documents": 0, "sentences": 0, "sources": []})
                            entry["documents"] += 1
                            entry["sentences"] += len(sentences)
                            if relative not in entry["sources"]:
                                entry["sources"].append(relative)
    return docs, stats
