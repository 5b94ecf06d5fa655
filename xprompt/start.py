"""Where a prompt model starts: its input vectors (``--init``), per-layer vectors from what they
produce, label vectors from the class means read through them (UniPrompt's dynamic soft label
words), or the weighted average of saved prompts (``load_average``); snapshots of that state; and
the card that describes a saved prompt."""

from __future__ import annotations

import random

import torch

from . import __version__
from .backbones import Backbone
from .data import batches, sequence_ends
from .errors import XPromptError
from .hardware import compute
from .model import PromptModel
from .prompts import PromptMethod, input_vectors
from .checks import resolve_template
from .verbalizers import task_label_words


def init_sample(train, examples: int, seed: int):
    """A stratified sample of up to ``examples`` rows: as many of every class, so that each class
    (119 in IFLYTEK) has a mean even when a plain random sample would miss it."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(train["label"]):
        by_class.setdefault(label, []).append(i)
    per_class = max(1, examples // max(1, len(by_class)))
    rng = random.Random(seed)
    chosen = [i for rows in by_class.values() for i in rng.sample(rows, min(per_class, len(rows)))]
    return train.select(sorted(chosen))


@torch.no_grad()
def set_class_means(model: PromptModel, sample, pad_id: int, dtype, on_rows=None) -> list[int]:
    """Label vectors from the class-mean states of ``sample`` read with the model's current prompt
    (``on_rows(k)`` hears each batch of k rows read)."""
    if not model.verbalizer.needs_init:
        return []
    states, labels = [], []
    model.eval()
    device = model.prompt.embeddings.device
    with compute(model, dtype, device.type):
        for batch in batches(sample, 64, pad_id):
            states.append(model.states({k: v.to(device) for k, v in batch.items()}).float().cpu())
            labels.append(batch["labels"])
            if on_rows:
                on_rows(len(batch["labels"]))
    return model.verbalizer.init_from_class_means(torch.cat(states), torch.cat(labels))


def initial_vectors(backbone: Backbone, length: int, cfg, task=None) -> torch.Tensor:
    """The prompt's input vectors by ``cfg.init`` (see ``prompts.input_vectors``); ``label-words``
    reads the task card's words of the training language."""
    words = None
    if cfg.init == "label-words":
        words = task.languages[cfg.lang].label_words if task is not None and cfg.lang in task.languages else {}
        if not words:
            raise XPromptError(f"--init label-words: task {cfg.task} declares no languages.{cfg.lang}.label_words "
                               f"in its card; add them or use another --init")
        words = [words[label] for label in task.labels]
    return input_vectors(backbone.input_embeddings().weight, backbone.tokenizer, length, cfg.init, cfg.seed,
                         cfg.init_text, words)


@torch.no_grad()
def init_prompt_and_verbalizer(model: PromptModel, backbone: Backbone, train, cfg, task=None, phase=None) -> list[int]:
    """The prompt's input vectors by ``cfg.init``; per-layer vectors from the states they produce;
    label vectors from the class-mean states of (up to ``init_examples``) training rows read
    through it. Returns the labels that had no training row (their vectors start at the mean of
    all states). ``phase`` (``xprompt.phases``) hears the class-mean pass, with its row count."""
    from .phases import phase_or_silent

    if len(model.prompt.embeddings):  # free vectors (a ``--prompt-text`` prompt has none)
        model.prompt.embeddings.copy_(initial_vectors(backbone, model.prompt.length, cfg, task))
    model.init_layer_prompts(*sequence_ends(backbone.tokenizer))
    if not model.verbalizer.needs_init:
        return []
    sample = init_sample(train, cfg.init_examples, cfg.seed)
    with phase_or_silent(phase)(f"initialising label vectors from the class means of {len(sample):,} training rows",
                                len(sample)) as advance:
        return set_class_means(model, sample, backbone.tokenizer.pad_token_id, cfg.dtype, advance)


def snapshot(model: PromptModel) -> dict[str, torch.Tensor]:
    """The saved tensors of the prompt and verbalizer (and of a tuned backbone: ``backbone.*``), copied."""
    return {k: v.clone() for k, v in {**model.prompt.tensors(), **model.verbalizer.tensors(),
                                      **model.backbone_tensors()}.items()}


def restore(model: PromptModel, state: dict[str, torch.Tensor]) -> None:
    model.prompt.load_tensors(state, "the saved start")
    model.verbalizer.load_tensors(state, "the saved start")
    model.load_backbone_tensors(state, "the saved start")


