"""PEFT interop: soft and P-tuning prompts as PEFT ``PromptTuning`` adapters, prefix prompts as
``PrefixTuning`` adapters, and back.

A run of ``--method soft``, ``ptuning`` or ``prefix`` also writes, beside its own prompt, PEFT's two
files (``adapter_config.json`` and ``adapter_model.safetensors`` holding ``prompt_embeddings``), so
``PeftModel.from_pretrained(base_model, run/prompt)`` loads it. PEFT puts the virtual tokens before
``<s>``; a run trained with ``--prompt-position first`` puts them there too, so the two give
identical hidden states. A P-tuning prompt is exported by its resulting vectors (what PEFT's
PromptTuning of those vectors computes); a prefix prompt by its keys and values, one row per virtual
token laid out as PEFT's ``past_key_values`` are read: layer by layer, key then value. Deep prompts
as hidden states and unified prompts have no PEFT twin.

Only the documented fields of PEFT's config are written by hand: xprompt does not need PEFT installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import XPromptError
from .store import atomic_write, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORTABLE = ("soft", "ptuning", "prefix")


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], card: dict, base_model: str, num_heads: int,
                  num_layers: int) -> bool:
    """Write PEFT's adapter files for a soft, P-tuning or prefix prompt; False (nothing written) for
    other methods, and for a prefix on an encoder-decoder (PEFT's T5 prefix is another computation).
    An encoder-decoder's prompt lives in its encoder: the twin is a FEATURE_EXTRACTION adapter over
    the encoder alone (``MT5EncoderModel``)."""
    if card.get("method") not in EXPORTABLE:
        return False
    if card.get("method") == "prefix" and card.get("backbone_kind") == "seq2seq":
        return False
    prefix = card.get("method") == "prefix"
    if prefix:  # (layers, tokens, hidden) keys and values -> (tokens, layers * 2 * hidden)
        vectors = torch.stack([tensors["keys"], tensors["values"]], dim=1).permute(2, 0, 1, 3).flatten(1)
    else:
        vectors = tensors["prompt_embeddings"]
    config = {
        "peft_type": "PREFIX_TUNING" if prefix else "PROMPT_TUNING",
        "task_type": "FEATURE_EXTRACTION",
        "num_virtual_tokens": int(vectors.shape[0]),
        "token_dim": int(vectors.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    if prefix:
        for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"):
            del config[key]
        config.update({"token_dim": int(tensors["keys"].shape[2]), "encoder_hidden_size": int(tensors["keys"].shape[2]),
                       "prefix_projection": False})
    folder = Path(folder)
    atomic_write(folder / ADAPTER_WEIGHTS,
                 lambda tmp: save_file({"prompt_embeddings": vectors.contiguous()}, str(tmp), metadata={"format": "pt"}))
    write_json(folder / ADAPTER_CONFIG, config)
    return True


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / "prompt" / "prompt.safetensors").is_file()


def read_adapter(folder: Path, hidden: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT PromptTuning or P-tuning adapter folder (saved as its embeddings) as xprompt prompt
    tensors ``{"prompt_embeddings"}``, a PrefixTuning one (saved as its key/value table, with or
    without prefix_projection) as ``{"keys", "values"}``, and its config; refuses other adapter
    types and widths."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise XPromptError(f"{folder / ADAPTER_CONFIG}: unreadable PEFT config ({e})") from None
    kind = config.get("peft_type")
    if kind not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise XPromptError(f"{folder / ADAPTER_CONFIG}: peft_type {kind!r} is not a prompt xprompt can start from "
                           "(PROMPT_TUNING, P_TUNING or PREFIX_TUNING)")
    # (a PREFIX_TUNING adapter trained with prefix_projection is saved, by PEFT too, as the MLP's
    # resulting table, which PEFT itself reads back in inference mode: read it like any other)
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
    vectors = tensors["prompt_embeddings"].float()
    if kind == "PREFIX_TUNING":  # (tokens, layers * 2 * hidden) -> keys and values (layers, tokens, hidden)
        layers = int(config.get("num_layers") or 0)
        if vectors.ndim != 2 or layers < 1 or vectors.shape[1] != layers * 2 * hidden:
            raise XPromptError(f"{weights}: 'prompt_embeddings' has shape {tuple(vectors.shape)}; a prefix for this "
                               f"backbone needs (N, num_layers x 2 x {hidden}) (another base model?)")
        pairs = vectors.view(vectors.shape[0], layers, 2, hidden).permute(2, 1, 0, 3)
        return {"keys": pairs[0].contiguous(), "values": pairs[1].contiguous(),
                "prompt_embeddings": torch.zeros(vectors.shape[0], hidden)}, config
    if vectors.ndim != 2 or vectors.shape[1] != hidden:
        raise XPromptError(f"{weights}: 'prompt_embeddings' has shape {tuple(vectors.shape)}; this backbone needs "
                           f"(N, {hidden}) (was the adapter trained on another base model?)")
    return {"prompt_embeddings": vectors}, config
