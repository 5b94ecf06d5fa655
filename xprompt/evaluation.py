"""Evaluation: run a PromptModel over a split for many languages; metrics through scikit-learn."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .config import DType
from .errors import XPromptError
from .data import NO_LABEL, batches, encode, load_split
from .hardware import compute
from .mixed import MixedModel
from .model import PromptModel
from .tasks import TaskSpec


@torch.inference_mode()
def predict(model: PromptModel, encoded, batch_size: int, pad_id: int, dtype: DType | str = DType.FP32,
            on_rows=None, int8: bool = False) -> np.ndarray:
    """Predicted label index for every row of an encoded split, in the split's order
    (``on_rows(k)`` hears each batch of k rows scored; ``int8``: ``hardware.compute``)."""
    model.eval()
    preds = np.empty(len(encoded), dtype=np.int64)
    device = next(model.parameters()).device
    with compute(model, dtype, device.type, int8):
        for batch in batches(encoded, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            preds[batch["index"].cpu().numpy()] = model(batch).argmax(-1).cpu().numpy()
            if on_rows:
                on_rows(len(batch["index"]))
    return preds


@torch.inference_mode()
def probabilities(model: PromptModel, encoded, batch_size: int, pad_id: int, dtype: DType | str = DType.FP32,
                  int8: bool = False) -> np.ndarray:
    """The (rows, labels) probabilities (softmax of the label scores) of an encoded split, in its order."""
    model.eval()
    out = None
    device = next(model.parameters()).device
    with compute(model, dtype, device.type, int8):
        for batch in batches(encoded, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            probs = torch.softmax(model(batch).float(), dim=-1).cpu().numpy()
            if out is None:
                out = np.empty((len(encoded), probs.shape[1]), dtype=np.float64)
            out[batch["index"].cpu().numpy()] = probs
    return out


@torch.inference_mode()
def member_probabilities(model: MixedModel, encoded, batch_size: int, pad_id: int, dtype: DType | str = DType.FP32,
                         members: list[int] | None = None, int8: bool = False) -> dict[int, np.ndarray]:
    """Each member's (rows, labels) probabilities of an encoded split, in the split's order: every row
    scored by every member (of ``members``, default all) through mixed batches (``mixed``) of about
    ``batch_size`` (row, member) pairs, the members of one shape together, each row's copies side
    by side. As ``probabilities`` of each member alone, to float rounding."""
    model.eval()
    chosen = set(range(len(model.members)) if members is None else members)
    out: dict[int, np.ndarray] = {}
    device = next(model.parameters()).device
    with compute(model, dtype, device.type, int8):
        for group in model.groups:
            used = [i for i in group if i in chosen]
            for batch in (batches(encoded, max(1, batch_size // len(used)), pad_id) if used else ()):
                rows = batch["index"].numpy()
                copies = {k: batch[k].repeat_interleave(len(used), dim=0).to(device)
                          for k in ("input_ids", "attention_mask", "mask_pos")}
                member = torch.tensor(used, device=device).repeat(len(rows))
                for at, i, logits in model.scores(copies, member):
                    probs = torch.softmax(logits, dim=-1).cpu().numpy()
                    if i not in out:
                        out[i] = np.empty((len(encoded), probs.shape[1]), dtype=np.float64)
                    out[i][rows[(at // len(used)).cpu().numpy()]] = probs
    return out


@torch.inference_mode()
def generate_texts(model: PromptModel, encoded, tokenizer, batch_size: int = 32, dtype: DType | str = DType.FP32,
                   num_beams: int = 1, max_new_tokens: int = 48) -> list[str]:
    """What the model writes for every row of an encoded split (a generation task), in the split's
    order; tabs and line breaks become spaces, so every prediction is one TSV cell."""
    model.eval()
    texts: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    with compute(model, dtype, device.type):
        for batch in batches(encoded, batch_size, tokenizer.pad_token_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(batch, num_beams, max_new_tokens)
            for i, text in zip(batch["index"].tolist(), tokenizer.batch_decode(out, skip_special_tokens=True)):
                texts[i] = " ".join(text.split())
    return texts


GENERATION_METRICS = ("chrf", "bleu", "chrf++")


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu's BLEU tokenizer for a language: zh for Chinese, MeCab for Japanese and Korean where
    it is installed (else characters), characters for Thai (no spaces between words), 13a else."""
    import importlib.util

    if lang == "zh":
        return "zh"
    if lang in ("ja", "ko"):
        return f"{lang}-mecab" if importlib.util.find_spec("MeCab") else "char"
    return "char" if lang == "th" else "13a"


def text_scores(predictions: list[str], references: list[str], lang: str, metrics=("chrf",)) -> dict:
    """Corpus scores through sacrebleu (fractions, sacrebleu's score / 100) with each metric's
    signature: chrF (default), chrF++ and BLEU (tokenised per language)."""
    from sacrebleu.metrics import BLEU, CHRF

    out, signatures = {}, {}
    for name in metrics:
        if name not in GENERATION_METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(GENERATION_METRICS)}")
        metric = CHRF(word_order=2) if name == "chrf++" else CHRF() if name == "chrf" else BLEU(tokenize=bleu_tokenizer(lang))
        out[name] = metric.corpus_score(predictions, [references]).score / 100
        signatures[name] = str(metric.get_signature())
    return {**out, "signature": signatures}