def prompt_card(cfg, task, backbone: Backbone, extra: dict, verbalizer_kind: str, prompt: PromptMethod) -> dict:
    """What a saved prompt says about itself: the method and its options, the task, template and
    label words, the protocol, the backbone and its weights."""
    fields = prompt.card_fields()
    style = resolve_template(cfg.template, verbalizer_kind)
    return {
        "xprompt_version": __version__,
        "method": cfg.method,
        "prompt_length": fields.pop("prompt_length"),
        "position": fields.pop("prompt_position"),
        **fields,  # the method's own options (reparam, prefix_projection, tower_layers)
        "init": cfg.init,
        "readout": cfg.readout,
        "task": task.name,
        "task_version": task.version,
        "template": task.template_for(cfg.lang, style),
        "template_style": style,  # agnostic: one template for every language; native: each language's own
        "labels": list(task.labels),
        "verbalizer": verbalizer_kind,
        **({"label_words": task_label_words(task), "label_reduce": cfg.label_reduce}
           if verbalizer_kind in ("hard", "soft-words") else {}),
        "train_language": cfg.lang,
        "protocol": cfg.protocol,
        "backbone": backbone.name,
        "backbone_kind": backbone.kind,
        "backbone_revision": backbone.revision,
        "backbone_bin_weights": backbone.bin_weights,
        "backbone_sha256": backbone.sha256,
        "hidden_size": backbone.hidden_size,
        **extra,
    }


LABEL_TENSORS = ("verbalizer.weight", "verbalizer.bias")  # one row per label: reordered through a label map


def label_order(task, card: dict) -> list[int] | None:
    """For a saved prompt: the index of its label that each of ``task``'s labels corresponds to, when
    it is a prompt of this task or of one whose labels this task's card maps (its ``transfer``); else None."""
    try:
        bridge = task.bridge_from(card.get("task") or "", card.get("labels") or [])
    except XPromptError:
        return None
    if sorted(bridge) != list(range(len(task.labels))):
        return None
    order = [0] * len(bridge)
    for source, own in enumerate(bridge):
        order[own] = source
    return order


def load_average(model: PromptModel, sources: list[tuple[dict, dict]], weights: list[float] | None,
                 task, names: list[str]) -> tuple[str, bool]:
    """Load the weighted average of saved prompts (``(tensors, card)`` pairs) into the model. The
    label vectors are taken (averaged) too when every source is a prompt of this task, or of a
    task whose labels this task's card maps (reordered through the map); otherwise they must come
    from class means read through the new start, as in SPoT's cross-task transfer. Returns (what
    was done, whether the label vectors came along)."""
    if weights is not None and len(weights) != len(sources):
        raise XPromptError(f"--init-weights has {len(weights)} values for {len(sources)} --init-from runs")
    w = torch.tensor(weights if weights is not None else [1.0] * len(sources), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise XPromptError(f"--init-weights must be non-negative and not all zero, got {weights}")
    w = (w / w.sum()).tolist()
    where = ", ".join(f"{name}/prompt" for name in names)

    def average(key: str, tensors: list[dict]) -> torch.Tensor:
        return sum(wi * t[key].double() for wi, t in zip(w, tensors)).float()

    averaged = {}
    for key in model.prompt.tensors():
        shapes = {tuple(t[key].shape) if key in t else None for t, _ in sources}
        if len(shapes) != 1:
            raise XPromptError(f"{where}: '{key}' differs in shape between the runs ({sorted(map(str, shapes))})")
        if None in shapes:
            raise XPromptError(f"{where}: '{key}' is missing; were they all trained with --method {model.prompt.name}?")
        averaged[key] = average(key, [t for t, _ in sources])
    model.prompt.load_tensors(averaged, where)
    # label vectors only from prompts of this task's labels: two tasks' "0"/"1" need not mean the same
    wanted = model.verbalizer.tensors()
    orders = [label_order(task, card) for _, card in sources]
    took = bool(wanted) and None not in orders and all(
        k in t and t[k].shape == wanted[k].shape for t, _ in sources for k in wanted)
    if took:
        reordered = [{k: t[k][order] if k in LABEL_TENSORS else t[k] for k in wanted}
                     for (t, _), order in zip(sources, orders)]
        model.verbalizer.load_tensors({k: average(k, reordered) for k in wanted}, where)
    mapped = took and any(card.get("task") != task.name for _, card in sources)
    if not wanted:
        kind = "prompt (label words from the task card)"
    elif took:
        kind = "prompt and label vectors" + (" (through the card's label map)" if mapped else "")
    else:
        kind = "prompt (label vectors from class means read through it)"
    if len(sources) == 1:
        return f"{kind} from {names[0]}", took
    return f"{kind} from the weighted average of " + ", ".join(f"{n} ({x:.3g})" for n, x in zip(names, w)), took
