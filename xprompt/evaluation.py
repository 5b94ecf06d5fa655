"""Evaluation: run a PromptModel over a split for many languages; metrics through scikit-learn."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from .backbones import Backbone
from .config import DType
from .data import NO_LABEL, batches, encode, load_split, sequence_ends, span_sentinels
from .errors import XPromptError
from .model import PromptModel
from .prompts import build_prompt
from .store import load_prompt
from .tasks import TaskSpec
from .verbalizers import CenteredVerbalizer, DecoderVerbalizer, OutputWordsVerbalizer, SoftVerbalizer, WordVerbalizer, label_pieces


def autocast(dtype: DType | str, device: str = "cpu"):
    """bf16 autocast on ``device`` for ``bf16`` (and for ``auto`` where bf16 is native), else nothing."""
    from .hardware import resolve_dtype

    if resolve_dtype(dtype, device)[0] is DType.BF16:
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        if exclude_ids and exclude_ids.get(lang):
            left_out = exclude_ids[lang]
            ds = ds.filter(lambda row: row["id"] not in left_out)
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


def build_model(backbone: Backbone, num_labels: int, method: str, prompt_length: int, readout: str,
                reparam: str = "mlp", position: str = "after-bos", verbalizer=None,
                tower_layers: int | None = None, projection: bool = False) -> PromptModel:
    """A prompt model; ``verbalizer`` defaults to a soft one of ``num_labels`` label vectors."""
    if position == "after-bos" and sequence_ends(backbone.tokenizer)[0] is None:
        position = "first"  # (m)T5 inputs start without <s>: the prompt leads
    prompt = build_prompt(method, prompt_length, backbone.hidden_size, backbone.num_layers, reparam, position,
                          tower_layers, projection)
    prompt.attach(backbone)
    verbalizer = verbalizer if verbalizer is not None else SoftVerbalizer(num_labels, backbone.hidden_size)
    readout = resolve_choices(backbone, verbalizer.kind, readout)[1]  # "auto" by the verbalizer's kind
    return PromptModel(backbone, prompt, verbalizer, readout)


VECTOR_READOUT = "mean"  # what label vectors read by default (docs/compare_methods.md: the best transfer)


def resolve_choices(backbone: Backbone, kind: str, readout: str) -> tuple[str, str]:
    """``--verbalizer auto``: hard when the backbone has an LM head or a decoder, else centered label
    vectors; ``--readout auto``: the ``<mask>`` state for label words, else ``VECTOR_READOUT``."""
    if kind == "auto":
        kind = "hard" if backbone.lm_head is not None or backbone.seq2seq is not None else "centered"
    if readout == "auto":
        readout = "mask" if kind in ("hard", "soft-words") else VECTOR_READOUT
    return kind, readout


def resolve_template(style: str, kind: str) -> str:
    """``--template auto``: each language's own cloze template (``native``) when label words are
    scored (an LM head or a decoder), else the language-agnostic one (``agnostic``)."""
    if style == "auto":
        return "native" if kind in ("hard", "soft-words") else "agnostic"
    return style


def make_verbalizer(backbone: Backbone, kind: str, labels: list[str], words: dict[str, dict[str, str]], lang: str,
                    reduce: str = "mean", readout: str = "mask"):
    """``soft`` or ``centered`` (label vectors), ``hard`` (label words under the LM head or the
    decoder), ``soft-words``, or ``auto`` (see ``resolve_choices``)."""
    kind, readout = resolve_choices(backbone, kind, readout)
    if kind == "soft":
        return SoftVerbalizer(len(labels), backbone.hidden_size)
    if kind == "centered":
        return CenteredVerbalizer(len(labels), backbone.hidden_size)
    if kind not in ("hard", "soft-words"):
        raise XPromptError(f"unknown --verbalizer '{kind}'; known: auto, soft, centered, hard, soft-words")
    if kind == "soft-words":
        if backbone.lm_head is None or readout != "mask":
            raise XPromptError(f"--verbalizer soft-words needs a masked-LM backbone and --readout mask; '{backbone.name}' "
                               f"is of kind {backbone.kind}")
        return OutputWordsVerbalizer(backbone.lm_head, label_pieces(backbone.tokenizer, words, labels), lang)
    pieces = label_pieces(backbone.tokenizer, words, labels) if backbone.kind in ("masked_lm", "seq2seq") else None
    if backbone.seq2seq is not None:
        tok = backbone.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        return DecoderVerbalizer(backbone.seq2seq, pieces, lang, eos, span_sentinels(tok))
    if backbone.lm_head is None:
        raise XPromptError(f"--verbalizer hard needs a masked-LM or seq2seq backbone (an LM head); '{backbone.name}' "
                           f"is of kind {backbone.kind}: use --verbalizer soft")
    if readout != "mask":
        raise XPromptError("--verbalizer hard reads the <mask> state: use --readout mask")
    return WordVerbalizer(backbone.lm_head, pieces, lang, reduce)


def vector_verbalizer(card: dict, num_labels: int, hidden: int) -> SoftVerbalizer:
    """An empty verbalizer of the label-vector kind a saved prompt was trained with (soft or centered)."""
    return (CenteredVerbalizer if card.get("verbalizer") == "centered" else SoftVerbalizer)(num_labels, hidden)


def task_label_words(task: TaskSpec) -> dict[str, dict[str, str]]:
    return {lang: dict(spec.label_words) for lang, spec in task.languages.items() if spec.label_words}


def check_backbone(card: dict, backbone: Backbone, where: str) -> None:
    """Refuse a prompt whose card names other backbone weights than ``backbone``'s."""
    if card.get("backbone_sha256") not in (None, "unknown", backbone.sha256) and backbone.sha256 != "unknown":
        raise XPromptError(
            f"{where}: the prompt was trained on backbone '{card.get('backbone')}' "
            f"(weights sha256 {str(card.get('backbone_sha256'))[:12]}), not on '{backbone.name}' "
            f"({backbone.sha256[:12]}); pass --backbone {card.get('backbone')}"
        )