def scores(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict:
    """Accuracy and macro F1 over every label (a label never predicted nor present scores 0), as
    scikit-learn's ``f1_score(average="macro", zero_division=0)`` computes them (tested equal);
    numpy alone, so that evaluating does not import scikit-learn (a second of start-up)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    f1 = []
    for k in range(num_labels):
        tp = int(((preds == k) & (labels == k)).sum())
        wrong = int(((preds == k) & (labels != k)).sum()) + int(((preds != k) & (labels == k)).sum())
        f1.append(2 * tp / (2 * tp + wrong) if 2 * tp + wrong else 0.0)
    return {"accuracy": float((labels == preds).mean()), "macro_f1": float(np.mean(f1))}


def evaluate_languages(
    model: PromptModel,
    task: TaskSpec,
    tokenizer,
    langs: list[str],
    split: str = "dev",
    data_dirs: list[Path] | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    dtype: DType | str = DType.FP32,
    on_language=None,
    bridge: list[int] | None = None,
    exclude_ids: dict[str, set[str]] | None = None,
    cache_dir: Path | None = None,
    template: str = "agnostic",
    generation: dict | None = None,
    int8: bool = False,
    phase=None,
) -> dict:
    """Apply the model unchanged to each language. Returns ``{lang: {n, accuracy, macro_f1,
    labeled, seconds, pairs_per_s, ids, predictions}}``; unlabeled splits get predictions only.
    ``bridge[i]`` is the task's label index for the model's label i (a prompt from another task);
    ``exclude_ids[lang]`` are rows left out (those a few-shot adaptation trained on); ``cache_dir``
    keeps each split's tokenisation for the next call; ``template`` is the run's template style
    (``agnostic``: the card's one template; ``native``: each language's own)."""
    from .phases import phase_or_silent

    phase = phase_or_silent(phase)
    task.check_languages(langs, split)
    results: dict[str, dict] = {}
    for lang in langs:
        ds = load_split(task, lang, split, data_dirs)
        before = len(ds)
        if exclude_ids and exclude_ids.get(lang):
            left_out = exclude_ids[lang]
            ds = ds.filter(lambda row: row["id"] not in left_out)
        excluded = before - len(ds)
        if not len(ds):
            raise XPromptError(f"every {task.name} {split} row of {lang} ({before}) was trained or selected on by the "
                               "run or a run it came from: nothing is left to score; evaluate another split")
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        with phase(f"{lang}: tokenising {len(ds):,} {split} rows" + (" (or reading them cached)" if cache_dir else ""),
                   len(ds)) as advance:
            encoded = encode(ds, task.template_for(lang, template), tokenizer, max_length, cache_dir)
            advance(len(ds))
        model.verbalizer.use_language(lang)  # a hard verbalizer scores this language's label words
        start = time.perf_counter()
        if task.kind == "generation":
            results[lang] = _generation_result(model, task, ds, encoded, tokenizer, lang, batch_size, dtype, excluded,
                                               generation or {})
            if on_language:
                on_language(lang, results[lang])
            continue
        with phase(f"{lang}: scoring {len(ds):,} rows" + (" (int8)" if int8 else ""), len(ds)) as advance:
            preds = predict(model, encoded, batch_size, tokenizer.pad_token_id, dtype, advance, int8)
        if bridge is not None:
            preds = np.asarray(bridge)[preds]
        seconds = time.perf_counter() - start
        labels = np.asarray(ds["label"])
        labeled = bool((labels != NO_LABEL).all())
        result = {
            "n": len(ds),
            "rows": rows_key(ds["id"]),  # which rows: runs are compared and averaged on equal row sets only
            "excluded": excluded,
            "labeled": labeled,
            "seconds": round(seconds, 3),
            "pairs_per_s": round(len(ds) / seconds, 2) if seconds else None,
            "ids": list(ds["id"]),
            "predictions": [task.labels[i] for i in preds],
        }
        if labeled:
            result.update(scores(labels, preds, len(task.labels)))
            # per-row correctness, for bootstrap confidence intervals in reports
            result["correct"] = "".join("1" if ok else "0" for ok in preds == labels)
        results[lang] = result
        if on_language:
            on_language(lang, result)
    return results


def _generation_result(model, task, ds, encoded, tokenizer, lang, batch_size, dtype, excluded, options) -> dict:
    """One language of a generation task: what the model writes, and (where the split has targets)
    the sacrebleu scores against them. ``options``: num_beams, max_new_tokens, metrics."""
    start = time.perf_counter()
    texts = generate_texts(model, encoded, tokenizer, min(batch_size, 32), dtype, options.get("num_beams", 1),
                           options.get("max_new_tokens", 48))
    seconds = time.perf_counter() - start
    references = list(ds["target"])
    labeled = all(references)
    result = {"n": len(ds), "rows": rows_key(ds["id"]), "excluded": excluded, "labeled": labeled,
              "seconds": round(seconds, 3), "pairs_per_s": round(len(ds) / seconds, 2) if seconds else None,
              "ids": list(ds["id"]), "predictions": texts, "decoding": {k: options.get(k) for k in ("num_beams", "max_new_tokens")}}
    if labeled:
        result.update(text_scores(texts, references, lang, options.get("metrics") or (task.metric,)))
    return result


def rows_key(ids) -> str:
    """A short fingerprint of the rows evaluated (their ids, in order)."""
    import hashlib

    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def selection_rows(scorer, key: str = "select_rows") -> dict:
    """The per-row correctness of a selection scorer's last pass, as a string of 0s and 1s in row order
    under ``key``, where the scorer keeps one (its ``last_rows["rows"]``; a single process's classification
    task): the log then allows cross-fitted comparisons of selection rules (scripts/selection_crossfit.py)."""
    rows = (getattr(scorer, "last_rows", None) or {}).get("rows")
    return {key: rows} if rows else {}
