"""The prompt library: retrieve trained prompts for a new task and start from them.

The library is the finished runs in a folder (their ``prompt/`` holds safetensors and a card).
For a new run (``xprompt train --init-from library``):

1. **Candidates**: every prompt on the same backbone weights and of the same shape, of another task
   (SPoT transfers between tasks; ``same_task`` lets the task's own prompts in too).
2. **Ranking** (``rank_by``): ``zero-shot``, each candidate's accuracy on the run's held-out
   selection rows with its prompt in place; or ``flat`` / ``mean`` / ``neurons``, its similarity to
   a *probe* prompt trained for a few steps on the new task (SPoT's recipe). The top ``top_k`` stay.
3. **Transfer**: ``best`` starts from the top-k prompt with the best zero-shot selection accuracy
   (the short trial of each); ``average`` from their average weighted by the ranking scores;
   ``mixture`` from one prompt trained on the mixture of the top-k source tasks' data (each with
   its own label vectors), examples-proportional with a cap as in T5.

The choice (and a mixture's trained prompt) is stored in the run folder, so a resumed run neither
ranks nor mixes again. Label vectors come from a source only when its labels are the task's;
otherwise they keep the new task's class-mean start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import XPromptError
from .similarity import (
    activated_neurons,
    flat_cosine,
    mean_cosine,
    neuron_overlap,
    prompt_shapes,
)
from .store import atomic_write, load_prompt, read_json, write_json

LIBRARY = "library"  # --init-from library
RANK_BY = ("zero-shot", "flat", "mean", "neurons")
TRANSFERS = ("best", "average", "mixture")
CHOICE_FILE = "library_init.json"
MIXTURE_FILE = "library_mixture.safetensors"


@dataclass
class Candidate:
    run: Path
    tensors: dict
    card: dict


def library_prompts(library: Path, sha256: str, shapes: list[tuple] | None = None, exclude_run: Path | None = None,
                    exclude_task: str | None = None, method: str | None = None) -> list[Candidate]:
    """Finished prompts under ``library`` trained on these backbone weights (of this prompt shape
    unless ``shapes`` is None); without ``exclude_run`` and the runs of ``exclude_task``. Sorted by folder name."""
    found = []
    for run in sorted(p.parent.parent for p in Path(library).glob("*/prompt/prompt.safetensors")):
        if exclude_run is not None and run.resolve() == Path(exclude_run).resolve():
            continue
        tensors, card = load_prompt(run)
        if card.get("backbone_sha256") != sha256 or (shapes is not None and prompt_shapes(tensors) != shapes):
            continue
        if exclude_task is not None and card.get("task") == exclude_task:
            continue
        if method is not None and card.get("method") != method:
            continue
        found.append(Candidate(run, tensors, card))
    return found


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in {**model.prompt.tensors(), **model.verbalizer.tensors()}.items()}


def restore(model, state: dict[str, torch.Tensor]) -> None:
    model.prompt.load_tensors(state, "the saved start")
    model.verbalizer.load_tensors(state, "the saved start")


def with_candidate(model, c: Candidate, task, sample, pad_id: int, dtype) -> None:
    """Put a library prompt into ``model``: its prompt, and its label vectors when it is a prompt
    of this task; otherwise label vectors from the class means of ``sample`` read through it."""
    from .training import _start_from, set_class_means

    note = _start_from(model, [(c.tensors, c.card)], None, task, [str(c.run)])
    if "class means" in note:
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
    split to take means from). No training step."""
    from .data import encode
    from .evaluation import make_verbalizer, model_from_card, predict, task_label_words, verbalizer_from_card

    labels = np.asarray(rows["label"])
    pad = backbone.tokenizer.pad_token_id
    encoded: dict[tuple[str, str], object] = {}

    def rows_as(style: str, which):  # each template style encoded once
        key = (style, "sample" if which is sample else "rows")
        if key not in encoded:
            template = task.template_for(lang, style)
            encoded[key] = encode(which, template, backbone.tokenizer, max_length, cache_dir)
        return encoded[key]

    scores = []
    for c in candidates:
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
            scores.append((None, "no label map"))
            continue
        model = model_from_card(c.card, backbone, verbalizer)
        model.prompt.load_tensors(c.tensors, f"{c.run}/prompt")
        model.verbalizer.use_language(lang)
        if used in ("own", "mapped"):
            model.verbalizer.load_tensors(c.tensors, f"{c.run}/prompt")
        elif used == "class means":
            from .training import set_class_means

            set_class_means(model, rows_as(style, sample), pad, dtype)
        preds = predict(model, rows_as(style, rows), 64, pad, dtype)
        if bridge is not None:
            preds = np.asarray(bridge)[preds]
        scores.append((float((preds == labels).mean()), used))
    return scores


