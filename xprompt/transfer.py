"""Starting a run from other runs: ``--init-from RUN[,RUN]`` (one saved prompt or the weighted average
of several), a PEFT adapter folder, or ``--init-from library`` (SPoT-style retrieval):

1. **Candidates**: every library prompt on the same backbone weights and of the same shape, of another
   task (SPoT transfers between tasks; ``same_task`` lets the task's own prompts in too).
2. **Ranking** (``rank_by``): ``zero-shot``, each candidate's accuracy on the run's held-out
   selection rows with its prompt in place; or ``flat`` / ``mean`` / ``neurons``, its similarity to
   a *probe* prompt trained for a few steps on the new task (SPoT's recipe). The top ``top_k`` stay.
3. **Transfer**: ``best`` starts from the top-k prompt with the best zero-shot selection accuracy
   (the short trial of each); ``average`` from their average weighted by the ranking scores;
   ``mixture`` from one prompt trained on the mixture of the top-k source tasks' data (each with
   its own label vectors), examples-proportional with a cap as in T5.

The choice (and a mixture's trained prompt) is stored in the run folder, so a resumed run neither
ranks nor mixes again. Label vectors come from a source only when its labels are the task's (or
mapped by the card); otherwise they are the class means read through the chosen start. This layer
sits above the training loop: it runs short trainings (probe, mixture); the loop never calls it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .data import batches, encode, holdout_split, load_split, select_count, sequence_ends
from .errors import XPromptError
from .fileio import atomic_write, read_json, write_json
from .library import Candidate, library_prompts, similarity_scores, zero_shot_scores
from .model import check_backbone
from .checks import is_adapter
from .peft_io import read_adapter
from .similarity import prompt_shapes
from .start import init_sample, load_average, restore, set_class_means, snapshot
from .store import load_prompt
from .tasks import DEFAULT_TASKS_DIR, load_task
from .training import accumulate_gradients
from .verbalizers import verbalizer_from_card

LIBRARY = "library"  # --init-from library
CHOICE_FILE = "library_init.json"
MIXTURE_FILE = "library_mixture.safetensors"


def start_from_runs(model, run_dirs: list[Path], weights: list[float] | None, backbone, task) -> tuple[str, bool]:
    """Start from saved prompts (same backbone and shape): one run's prompt, or the weighted
    average of several (weights normalised to sum 1; equal by default); a PEFT adapter folder
    counts as a prompt. Returns what was done and whether the label vectors came along."""
    sources = []
    for run_dir in run_dirs:
        if is_adapter(run_dir):  # a PEFT PromptTuning / PrefixTuning adapter folder
            tensors, config = read_adapter(run_dir, backbone.hidden_size)
            sources.append((tensors, {"task": None, "labels": None, "peft": config.get("base_model_name_or_path")}))
            continue
        tensors, card = load_prompt(run_dir)
        check_backbone(card, backbone, str(Path(run_dir) / "prompt"))
        sources.append((tensors, card))
    return load_average(model, sources, weights, task, [str(r) for r in run_dirs])


def probe_prompt(model, train, cfg, device, steps: int, pad: int) -> dict[str, torch.Tensor]:
    """SPoT's probe: the new task's prompt after ``steps`` steps from the model's current start
    (own AdamW, constant learning rate). Returns its tensors; the model is left as it was."""
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
        made = read_json(config)["train"] if config.is_file() else {}
        seed, size = int(made.get("seed", cfg.seed)), int(made.get("select_size", TrainConfig.select_size))
        train, _ = holdout_split(pool, select_count(size, len(pool)), seed)
        train = train.shuffle(seed=cfg.seed).select(range(min(rows, len(train))))
        template = source.template_for(lang, c.card.get("template_style", "agnostic"))
        data.append(encode(train, template, backbone.tokenizer, cfg.max_length, cache_dir))
        verbalizer = verbalizer_from_card(c.card, backbone, len(source.labels)).to(device)
        verbalizer.load_tensors(c.tensors, f"{c.run}/prompt")
        verbalizers.append(verbalizer)
        names.append(f"{source.name}/{lang}")
    sizes = [len(pool_rows) for pool_rows in data]
    schedule = mixture_schedule(sizes, steps, cfg.seed, cap=cfg.mixture_cap)
    load_average(model, [(c.tensors, c.card) for c in sources], weights, task, [str(c.run) for c in sources])
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
    epoch = 0
    while True:
        yield from batches(encoded, cfg.batch_size, pad, shuffle=True, seed=cfg.seed, epoch=epoch)
        epoch += 1


def init_from_library(model, cfg, backbone, task, run_dir: Path, score, train, device, data_dirs=None,
                      tasks_dir=None, cache_dir=None, main: bool = True) -> str:
    """Retrieve from the library and load the start into ``model`` (see the module docstring).
    Returns a one-line description of what was done."""
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
                                     cfg.method, include_adapted=cfg.library_adapted)
        if not candidates:
            other = "" if cfg.same_task else " of another task"
            raise XPromptError(f"no prompt{other} under {library} fits this backbone and --method/--prompt-length; "
                               "train some there first (scripts/build_library.py) or drop --init-from library")
        trial = lambda chosen: zero_shot_scores(model, chosen, task, score, sample, pad, cfg.dtype)  # noqa: E731
        if cfg.rank_by == "zero-shot":
            ranking = trial(candidates)
        else:
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
        best = loaded[sources.index(library_starts(choice)[0])]
        note, took = load_average(model, [(best.tensors, best.card)], None, task, [str(best.run)])
    elif choice["transfer"] == "average":
        note, took = load_average(model, [(c.tensors, c.card) for c in loaded], _weights(choice["scores"]), task,
                                 [str(c.run) for c in loaded])
    else:
        mixed = load_file(str(run_dir / MIXTURE_FILE))
        model.prompt.load_tensors(mixed, str(run_dir / MIXTURE_FILE))
        steps = ", ".join(f"{n} {k}" for n, k in zip(choice["mixture"], choice["mixture_steps_per_source"]))
        note, took = (f"prompt trained {sum(choice['mixture_steps_per_source'])} steps on the mixture ({steps} steps) "
                      "(label vectors from class means)"), False
    if not took:  # label vectors read through the chosen start, not the discarded vocabulary one
        set_class_means(model, sample, pad, cfg.dtype)
    ranking = ", ".join(f"{Path(r).name} {s:.3f}" for r, s in zip(choice["sources"], choice["scores"]))
    return (f"library ({choice['transfer']} of top {len(sources)} of {choice.get('candidates', '?')} "
            f"by {choice.get('rank_by', 'zero-shot')}: {ranking}): {note}")


def library_starts(choice: dict) -> list[Path]:
    """The library runs whose tensors a start took: the best of the top k, or all of them (average,
    mixture)."""
    sources = [Path(x) for x in choice["sources"]]
    if choice["transfer"] == "best":
        return [sources[max(range(len(sources)), key=lambda i: choice["zero_shot"][i])]]
    return sources


def _weights(scores: list[float]) -> list[float]:
    """Averaging weights from ranking scores: negative similarities count as 0; all 0 means equal."""
    clipped = [max(0.0, s) for s in scores]
    return clipped if sum(clipped) > 0 else [1.0] * len(scores)
