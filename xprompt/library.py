"""The prompt library: the finished runs in a folder, as a catalogue, and the ways to rank them.

- ``library_prompts``: every saved prompt on the same backbone weights (of a shape, a method, not
  of a task, zero-shot runs only unless adapted ones are asked for);
- ranking by prompt similarity (flat / mean cosine, activated-neuron overlap; Su et al. 2022:
  ``similar_prompts`` for one prompt against the others, ``similarity_scores`` against a probe);
- ranking by zero-shot transfer (``zero_shot_scores`` with a scorer; ``transfer_scores``, every
  prompt on a target task's rows: task similarity).

Starting a run from library prompts (best-of-k, weighted average, mixture) is ``xprompt.transfer``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import CHANGES_BACKBONE, refuse_tuned, tune_of
from .data import encode, sequence_ends
from .errors import XPromptError
from .evaluation import member_probabilities
from .hardware import eval_batch_size
from .mixed import MixedModel
from .model import load_run_model, model_from_card
from .similarity import activated_neurons, flat_cosine, mean_cosine, neuron_overlap, prompt_shapes
from .start import load_average, restore, set_class_means, snapshot
from .store import load_prompt, run_protocol
from .verbalizers import make_verbalizer, task_label_words, verbalizer_from_card

RANK_BY = ("zero-shot", "flat", "mean", "neurons")
MIXED_PROMPTS = 16  # library prompts scored together in one mixed stream (bounds the models held at once)


@dataclass
class Candidate:
    run: Path
    tensors: dict
    card: dict


def library_prompts(library: Path, sha256: str, shapes: list[tuple] | None = None, exclude_run: Path | None = None,
                    exclude_task: str | None = None, method: str | None = None,
                    include_adapted: bool = False) -> list[Candidate]:
    """Finished prompts under ``library`` trained on these backbone weights (of this prompt shape
    unless ``shapes`` is None); without ``exclude_run`` and the runs of ``exclude_task``, and
    without adapted runs (trained on target-language rows) unless ``include_adapted``. Sorted by
    folder name."""
    found = []
    for run in sorted(p.parent.parent for p in Path(library).glob("*/prompt/prompt.safetensors")):
        if exclude_run is not None and run.resolve() == Path(exclude_run).resolve():
            continue
        if not include_adapted and run_protocol(run) == "few-shot-target":
            continue
        tensors, card = load_prompt(run)
        if card.get("backbone_sha256") != sha256 or (shapes is not None and prompt_shapes(tensors) != shapes):
            continue
        if tune_of(card) in CHANGES_BACKBONE or card.get("method") == "none":  # no prompt of the base backbone
            continue
        if exclude_task is not None and card.get("task") == exclude_task:
            continue
        if method is not None and card.get("method") != method:
            continue
        found.append(Candidate(run, tensors, card))
    return found


def similar_prompts(run: Path, backbone, library: Path, include_adapted: bool = False) -> tuple[list[dict], int]:
    """Every library prompt of ``run``'s shape on the same backbone weights, with its flat and mean
    cosine to ``run``'s prompt (over what the method trains) and the overlap of the FFN neurons the
    two activate. Returns (rows, how many prompts of another backbone or shape were left out)."""
    tensors, card = load_prompt(run)
    refuse_tuned({run.name: card}, "the library (it compares prompts on the base backbone)")
    ids = sequence_ends(backbone.tokenizer)
    model, _ = load_run_model(run, backbone)
    active = activated_neurons(model, *ids)
    others = sorted(p.parent.parent for p in Path(library).glob("*/prompt/prompt.safetensors"))
    candidates = library_prompts(library, card.get("backbone_sha256"), prompt_shapes(tensors), exclude_run=run,
                                 include_adapted=include_adapted)
    rows = []
    for c in candidates:
        other_model, _ = load_run_model(c.run, backbone)
        rows.append({"run": c.run.name, "task": c.card["task"], "lang": c.card.get("train_language"),
                     "flat": flat_cosine(tensors, c.tensors, card["method"]),
                     "mean": mean_cosine(tensors, c.tensors, card["method"]),
                     "neurons": neuron_overlap(active, activated_neurons(other_model, *ids))})
    skipped = len([o for o in others if o.resolve() != Path(run).resolve()]) - len(candidates)
    return rows, skipped


def with_candidate(model, c: Candidate, task, sample, pad_id: int, dtype) -> None:
    """Put a library prompt into ``model``: its prompt, and its label vectors when it is a prompt
    of this task; otherwise label vectors from the class means of ``sample`` read through it."""
    _, took = load_average(model, [(c.tensors, c.card)], None, task, [str(c.run)])
    if not took:
        set_class_means(model, sample, pad_id, dtype)


def zero_shot_scores(model, candidates: list[Candidate], task, score, sample, pad_id: int, dtype) -> list[float]:
    """``score()`` with each candidate in place (``with_candidate``). The model is left as it was."""
    start = snapshot(model)
    scores = []
    for c in candidates:
        with_candidate(model, c, task, sample, pad_id, dtype)
        scores.append(score())
        restore(model, start)
    return scores


def transfer_scores(backbone, task, lang: str, candidates: list[Candidate], rows, sample, dtype, max_length: int = 128,
                    cache_dir=None) -> list[tuple[float | None, str]]:
    """Task similarity by zero-shot transfer: each library prompt's accuracy on ``rows`` (a sample
    of the target task's rows in ``lang``, encoded with the template style the prompt was trained
    with), and which verbalizer it used: its own label vectors or words, through the task card's
    declared label map (``own``/``mapped``); else, for label words, this task's own words for
    ``lang`` (``task words``), for label vectors the class means of ``sample`` (training rows)
    read through it (``class means``); ``(None, "no label map")`` when neither exists (no train
    split to take means from). No training step. The prompts of a template style score the rows
    together, up to ``MIXED_PROMPTS`` at a time, in mixed batches (``mixed``)."""
    labels = np.asarray(rows["label"])
    pad = backbone.tokenizer.pad_token_id
    encoded: dict[tuple[str, str], object] = {}

    def rows_as(style: str, which):  # each template style encoded once
        key = (style, "sample" if which is sample else "rows")
        if key not in encoded:
            template = task.template_for(lang, style)
            encoded[key] = encode(which, template, backbone.tokenizer, max_length, cache_dir)
        return encoded[key]

    scores: list[tuple[float | None, str] | None] = [None] * len(candidates)
    built: dict[str, list[tuple[int, object, list | None, str]]] = {}  # template style -> (candidate, model, ...)

    def score(style: str) -> None:  # the style's prompts score the rows in one mixed stream
        group = built.pop(style, [])
        if not group:
            return
        mixed = MixedModel([model for _, model, _, _ in group])
        probs = member_probabilities(mixed, rows_as(style, rows), eval_batch_size(backbone.input_device()), pad, dtype)
        for j, (k, _, bridge, used) in enumerate(group):
            preds = probs[j].argmax(-1)
            if bridge is not None:
                preds = np.asarray(bridge)[preds]
            scores[k] = (float((preds == labels).mean()), used)

    for k, c in enumerate(candidates):
        style = c.card.get("template_style", "agnostic")
        try:
            bridge = task.bridge_from(c.card["task"], c.card["labels"])
        except XPromptError:
            bridge = None
        words = c.card.get("verbalizer") in ("hard", "soft-words")
        if bridge is not None:
            verbalizer, used = verbalizer_from_card(c.card, backbone), "own" if c.card["task"] == task.name else "mapped"
        elif words:  # label words: this task's own words for the language
            verbalizer = make_verbalizer(backbone, c.card["verbalizer"], list(task.labels), task_label_words(task), lang,
                                         c.card.get("label_reduce", "mean"))
            used = "task words"
        elif sample is not None:
            verbalizer, used = verbalizer_from_card(c.card, backbone, len(task.labels)), "class means"
        else:
            scores[k] = (None, "no label map")
            continue
        model = model_from_card(c.card, backbone, verbalizer)
        model.prompt.load_tensors(c.tensors, f"{c.run}/prompt")
        model.verbalizer.use_language(lang)
        if used in ("own", "mapped"):
            model.verbalizer.load_tensors(c.tensors, f"{c.run}/prompt")
        elif used == "class means":
            set_class_means(model, rows_as(style, sample), pad, dtype)
        built.setdefault(style, []).append((k, model, bridge, used))
        if len(built[style]) == MIXED_PROMPTS:
            score(style)
    for style in list(built):
        score(style)
    return scores  # type: ignore[return-value]


def similarity_scores(model, probe: dict, candidates: list[Candidate], measure: str, bos: int, eos: int) -> list[float]:
    """Similarity of each candidate's prompt to the probe prompt by ``measure``."""
    method = model.prompt.name
    if measure == "flat":
        return [flat_cosine(probe, c.tensors, method) for c in candidates]
    if measure == "mean":
        return [mean_cosine(probe, c.tensors, method) for c in candidates]
    if measure != "neurons":
        raise XPromptError(f"unknown similarity measure {measure!r}; use one of {', '.join(RANK_BY)}")
    start = snapshot(model)

    def neurons(tensors):
        model.prompt.load_tensors(tensors, "a library prompt")
        return activated_neurons(model, bos, eos)

    mine = neurons(probe)
    scores = [neuron_overlap(mine, neurons(c.tensors)) for c in candidates]
    restore(model, start)
    return scores