def verbalizer_from_card(card: dict, backbone: Backbone, num_labels: int | None = None):
    """An empty verbalizer of the kind a saved prompt was trained with: label words from its card,
    or label vectors (soft or centered) for ``num_labels`` labels (default: the card's)."""
    if card.get("verbalizer") in ("hard", "soft-words"):
        return make_verbalizer(backbone, card["verbalizer"], card["labels"], card["label_words"],
                               card["train_language"], card.get("label_reduce", "mean"))
    return vector_verbalizer(card, num_labels or len(card["labels"]), backbone.hidden_size)


def model_from_card(card: dict, backbone: Backbone, verbalizer=None) -> PromptModel:
    """The PromptModel a prompt card describes (method, length, position, tower, readout), without
    its tensors; ``verbalizer`` defaults to the card's own kind."""
    verbalizer = verbalizer if verbalizer is not None else verbalizer_from_card(card, backbone)
    return build_model(backbone, len(card["labels"]), card["method"], int(card["prompt_length"]),
                       card.get("readout", "mask"), position=card.get("position", "after-bos"), verbalizer=verbalizer,
                       tower_layers=card.get("tower_layers"))


def load_run_model(run_dir: Path, backbone: Backbone) -> tuple[PromptModel, dict]:
    """Rebuild the PromptModel a run saved; refuses a prompt trained on another backbone."""
    tensors, card = load_prompt(run_dir)
    where = str(Path(run_dir) / "prompt")
    check_backbone(card, backbone, where)
    if not card.get("labels"):
        raise XPromptError(f"{where}/xprompt.json: 'labels' is missing; the card is damaged")
    model = model_from_card(card, backbone)
    model.prompt.load_tensors(tensors, where)
    model.verbalizer.load_tensors(tensors, where)
    return model, card
