"""``prefix``: P-tuning v2 / prefix tuning (Li & Liang 2021; Liu et al. 2022), PEFT ``PrefixTuning``'s
twin: trainable key and value vectors for the prompt positions in every layer's self-attention.
The prompt positions hold placeholders whose keys and values are overwritten right after the frozen
projections, so every input token attends to ``length`` free key/value pairs per layer.
Initialised from the keys and values the sampled input prompt produces (where ``deep`` starts).
Exported to PEFT as one row per virtual token, layer by layer, key then value (its
``past_key_values`` layout); an encoder-decoder's prefix has no twin (PEFT's T5 prefix differs)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import XPromptError
from .base import member_rows
from .projection import LayerProjection, ProjectedConfig, ProjectedPrompt


def kv_projections(layer: nn.Module, where: str) -> tuple[nn.Linear, nn.Linear]:
    """The self-attention's key and value projections of one transformer layer: BERT/XLM-R's
    ``key``/``value``, T5's ``k``/``v`` (the first attention in the layer: the self-attention)."""
    for module in layer.modules():
        for k, v in (("key", "value"), ("k", "v")):
            key, value = getattr(module, k, None), getattr(module, v, None)
            if isinstance(key, nn.Linear) and isinstance(value, nn.Linear):
                return key, value
    raise XPromptError(f"--method prefix needs separate key and value projections in every layer; {where} has none "
                       "(a fused qkv layer?): use --method deep")


class PrefixPrompt(ProjectedPrompt):
    name = "prefix"
    peft_type = "PREFIX_TUNING"
    peft_imports = ("PREFIX_TUNING",)

    def __init__(self, config: ProjectedConfig, hidden: int, num_layers: int):
        super().__init__(config, hidden, num_layers)
        self.embeddings.requires_grad_(False)  # placeholders: what they hold never reaches the input tokens
        self.keys = nn.Parameter(torch.zeros(num_layers, self.length, hidden))
        self.values = nn.Parameter(torch.zeros(num_layers, self.length, hidden))
        # with a projection, the placeholders (sampled word vectors, fixed) are what the MLP reads
        self.projection = LayerProjection(hidden, 2 * num_layers) if config.prefix_projection else None
        self._projections: list[tuple[nn.Linear, nn.Linear]] = []
        self._recorded: dict[tuple[int, int], torch.Tensor] = {}

    def attach(self, backbone) -> None:
        self._projections = [kv_projections(layer, backbone.name) for layer in backbone.layers()]

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, length, hidden) keys and values of the prompt positions."""
        if self.projection is None:
            return self.keys, self.values
        extra = self.projection(self.embeddings)  # every layer's keys, then every layer's values
        layers = self.keys.shape[0]
        return self.keys + extra[:layers], self.values + extra[layers:]

    def tables(self) -> dict[str, torch.Tensor]:
        keys, values = self.key_values()
        return {"input": self.vectors(), "keys": keys, "values": values}

    def install(self, layers: nn.ModuleList, tables: dict | None = None, index: torch.Tensor | None = None) -> list:
        handles = []
        # (members, layers, length, hidden) keys and values, once per forward pass
        pairs = [t.unsqueeze(0) for t in self.key_values()] if tables is None else [tables["keys"], tables["values"]]
        for layer, pair in enumerate(self._projections):
            for table, projection in zip(pairs, pair):
                handles.append(projection.register_forward_hook(self._hook(table[:, layer], index)))
        return handles

    def _hook(self, table: torch.Tensor, index: torch.Tensor | None):
        def overwrite(module, args, out):
            vectors = member_rows(table.to(out.device, out.dtype), index, out.shape[0])
            start, end = self.offset, self.offset + self.length
            return torch.cat([out[:, :start], vectors, out[:, end:]], dim=1)

        return overwrite

    def record(self, layers: nn.ModuleList) -> list:
        """Hooks that record every layer's keys and values at the prompt positions."""
        self._recorded = {}

        def capture(slot):
            def hook(module, args, out):
                self._recorded[slot] = out[0, self.offset : self.offset + self.length].detach().clone()

            return hook

        return [projection.register_forward_hook(capture((index, which)))
                for index, pair in enumerate(self._projections) for which, projection in enumerate(pair)]

    def init_layers(self) -> None:
        with torch.no_grad():
            for (index, which), vectors in self._recorded.items():
                (self.keys, self.values)[which][index].copy_(vectors)
        self._recorded = {}

    def param_groups(self, lr: float) -> list[dict]:
        extra = list(self.projection.parameters()) if self.projection is not None else []
        return [{"params": [self.keys, self.values, *extra], "lr": lr}]

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings, "keys": self.keys, "values": self.values}

    def tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            keys, values = self.key_values()
            return {**super().tensors(), "keys": keys.detach().contiguous(), "values": values.detach().contiguous()}

    @classmethod
    def similarity_tensors(cls, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [tensors["keys"], tensors["values"]]  # the placeholders are fixed: not what it trains

    @classmethod
    def to_peft(cls, tensors: dict[str, torch.Tensor], backbone_kind: str) -> tuple[dict, torch.Tensor]:
        if backbone_kind == "seq2seq":
            return None  # PEFT's prefix for T5 is another computation
        # (layers, tokens, hidden) keys and values -> (tokens, layers * 2 * hidden)
        vectors = torch.stack([tensors["keys"], tensors["values"]], dim=1).permute(2, 0, 1, 3).flatten(1)
        width = int(tensors["keys"].shape[2])
        return {"token_dim": width, "encoder_hidden_size": width, "prefix_projection": False}, vectors

    @classmethod
    def from_peft(cls, vectors: torch.Tensor, config: dict, hidden: int, where: str) -> dict[str, torch.Tensor]:
        # (tokens, layers * 2 * hidden) -> keys and values (layers, tokens, hidden). A PEFT prefix trained with
        # prefix_projection is saved, by PEFT too, as the MLP's resulting table: read like any other.
        layers = int(config.get("num_layers") or 0)
        if vectors.ndim != 2 or layers < 1 or vectors.shape[1] != layers * 2 * hidden:
            raise XPromptError(f"{where}: 'prompt_embeddings' has shape {tuple(vectors.shape)}; a prefix for this "
                               f"backbone needs (N, num_layers x 2 x {hidden}) (another base model?)")
        pairs = vectors.view(vectors.shape[0], layers, 2, hidden).permute(2, 1, 0, 3)
        return {"keys": pairs[0].contiguous(), "values": pairs[1].contiguous(),
                "prompt_embeddings": torch.zeros(vectors.shape[0], hidden)}
