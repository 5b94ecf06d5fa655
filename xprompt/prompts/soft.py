"""``soft``: ``prompt_length`` vectors inserted into the input (Lester et al. 2021); PEFT's
``PromptTuning`` twin (a PEFT ``P_TUNING`` adapter, saved as its resulting vectors, starts it too)."""

from __future__ import annotations

import torch

from ..errors import XPromptError
from .base import PromptMethod


class SoftPrompt(PromptMethod):
    name = "soft"
    peft_type = "PROMPT_TUNING"
    peft_imports = ("PROMPT_TUNING", "P_TUNING")

    @classmethod
    def to_peft(cls, tensors: dict[str, torch.Tensor], backbone_kind: str) -> tuple[dict, torch.Tensor]:
        vectors = tensors["prompt_embeddings"]
        return {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "token_dim": int(vectors.shape[1])}, vectors

    @classmethod
    def from_peft(cls, vectors: torch.Tensor, config: dict, hidden: int, where: str) -> dict[str, torch.Tensor]:
        if vectors.ndim != 2 or vectors.shape[1] != hidden:
            raise XPromptError(f"{where}: 'prompt_embeddings' has shape {tuple(vectors.shape)}; this backbone needs "
                               f"(N, {hidden}) (was the adapter trained on another base model?)")
        return {"prompt_embeddings": vectors}
