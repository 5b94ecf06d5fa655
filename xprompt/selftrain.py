"""Self-training on unlabeled target-language text, the standard zero-shot lever (``--unlabeled``):
the trained prompt pseudo-labels target-language inputs (never their labels), the confident rows
join the English training rows, and training continues for a round; selection stays on the English
held-out rows, so a round that does not help English held-out accuracy keeps the previous prompt
(``--self-train-keep best``), or each round hands on its last step (``last``: pseudo-labels can buy
target accuracy at a cost in English accuracy, which English selection cannot see).

The unlabeled rows are the inputs of a split no figure of the run is scored on (by default the test
inputs, whose labels are held back; a dev evaluation of such a run stays zero-shot), or a user's own
file. Scoring a run on the split it read makes that result ``transductive`` (``evaluation`` marks it),
never mixed with zero-shot rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from datasets import Dataset

from .checks import check_unlabeled
from .data import encode, load_split, read_jsonl
from .errors import XPromptError
from .hardware import eval_batch_size
from .evaluation import probabilities
from .start import restore, snapshot
from .training import fit

COLUMNS = ("input_ids", "mask_pos", "label", "length")


def pseudo_rows(probs: np.ndarray, rule: str, fraction: float = 0.3, threshold: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The rows a pseudo-labelling rule keeps, and their labels (the predicted class). ``threshold``
    keeps every row whose highest probability is at least ``threshold``; ``top`` keeps, for each
    class, the ``fraction * rows / classes`` rows predicted as that class with the highest
    probability (fewer when fewer are predicted as it; ties by row order), so the kept rows are
    balanced over the classes."""
    preds, confidence = probs.argmax(1), probs.max(1)
    if rule == "threshold":
        rows = np.flatnonzero(confidence >= threshold)
    elif rule == "top":
        per_class = int(fraction * len(probs) / probs.shape[1])
        chosen = []
        for label in range(probs.shape[1]):
            members = np.flatnonzero(preds == label)
            chosen.extend(members[np.argsort(-confidence[members], kind="stable")][:per_class].tolist())
        rows = np.array(sorted(chosen), dtype=np.int64)
    else:
        raise XPromptError(f"unknown --pseudo-rule '{rule}'; use top or threshold")
    return rows, preds[rows]


def unlabeled_pool(cfg, task, lang: str, tokenizer, data_dirs, cache_dir=None):
    """Up to ``cfg.unlabeled_rows`` inputs of ``lang`` (seeded), encoded with the run's template; their
    labels, where the file has any, are dropped."""
    if cfg.unlabeled_file:
        rows = read_jsonl(Path(cfg.unlabeled_file.format(lang=lang)), task)
    else:
        rows = load_split(task, lang, cfg.unlabeled_split, data_dirs)
    rows = rows.shuffle(seed=cfg.seed).select(range(min(cfg.unlabeled_rows, len(rows))))
    return encode(rows, task.template_for(lang, cfg.template), tokenizer, cfg.max_length, cache_dir)


def self_train(model, cfg, task, train_rows, select_accuracy, run_dir: Path, device, pad_id: int, tokenizer,
               data_dirs=None, cache_dir=None, on_step=None, transform=None):
    """``cfg.self_train_rounds`` rounds: pseudo-label each language's pool with the current prompt,
    keep the rows ``cfg.pseudo_rule`` says, train ``cfg.self_train_steps`` steps on the English rows
    plus those (checkpoints in ``run_dir/selftrain-<round>``, so an interrupted run resumes there),
    and keep the round's best prompt by English held-out accuracy (``cfg.self_train_keep == "last"``: its
    last step, scored on English held-out rows for the record). Returns (the last round's fit,
    what each round kept)."""
    langs = check_unlabeled(cfg, task)
    pools = {lang: unlabeled_pool(cfg, task, lang, tokenizer, data_dirs, cache_dir) for lang in langs}
    source = "your files" if cfg.unlabeled_file else f"{cfg.unlabeled_split} inputs"
    info = {"languages": langs, "source": source, "rule": cfg.pseudo_rule, "keep": cfg.self_train_keep, "rounds": [],
            "pool_rows": {lang: len(pool) for lang, pool in pools.items()}}
    english = train_rows.select_columns(list(COLUMNS))[:]
    done = None
    for round_ in range(1, cfg.self_train_rounds + 1):
        columns = {name: list(english[name]) for name in COLUMNS}
        kept = {}
        for lang, pool in pools.items():
            model.verbalizer.use_language(lang)
            probs = probabilities(model, pool, eval_batch_size(model.prompt.embeddings.device), pad_id, cfg.dtype)
            rows, labels = pseudo_rows(probs, cfg.pseudo_rule, cfg.pseudo_fraction, cfg.pseudo_threshold)
            chosen = pool.select(rows.tolist())
            for name in ("input_ids", "mask_pos", "length"):
                columns[name] += list(chosen[name])
            columns["label"] += labels.tolist()
            kept[lang] = {"kept": len(rows), "of": len(pool),
                          "per_class": np.bincount(labels, minlength=probs.shape[1]).tolist()}
        model.verbalizer.use_language(cfg.lang)
        round_cfg = dataclasses.replace(cfg, max_steps=cfg.self_train_steps)
        done = fit(model, Dataset.from_dict(columns), select_accuracy, round_cfg, Path(run_dir) / f"selftrain-{round_}",
                   device, pad_id, on_step, transform)
        if cfg.self_train_keep == "last":  # the model holds the round's last step
            accuracy = done.last_accuracy if done.last_accuracy is not None else select_accuracy()  # resumed at the end
            done = dataclasses.replace(done, best={"step": done.steps, "accuracy": accuracy, "tensors": snapshot(model)})
        restore(model, done.best["tensors"])
        info["rounds"].append({"round": round_, "pseudo": kept, "rows": len(columns["label"]),
                               "select_accuracy": round(done.best["accuracy"], 4), "best_step": done.best["step"]})
    return done, info