def probe_prompt(model, train, cfg, device, steps: int, pad: int) -> dict[str, torch.Tensor]:
    """SPoT's probe: the new task's prompt after ``steps`` steps from the model's current start
    (own AdamW, constant learning rate). Returns its tensors; the model is left as it was."""
    from .data import batches
    from .training import accumulate_gradients

    start = snapshot(model)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    done, epoch = 0, 0
    model.train()
    while done < steps:
        for batch in batches(train, cfg.batch_size, pad, shuffle=True, seed=cfg.seed + 7919, epoch=epoch):
            accumulate_gradients(model, batch, cfg, device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done >= steps:
                break
        epoch += 1
    probe = snapshot(model)
    restore(model, start)
    return probe


def similarity_scores(model, probe: dict, candidates: list[Candidate], measure: str, bos: int, eos: int) -> list[float]:
    """Similarity of each candidate's prompt to the probe prompt by ``measure``."""
    if measure == "flat":
        return [flat_cosine(probe, c.tensors) for c in candidates]
    if measure == "mean":
        return [mean_cosine(probe, c.tensors) for c in candidates]
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


def mixture_schedule(sizes: list[int], steps: int, seed: int, cap: int | None = None) -> list[int]:
    """Which source each step draws its batch from: examples-proportional mixing with a limit
    (Raffel et al. 2020): source i is drawn with probability min(size_i, cap) / sum of those."""
    if not sizes or min(sizes) < 1:
        raise XPromptError(f"every mixture source needs training rows, got sizes {sizes}")
    rates = np.minimum(np.asarray(sizes, dtype=np.float64), cap if cap else math.inf)
    rng = np.random.default_rng(seed)
    return rng.choice(len(sizes), size=steps, p=rates / rates.sum()).tolist()


def train_mixture(model, backbone, cfg, task, sources: list[Candidate], weights: list[float], steps: int,
                  data_dirs, tasks_dir, cache_dir, device) -> tuple[dict[str, torch.Tensor], dict]:
    """One prompt trained on the mixture of the sources' training data, starting from their
    weighted average; each source task keeps its own (trained) label vectors. Returns the prompt's
    tensors and what was mixed; the model is left as it was."""
    from .data import encode, holdout_split, load_split
    from .tasks import DEFAULT_TASKS_DIR, load_task
    from .evaluation import verbalizer_from_card
    from .training import _start_from, accumulate_gradients

    start = snapshot(model)
    own_verbalizer = model.verbalizer
    rows = steps * cfg.batch_size  # enough rows that no source repeats before the mixture ends
    data, verbalizers, names = [], [], []
    for c in sources:
        source = load_task(c.card["task"], tasks_dir or DEFAULT_TASKS_DIR)
        lang = c.card.get("train_language", source.source_language)
        pool = load_split(source, lang, "train", data_dirs)
        # the source's own selection rows stay out, as in its training
        config = c.run / "config.json"
        seed = int(read_json(config)["train"].get("seed", cfg.seed)) if config.is_file() else cfg.seed
        train, _ = holdout_split(pool, min(cfg.select_size, len(pool) // 5), seed)
        train = train.shuffle(seed=cfg.seed).select(range(min(rows, len(train))))
        template = source.template_for(lang, c.card.get("template_style", "agnostic"))
        data.append(encode(train, template, backbone.tokenizer, cfg.max_length, cache_dir))
        verbalizer = verbalizer_from_card(c.card, backbone, len(source.labels)).to(device)
        verbalizer.load_tensors(c.tensors, f"{c.run}/prompt")
        verbalizers.append(verbalizer)
        names.append(f"{source.name}/{lang}")
    sizes = [len(pool_rows) for pool_rows in data]
    schedule = mixture_schedule(sizes, steps, cfg.seed, cap=cfg.mixture_cap)
    _start_from(model, [(c.tensors, c.card) for c in sources], weights, task, [str(c.run) for c in sources])
    groups = [*model.prompt.param_groups(cfg.lr), {"params": [p for v in verbalizers for p in v.parameters()], "lr": cfg.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = backbone.tokenizer.pad_token_id
    streams = [_cycle(d, cfg, pad) for d in data]
    model.train()
    try:
        for source in schedule:
            model.verbalizer = verbalizers[source]
            accumulate_gradients(model, next(streams[source]), cfg, device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.verbalizer = own_verbalizer
    mixed = {k: v.detach().clone() for k, v in model.prompt.tensors().items()}
    restore(model, start)
    counts = np.bincount(schedule, minlength=len(sources)).tolist()
    return mixed, {"mixture": names, "mixture_rows": sizes, "mixture_steps_per_source": counts}


def _cycle(encoded, cfg, pad):
    from .data import batches

    epoch = 0
    while True:
        yield from batches(encoded, cfg.batch_size, pad, shuffle=True, seed=cfg.seed, epoch=epoch)
        epoch += 1


def init_from_library(model, cfg, backbone, task, run_dir: Path, score, train, device, data_dirs=None,
                      tasks_dir=None, cache_dir=None, main: bool = True) -> str:
    """Retrieve from the library and load the start into ``model`` (see the module docstring).
    Returns a one-line description of what was done."""
    from .training import _start_from, init_sample, set_class_means

    run_dir = Path(run_dir)
    pad = backbone.tokenizer.pad_token_id
    sample = init_sample(train, cfg.init_examples, cfg.seed)
    choice_path = run_dir / CHOICE_FILE
    if choice_path.is_file():  # a resumed run: the same start, without ranking or mixing again
        choice = read_json(choice_path)
    else:
        library = Path(cfg.library) if cfg.library else run_dir.parent
        shapes = prompt_shapes(model.prompt.tensors())
        candidates = library_prompts(library, backbone.sha256, shapes, run_dir, None if cfg.same_task else task.name,
                                     cfg.method.value)
        if not candidates:
            other = "" if cfg.same_task else " of another task"
            raise XPromptError(f"no prompt{other} under {library} fits this backbone and --method/--prompt-length; "
                               "train some there first (scripts/build_library.py) or drop --init-from library")
        trial = lambda chosen: zero_shot_scores(model, chosen, task, score, sample, pad, cfg.dtype)  # noqa: E731
        if cfg.rank_by == "zero-shot":
            ranking = trial(candidates)
        else:
            from .data import sequence_ends

            bos, eos = sequence_ends(backbone.tokenizer)
            probe = probe_prompt(model, train, cfg, device, cfg.probe_steps, backbone.tokenizer.pad_token_id)
            ranking = similarity_scores(model, probe, candidates, cfg.rank_by, bos, eos)
        order = sorted(range(len(candidates)), key=lambda i: -ranking[i])[: cfg.top_k]
        top = [candidates[i] for i in order]
        # the short trial: zero-shot selection accuracy of each kept prompt
        zero_shot = [ranking[i] for i in order] if cfg.rank_by == "zero-shot" else trial(top)
        choice = {"transfer": cfg.transfer, "rank_by": cfg.rank_by, "sources": [str(c.run) for c in top],
                  "scores": [ranking[i] for i in order], "zero_shot": zero_shot,
                  "candidates": len(candidates)}
        if cfg.transfer == "mixture":
            mixed, info = train_mixture(model, backbone, cfg, task, top, _weights(choice["scores"]), cfg.mixture_steps,
                                        data_dirs, tasks_dir, cache_dir, device)
            choice.update(info)
            if main:
                atomic_write(run_dir / MIXTURE_FILE, lambda tmp: save_file(mixed, str(tmp)))
        if main:
            write_json(choice_path, choice)
    sources = [Path(x) for x in choice["sources"]]
    loaded = [Candidate(s, *load_prompt(s)) for s in sources]
    for c in loaded:
        if c.card.get("backbone_sha256") != backbone.sha256:
            raise XPromptError(f"{c.run}/prompt was trained on other backbone weights than '{backbone.name}'")
    if choice["transfer"] == "best":
        best = max(range(len(loaded)), key=lambda i: choice["zero_shot"][i])
        note = _start_from(model, [(loaded[best].tensors, loaded[best].card)], None, task, [str(loaded[best].run)])
    elif choice["transfer"] == "average":
        note = _start_from(model, [(c.tensors, c.card) for c in loaded], _weights(choice["scores"]), task,
                           [str(c.run) for c in loaded])
    else:
        mixed = load_file(str(run_dir / MIXTURE_FILE))
        model.prompt.load_tensors(mixed, str(run_dir / MIXTURE_FILE))
        steps = ", ".join(f"{n} {k}" for n, k in zip(choice["mixture"], choice["mixture_steps_per_source"]))
        note = (f"prompt trained {sum(choice['mixture_steps_per_source'])} steps on the mixture ({steps} steps) "
                "(label vectors from class means)")
    if "class means" in note:  # label vectors read through the chosen start, not the discarded vocabulary one
        set_class_means(model, sample, pad, cfg.dtype)
    ranking = ", ".join(f"{Path(r).name} {s:.3f}" for r, s in zip(choice["sources"], choice["scores"]))
    return (f"library ({choice['transfer']} of top {len(sources)} of {choice.get('candidates', '?')} "
            f"by {choice.get('rank_by', 'zero-shot')}: {ranking}): {note}")


def _weights(scores: list[float]) -> list[float]:
    """Averaging weights from ranking scores: negative similarities count as 0; all 0 means equal."""
    clipped = [max(0.0, s) for s in scores]
    return clipped if sum(clipped) > 0 else [1.0] * len(scores)
