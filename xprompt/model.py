"""PromptModel: frozen backbone + prompt + verbalizer; ``forward(batch) -> logits``.

The prompt's vectors go in after ``<s>`` through ``inputs_embeds``; the state read out is the
final hidden state at ``<mask>`` (``readout="mask"``) or the mean over the input's tokens
(``readout="mean"``, the e5 sentence-embedding convention). It never branches on the method.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import Backbone
from .data import sequence_ends
from .prompts import SoftPrompt
from .verbalizers import SoftVerbalizer

READOUTS = ("mask", "mean", "both")


class PromptModel(nn.Module):
    def __init__(self, backbone: Backbone, prompt: SoftPrompt, verbalizer: SoftVerbalizer, readout: str = "mask"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.backbone = backbone.model
        self.embed = backbone.input_embeddings()
        self.prompt = prompt
        self.verbalizer = verbalizer
        self.readout = readout
        self._layers = backbone.layers()
        self._skip = 0 if sequence_ends(backbone.tokenizer)[0] is None else 1  # <s> ((m)T5 inputs have none)
        self._sharded = backbone.sharded
        self._input_device = backbone.input_device()
        self._output_device = backbone.output_device()

    def place(self, device) -> "PromptModel":
        """Move to ``device``; with a sharded backbone (device_map) only the prompt moves, to the
        input embeddings' device, and the verbalizer to the last layer's."""
        if self._sharded:
            self.prompt.to(self._input_device)
            self.verbalizer.to(self._output_device)
            return self
        return self.to(device)

    def train(self, mode: bool = True) -> "PromptModel":
        """Only the prompt and verbalizer switch modes: the frozen backbone stays in eval mode
        (no dropout), so training sees the same function that evaluation will."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups(1.0) for p in group["params"]]

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the prompt's (a method may give a part its own rate) and the label vectors'."""
        groups = [*self.prompt.param_groups(lr),
                  {"params": [p for p in self.verbalizer.parameters() if p.requires_grad], "lr": lr}]
        return [g for g in groups if g["params"]]

    def _with_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with whatever the prompt puts into the input, and the matching mask."""
        return self.prompt.insert(self.embed(input_ids), attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states with the prompt inserted: (batch, prompt + tokens, hidden)."""
        return self.sequence(input_ids, attention_mask)[0]

    def sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states with the prompt inserted and the matching attention mask."""
        inputs, mask = self._with_prompt(input_ids, attention_mask)
        # The method's hooks live only for this call, so models sharing a backbone never interfere.
        handles = self.prompt.install(self._layers)
        try:
            return self.backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state, self.prompt.joined_mask(mask)
        finally:
            for handle in handles:
                handle.remove()

    def states(self, batch: dict) -> torch.Tensor:
        """The (batch, hidden) states that the verbalizer scores."""
        hidden = self.encode(batch["input_ids"], batch["attention_mask"])
        parts = []
        if self.readout in ("mask", "both"):
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            parts.append(hidden[rows, batch["mask_pos"] + self.prompt.length])
        if self.readout in ("mean", "both"):
            # the input's own tokens after <s>, if any (the prompt sits before them, before or after <s>)
            tokens = hidden[:, self._skip + self.prompt.length :]
            mask = batch["attention_mask"][:, self._skip :].unsqueeze(-1).to(tokens.dtype)
            parts.append((tokens * mask).sum(1) / mask.sum(1))
        return parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])

    def forward(self, batch: dict) -> torch.Tensor:
        if getattr(self.verbalizer, "reads_sequence", False):  # a decoder scores the label strings
            return self.verbalizer(*self.sequence(batch["input_ids"], batch["attention_mask"]))
        return self.verbalizer(self.states(batch))

    @torch.no_grad()
    def init_layer_prompts(self, bos_id: int | None, eos_id: int) -> None:
        """Start a method's per-layer vectors from what its input-level vectors produce for a bare
        ``<s> prompt </s>`` input (no method hooks): the prompt records, then copies."""
        handles = self.prompt.record(self._layers)
        if not handles:
            return
        ids = [eos_id] if bos_id is None else [bos_id, eos_id]
        tok = torch.tensor([ids], device=self.prompt.embeddings.device)
        inputs, mask = self._with_prompt(tok, torch.ones_like(tok))
        try:
            self.backbone(inputs_embeds=inputs, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        self.prompt.init_layers()
