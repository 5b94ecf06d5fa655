"""``ptuning``: P-tuning's prompt encoder (Liu et al. 2021). The input vectors are ``seed +
encoder(seed)``, the encoder an MLP (``reparam="mlp"``) or a bidirectional LSTM followed by the MLP
(``"lstm"``), trained end to end; its last layer starts at zero, so training starts from the same
vectors as ``soft``. Saved as the resulting vectors (used and exported exactly like a soft
prompt); the encoder is kept in checkpoints only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import REPARAMS
from ..errors import XPromptError
from .base import PromptConfig
from .soft import SoftPrompt


@dataclass
class PTuningConfig(PromptConfig):
    reparam: str = "mlp"

    def __post_init__(self):
        super().__post_init__()
        if self.reparam not in REPARAMS:
            raise XPromptError(f"unknown --reparam '{self.reparam}'; known: {', '.join(REPARAMS)}")


class PTuningPrompt(SoftPrompt):
    name = "ptuning"
    config_class = PTuningConfig

    def __init__(self, config: PTuningConfig, hidden: int, num_layers: int):
        super().__init__(config, hidden, num_layers)
        self.reparam = config.reparam
        self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True) \
            if config.reparam == "lstm" else None
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def vectors(self) -> torch.Tensor:
        seed = self.embeddings
        x = self.lstm(seed.unsqueeze(0))[0][0] if self.lstm is not None else seed
        return seed + self.mlp(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.vectors().detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load saved vectors: they become the seed and the encoder's last layer restarts at zero,
        so ``vectors()`` returns them exactly."""
        super().load_tensors(tensors, where)
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"encoder.{k}": v.detach().clone() for k, v in self.named_parameters() if k != "embeddings"}
        return {"prompt_seed": self.embeddings.detach().clone(), **state}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        params = dict(self.named_parameters())
        missing = [k for k in ("prompt_seed", *(f"encoder.{n}" for n in params if n != "embeddings")) if k not in tensors]
        if missing:
            raise XPromptError(f"{where}: {', '.join(missing)} missing; was it saved by --method ptuning --reparam {self.reparam}?")
        with torch.no_grad():
            self.embeddings.copy_(tensors["prompt_seed"])
            for name, param in params.items():
                if name != "embeddings":
                    param.copy_(tensors[f"encoder.{name}"])
