"""PEFT interop, for every method that declares a PEFT twin (``to_peft`` / ``from_peft``):
``soft`` and ``ptuning`` prompts are PEFT ``PromptTuning`` adapters, ``prefix`` prompts
``PrefixTuning`` adapters (one row per virtual token, layer by layer, key then value, as PEFT reads
``past_key_values``), and PEFT adapters of those types start runs. Deep prompts as hidden states,
unified prompts and an encoder-decoder's prefix have no twin.

A run of such a method also writes, beside its own prompt, PEFT's two files
(``adapter_config.json`` and ``adapter_model.safetensors`` holding ``prompt_embeddings``), so
``PeftModel.from_pretrained(base_model, run/prompt)`` loads it. PEFT puts the virtual tokens before
``<s>``; a run trained with ``--prompt-position first`` puts them there too, so the two give
identical hidden states. An encoder-decoder's prompt lives in its encoder: the twin is a
FEATURE_EXTRACTION adapter over the encoder alone (``MT5EncoderModel``).

Only the documented fields of PEFT's config are written by hand: xprompt does not need PEFT installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checks import ADAPTER_CONFIG
from .errors import XPromptError
from .fileio import atomic_write, write_json
from .prompts import method_class, method_for_peft

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], card: dict, base_model: str, num_heads: int,
                  num_layers: int) -> bool:
    """Write PEFT's adapter files for a saved prompt whose method has a PEFT twin on this backbone
    kind; False (nothing written) otherwise."""
    cls = method_class(card.get("method"))
    exported = cls.to_peft(tensors, card.get("backbone_kind", "encoder")) if cls.peft_type else None
    if exported is None:
        return False
    fields, vectors = exported
    config = {
        "peft_type": cls.peft_type,
        "task_type": "FEATURE_EXTRACTION",
        "num_virtual_tokens": int(vectors.shape[0]),
        "num_transformer_submodules": 1,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
        **fields,
    }
    folder = Path(folder)
    atomic_write(folder / ADAPTER_WEIGHTS,
                 lambda tmp: save_file({"prompt_embeddings": vectors.contiguous()}, str(tmp), metadata={"format": "pt"}))
    write_head(folder, tensors, card, int(vectors.shape[0]) if cls.peft_type == "PROMPT_TUNING" else 0)
    write_json(folder / ADAPTER_CONFIG, config)
    return True


HEAD_WEIGHTS, HEAD_CARD = "xprompt_head.safetensors", "xprompt_head.json"


def write_head(folder: Path, tensors: dict[str, torch.Tensor], card: dict, virtual_tokens: int) -> None:
    """Beside a PEFT twin, what turns its hidden states into labels: the label vectors
    (``xprompt_head.safetensors``: ``weight``, and ``center`` for a centered verbalizer) and how to
    read and score them (``xprompt_head.json``), for the README's recipe. Label-word verbalizers ship
    their label words instead (scored under the backbone's own LM head)."""
    head = {k.split(".", 1)[1]: v.contiguous() for k, v in tensors.items() if k.startswith("verbalizer.")}
    rule = {"soft": "scores = h @ weight.T - 0.5 * (weight * weight).sum(-1)",
            "centered": "scores = (h - center) @ (weight - center).T"}.get(card.get("verbalizer"))
    info = {"labels": card.get("labels"), "verbalizer": card.get("verbalizer"), "readout": card.get("readout"),
            "template": card.get("template"), "virtual_tokens": virtual_tokens,
            "skip": int(card.get("backbone_kind") != "seq2seq"),  # <s>: the mean readout starts after it
            "scoring": rule or "label words under the backbone's LM head (see label_words)",
            "label_words": card.get("label_words"), "prompt_position": card.get("position")}
    if rule and head:
        atomic_write(Path(folder) / HEAD_WEIGHTS, lambda tmp: save_file(head, str(tmp), metadata={"format": "pt"}))
    write_json(Path(folder) / HEAD_CARD, info)


def read_adapter(folder: Path, hidden: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT adapter folder as the tensors of the method that reads its type (PROMPT_TUNING and
    P_TUNING, saved as their embeddings: ``soft``'s; PREFIX_TUNING: ``prefix``'s keys and values),
    and its config; refuses other adapter types and widths."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise XPromptError(f"{folder / ADAPTER_CONFIG}: unreadable PEFT config ({e})") from None
    kind = config.get("peft_type")
    cls = method_for_peft(kind)
    if cls is None:
        raise XPromptError(f"{folder / ADAPTER_CONFIG}: peft_type {kind!r} is not a prompt xprompt can start from "
                           "(PROMPT_TUNING, P_TUNING or PREFIX_TUNING)")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise XPromptError(f"{folder / ADAPTER_CONFIG}: a prompt for an encoder-decoder's two stacks "
                           "(num_transformer_submodules 2) does not fit this encoder prompt")
    weights = folder / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise XPromptError(f"{weights}: unreadable adapter weights ({e}); only safetensors adapters are read") from None
    if "prompt_embeddings" not in tensors:
        raise XPromptError(f"{weights}: no 'prompt_embeddings' tensor (keys: {', '.join(tensors) or 'none'})")
    return cls.from_peft(tensors["prompt_embeddings"].float(), config, hidden, str(weights)), config
