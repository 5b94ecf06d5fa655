"""P-tuning v2's reparameterisation of per-layer vectors (PEFT's ``prefix_projection``), shared by
``deep`` and ``prefix``: the tables plus an MLP of the input vectors, trained end to end, saved
and exported as the resulting tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import XPromptError
from .base import PromptConfig, PromptMethod


@dataclass
class ProjectedConfig(PromptConfig):
    prefix_projection: bool = False


class LayerProjection(nn.Module):
    """vectors = free tables + MLP(input prompt vectors), the MLP hidden -> hidden -> ``tables`` x
    hidden with a tanh between, its last layer starting at zero (so training starts from the
    tables' initialisation, as ``ptuning``'s encoder does)."""

    def __init__(self, hidden: int, tables: int):
        super().__init__()
        self.tables = tables
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, tables * hidden))
        self.restart()

    def restart(self) -> None:
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def forward(self, seed: torch.Tensor) -> torch.Tensor:
        """(length, hidden) input vectors -> (tables, length, hidden) additions."""
        length, hidden = seed.shape
        return self.mlp(seed).view(length, self.tables, hidden).transpose(0, 1)


class ProjectedPrompt(PromptMethod):
    """Saving and resuming for a method whose per-layer tables may go through a ``LayerProjection``
    (``self.projection``): saved and exported as the resulting tables, loaded back as tables with
    the projection restarted at zero; checkpoints keep the raw tables and the projection."""

    config_class = ProjectedConfig
    projection: LayerProjection | None

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        super().load_tensors(tensors, where)
        if self.projection is not None:
            self.projection.restart()  # the loaded tables are the vectors

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.named_tensor_params().items()}
        if self.projection is not None:
            state.update({f"projection.{k}": v.detach().clone() for k, v in self.projection.state_dict().items()})
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        PromptMethod.load_tensors(self, tensors, where)
        if self.projection is not None:
            wanted = self.projection.state_dict()
            missing = [f"projection.{k}" for k in wanted if f"projection.{k}" not in tensors]
            if missing:
                raise XPromptError(f"{where}: {', '.join(missing)} missing; was it saved with --prefix-projection?")
            self.projection.load_state_dict({k: tensors[f"projection.{k}"] for k in wanted})
