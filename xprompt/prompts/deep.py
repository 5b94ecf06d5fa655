"""``deep``: the input prompt plus one set of vectors per further layer, written over the prompt
positions before that layer runs (deep prompts as hidden states). Initialised from the states the
input prompt produces for a bare ``<s> prompt </s>`` (in context the later layers' prompt states
differ a little, so training starts close to where the input-level prompt would). With
``prefix_projection`` the per-layer vectors are P-tuning v2's reparameterisation. No PEFT twin."""

from __future__ import annotations

import torch
from torch import nn

from .base import member_rows
from .projection import LayerProjection, ProjectedConfig, ProjectedPrompt


class DeepPrompt(ProjectedPrompt):
    name = "deep"

    def __init__(self, config: ProjectedConfig, hidden: int, num_layers: int):
        super().__init__(config, hidden, num_layers)
        self.layer_prompts = nn.Parameter(torch.zeros(num_layers - 1, self.length, hidden))
        self.projection = LayerProjection(hidden, num_layers - 1) if config.prefix_projection else None
        self._recorded: list[torch.Tensor] = []

    def layer_vectors(self) -> torch.Tensor:
        """(layers - 1, length, hidden): what goes over the prompt positions before layers 1..L-1."""
        if self.projection is None:
            return self.layer_prompts
        return self.layer_prompts + self.projection(self.embeddings)

    def tables(self) -> dict[str, torch.Tensor]:
        return {"input": self.vectors(), "layers": self.layer_vectors()}

    def _layer_tables(self, tables: dict | None) -> torch.Tensor:
        """(members, layers - 1, length, hidden): this prompt's (one member) or the stacked ones."""
        return self.layer_vectors().unsqueeze(0) if tables is None else tables["layers"]

    def install(self, layers: nn.ModuleList, tables: dict | None = None, index: torch.Tensor | None = None) -> list:
        per_layer = self._layer_tables(tables)  # once per forward pass
        return [layer.register_forward_pre_hook(self._hook(per_layer[:, i - 1], index), with_kwargs=True)
                for i, layer in enumerate(layers) if i > 0]

    def install_key_values(self, embeddings: nn.Module, layers: list[nn.Module], attentions: list[nn.Module],
                           tables: dict | None = None, index: torch.Tensor | None = None) -> list:
        """Hooks for one forward pass that give the same final states at the input's own positions
        as ``install``, without computing the prompt positions' rows: the embeddings' output loses
        the prompt rows (kept as layer 0's prompt states: the same for every row of the batch, as
        the frozen backbone runs without dropout), and each layer's self-attention gets its prompt
        states' keys and values as a prefix (``attention.with_prefix``), set by a pre-hook on the
        layer (so that a fused layer forward, ``fused``, sees it too). The caller passes the
        input's own attention mask and removes the ``attention.PREFIX`` attributes afterwards.
        With several prompts' ``tables`` (``index``: each row's member) every row gets its own
        member's prefix, (batch, heads, length, dim), each member's keys and values projected once."""
        from ..attention import PREFIX

        per_layer = self._layer_tables(tables)
        start, end = self.offset, self.offset + self.length
        first: list[torch.Tensor] = []

        def strip(module, args, output):
            if index is None:
                first.append(output[:1, start:end])
            else:  # each member's prompt states from its first row (the same in all its rows)
                rows = torch.arange(len(index), device=index.device)
                members = per_layer.shape[0]
                firsts = rows.new_full((members,), len(index)).scatter_reduce_(0, index, rows, "amin")
                first.append(output[firsts, start:end])
            return torch.cat([output[:, :start], output[:, end:]], dim=1)

        def prefix(i: int):
            module = attentions[i]

            def hook(layer, args, kwargs):
                states = first[0] if i == 0 else per_layer[:, i - 1]  # (members, length, hidden)
                states = states.to(module.key.weight.device, module.key.weight.dtype)  # bf16 weights on a GPU
                members = states.shape[0]
                pair = [proj(states).view(members, self.length, -1, module.attention_head_size).transpose(1, 2)
                        for proj in (module.key, module.value)]
                if index is not None:
                    pair = [p[index] for p in pair]
                setattr(module, PREFIX, (*pair, start))
            return hook

        return [embeddings.register_forward_hook(strip),
                *(layer.register_forward_pre_hook(prefix(i), with_kwargs=True) for i, layer in enumerate(layers))]

    def _hook(self, table: torch.Tensor, index: torch.Tensor | None):
        def overwrite(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            vectors = member_rows(table.to(hidden.device, hidden.dtype), index, hidden.shape[0])
            start, end = self.offset, self.offset + self.length
            hidden = torch.cat([hidden[:, :start], vectors, hidden[:, end:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return overwrite

    def record(self, layers: nn.ModuleList) -> list:
        """Hooks that record the inputs of layers 1..L-1 at the prompt positions."""
        self._recorded = []

        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._recorded.append(hidden[0, self.offset : self.offset + self.length].detach().clone())

        return [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in list(layers)[1:]]

    def init_layers(self) -> None:
        with torch.no_grad():
            self.layer_prompts.copy_(torch.stack(self._recorded))
        self._recorded = []

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings, "layer_prompts": self.layer_prompts}

    def tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {**super().tensors(), "layer_prompts": self.layer_vectors().detach().contiguous()}

    @classmethod
    def similarity_tensors(cls, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [tensors["prompt_embeddings"], tensors["layer_prompts"]]
