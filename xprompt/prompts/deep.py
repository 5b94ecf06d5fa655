"""``deep``: the input prompt plus one set of vectors per further layer, written over the prompt
positions before that layer runs (deep prompts as hidden states). Initialised from the states the
input prompt produces for a bare ``<s> prompt </s>`` (in context the later layers' prompt states
differ a little, so training starts close to where the input-level prompt would). With
``prefix_projection`` the per-layer vectors are P-tuning v2's reparameterisation. No PEFT twin."""

from __future__ import annotations

import torch
from torch import nn

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

    def install(self, layers: nn.ModuleList) -> list:
        tables = self.layer_vectors()  # once per forward pass
        return [layer.register_forward_pre_hook(self._hook(tables[index - 1]), with_kwargs=True)
                for index, layer in enumerate(layers) if index > 0]

    def install_key_values(self, embeddings: nn.Module, layers: list[nn.Module], attentions: list[nn.Module]) -> list:
        """Hooks for one forward pass that give the same final states at the input's own positions
        as ``install``, without computing the prompt positions' rows: the embeddings' output loses
        the prompt rows (kept as layer 0's prompt states: the same for every row of the batch, as
        the frozen backbone runs without dropout), and each layer's self-attention gets its prompt
        states' keys and values as a prefix (``attention.with_prefix``), set by a pre-hook on the
        layer (so that a fused layer forward, ``fused``, sees it too). The caller passes the
        input's own attention mask and removes the ``attention.PREFIX`` attributes afterwards."""
        from ..attention import PREFIX

        tables = self.layer_vectors()
        start, end = self.offset, self.offset + self.length
        first: list[torch.Tensor] = []

        def strip(module, args, output):
            first.append(output[0, start:end])
            return torch.cat([output[:, :start], output[:, end:]], dim=1)

        def prefix(index: int):
            module = attentions[index]

            def hook(layer, args, kwargs):
                states = first[0] if index == 0 else tables[index - 1]
                states = states.to(module.key.weight.device, module.key.weight.dtype)  # bf16 weights on a GPU
                pair = [proj(states).view(self.length, -1, module.attention_head_size).transpose(0, 1).unsqueeze(0)
                        for proj in (module.key, module.value)]
                setattr(module, PREFIX, (*pair, start))
            return hook

        return [embeddings.register_forward_hook(strip),
                *(layer.register_forward_pre_hook(prefix(i), with_kwargs=True) for i, layer in enumerate(layers))]

    def _hook(self, table: torch.Tensor):
        def overwrite(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            vectors = table.to(hidden.device, hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
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
