"""Evaluation: run a PromptModel over a split for many languages; metrics through scikit-learn."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from .config import DType
from .data import NO_LABEL, batches, encode, load_split
from .hardware import autocast
from .model import PromptModel
from .tasks import TaskSpec


@torch.inference_mode()
def predict(model: PromptModel, encoded, batch_size: int, pad_id: int, dtype: DType | str = DType.FP32) -> np.ndarray:
    """Predicted label index for every row of an encoded split, in the split's order."""
    model.eval()
    preds = np.empty(len(encoded), dtype=np.int64)
    device = next(model.parameters()).device
    with autocast(dtype, device.type):
        for batch in batches(encoded, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            preds[batch["index"].cpu().numpy()] = model(batch).argmax(-1).cpu().numpy()
    return preds


def scores(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict:
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)), zero_division=0)),
    }


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
) -> dict:
    """Apply the model unchanged to each language. Returns ``{lang: {n, accuracy, macro_f1,
    labeled, seconds, pairs_per_s, ids, predictions}}``; unlabeled splits get predictions only.
    ``bridge[i]`` is the task's label index for the model's label i (a prompt from another task);
    ``exclude_ids[lang]`` are rows left out (those a few-shot adaptation trained on); ``cache_dir``
    keeps each split's tokenisation for the next call; ``template`` is the run's template style
    (``agnostic``: the card's one template; ``native``: each language's own)."""
    task.check_languages(langs, split)
    results: dict[str, dict] = {}
    for lang in langs:
        ds = load_split(task, lang, split, data_dirs)
        before = len(ds)
        if exclude_ids and exclude_ids.get(lang):
            left_out = exclude_ids[lang]
            ds = ds.filter(lambda row: row["id"] not in left_out)
        excluded = before - len(ds)
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        encoded = encode(ds, task.template_for(lang, template), tokenizer, max_length, cache_dir)
        model.verbalizer.use_language(lang)  # a hard verbalizer scores this language's label words
        start = time.perf_counter()
        preds = predict(model, encoded, batch_size, tokenizer.pad_token_id, dtype)
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


def rows_key(ids) -> str:
    """A short fingerprint of the rows evaluated (their ids, in order)."""
    import hashlib

    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]
