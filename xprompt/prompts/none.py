"""``none``: no prompt at all, for the field's baselines without one (``--tune head``: vanilla
fine-tuning with a linear head; ``--tune probe``: the head alone on the frozen backbone). The input
goes through unchanged; the method trains nothing and saves nothing. No PEFT twin."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import PromptConfig, PromptMethod


@dataclass
class NoneConfig(PromptConfig):
    prompt_length: int = 0  # whatever --prompt-length says: no vectors

    def __post_init__(self):  # (the base check wants at least one vector)
        self.prompt_length = 0


class NonePrompt(PromptMethod):
    name = "none"
    config_class = NoneConfig

    def __init__(self, config: NoneConfig, hidden: int, num_layers: int):
        super().__init__(config, hidden, num_layers)
        self.embeddings.requires_grad_(False)  # (0, hidden): where the inputs' device is read from

    def insert(self, words: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
               index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return words, attention_mask

    def param_groups(self, lr: float) -> list[dict]:
        return []

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def similarity_tensors(cls, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return []
