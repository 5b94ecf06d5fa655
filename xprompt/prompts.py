"""Prompts: the trainable vectors. Each method is a small module behind one interface.

- ``soft``: ``length`` vectors inserted after ``<s>`` at the input (Lester et al. 2021).
- ``deep``: the same input vectors plus ``length`` vectors for every further layer that overwrite
  the prompt positions before that layer runs (P-tuning v2's deep prompts).

Interface: ``prompt.embeddings`` (length x hidden) goes into the input; ``prompt.install(layers)``
registers whatever the method does inside the backbone; ``prompt.tensors()`` / ``load_tensors``
give the safetensors state. The model never branches on the method.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from .errors import XPromptError

PROMPT_OFFSET = 1  # prompt vectors sit right after <s>


class Method(str, Enum):
    SOFT = "soft"
    DEEP = "deep"


def vocab_init(embeddings: torch.Tensor, length: int, generator: torch.Generator, top: int = 5000) -> torch.Tensor:
    """Rows of the word-embedding matrix sampled from the first ``top`` pieces (frequent words),
    skipping the special tokens at the start of the vocabulary."""
    low = 5 if embeddings.shape[0] > top + 5 else 0
    high = min(embeddings.shape[0], low + top)
    rows = torch.randint(low, high, (length,), generator=generator)
    return embeddings[rows].detach().clone().float()


class SoftPrompt(nn.Module):
    method = Method.SOFT

    def __init__(self, length: int, hidden: int, num_layers: int):
        super().__init__()
        if length < 1:
            raise XPromptError(f"--prompt-length must be at least 1 (got {length})")
        self.length = length
        self.embeddings = nn.Parameter(torch.zeros(length, hidden))

    def install(self, layers: nn.ModuleList) -> list:
        return []

    def layer_init_needed(self) -> bool:
        return False

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for name, param in self.named_tensor_params().items():
            if name not in tensors:
                raise XPromptError(f"{where}: tensor '{name}' is missing; was it saved by --method {self.method.value}?")
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise XPromptError(
                    f"{where}: '{name}' has shape {tuple(tensors[name].shape)}, this model needs "
                    f"{tuple(param.shape)} (another backbone or --prompt-length?)"
                )
            with torch.no_grad():
                param.copy_(tensors[name])

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings}


class DeepPrompt(SoftPrompt):
    """Input prompt plus one set of vectors per further layer, written over the prompt positions
    before that layer; initialised (``init_layers``) from the states the input prompt produces, so
    training starts exactly where the input-level prompt would."""

    method = Method.DEEP

    def __init__(self, length: int, hidden: int, num_layers: int):
        super().__init__(length, hidden, num_layers)
        self.layer_prompts = nn.Parameter(torch.zeros(num_layers - 1, length, hidden))

    def install(self, layers: nn.ModuleList) -> list:
        handles = []
        for index, layer in enumerate(layers):
            if index == 0:
                continue
            handles.append(layer.register_forward_pre_hook(self._hook(index - 1), with_kwargs=True))
        return handles

    def _hook(self, slot: int):
        def overwrite(module, args, kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            vectors = self.layer_prompts[slot].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            start, end = PROMPT_OFFSET, PROMPT_OFFSET + self.length
            hidden = torch.cat([hidden[:, :start], vectors, hidden[:, end:]], dim=1)
            return (hidden, *rest), kwargs

        return overwrite

    def layer_init_needed(self) -> bool:
        return True

    def init_layers(self, states: list[torch.Tensor]) -> None:
        """``states[l]`` is the (length x hidden) input of layer l+1 at the prompt positions."""
        with torch.no_grad():
            self.layer_prompts.copy_(torch.stack(states))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "layer_prompts": self.layer_prompts.detach().contiguous()}

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings, "layer_prompts": self.layer_prompts}


PROMPTS: dict[Method, type[SoftPrompt]] = {Method.SOFT: SoftPrompt, Method.DEEP: DeepPrompt}


def build_prompt(method: Method | str, length: int, hidden: int, num_layers: int) -> SoftPrompt:
    try:
        cls = PROMPTS[Method(method)]
    except ValueError:
        known = ", ".join(m.value for m in Method)
        raise XPromptError(f"unknown method '{method}'; known: {known}") from None
    return cls(length, hidden, num_layers)
