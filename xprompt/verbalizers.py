"""Verbalizers: backbone output -> one score per label.

``SoftVerbalizer`` keeps one trainable vector per label in the backbone's hidden space and scores
a ``<mask>`` state by its negative squared distance to each (a nearest-centroid classifier). It is
initialised from the class-mean ``<mask>`` states of the training data, UniPrompt's "dynamic soft
label words", so before any training step it already predicts the nearest class mean.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import XPromptError


class SoftVerbalizer(nn.Module):
    def __init__(self, num_labels: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_labels, hidden))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) -> (batch, labels): -||h - w_c||^2 / 2 up to a per-row constant."""
        w = self.weight.to(states.dtype)
        return states @ w.T - 0.5 * (w * w).sum(-1)

    @torch.no_grad()
    def init_from_class_means(self, states: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Each label's vector from the mean state of its examples. A label without examples
        (a rare class held out for selection) starts at the mean of all states; returns those labels."""
        if len(states) == 0:
            raise XPromptError("no training examples to initialise the label vectors from")
        missing = []
        for c in range(self.weight.shape[0]):
            chosen = states[labels == c]
            if len(chosen) == 0:
                missing.append(c)
                chosen = states
            self.weight[c] = chosen.float().mean(0)
        return missing

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"verbalizer.weight": self.weight.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        value = tensors.get("verbalizer.weight")
        if value is None or tuple(value.shape) != tuple(self.weight.shape):
            got = None if value is None else tuple(value.shape)
            raise XPromptError(
                f"{where}: 'verbalizer.weight' has shape {got}, this task and backbone need "
                f"{tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(value)
