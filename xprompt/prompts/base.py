"""The interface every prompt method implements, and the input-level insertion they share.

A method is a ``PromptMethod`` subclass with a config dataclass (``PromptConfig`` or a subclass
adding the method's own options, named as ``TrainConfig``'s fields). The model calls only this
interface, and so do saving, resuming, similarity and the PEFT interop: nothing else branches on
the method.

- ``vectors()`` (length x hidden) go into the input at ``offset``; ``embeddings`` is what
  initialisation writes; ``insert`` / ``joined_mask`` put them into a batch;
- ``attach(backbone)`` takes what the method needs from the backbone; ``install(layers)`` registers
  whatever it does inside the layers for one forward pass; ``record`` / ``init_layers`` start
  per-layer vectors from what the input vectors produce;
- ``tables()`` are what one forward pass reads from the prompt, by name; ``insert`` and ``install``
  also take several prompts' tables stacked (members, ...) with each row's member (``index``): one
  batch whose rows use different prompts of one ``shape_key()`` (``xprompt.mixed``);
- ``tensors()`` / ``load_tensors`` are the saved (exported) state, ``state_tensors()`` /
  ``load_state_tensors`` everything a resumed run needs;
- ``similarity_tensors(saved)`` are the tensors the method trains, for prompt similarity;
- ``peft_type`` / ``to_peft`` / ``from_peft`` its PEFT twin (None: it has none);
- ``card_fields()`` what its prompt card records to rebuild it;
- ``mask_index``: where a prompt that holds the ``<mask>`` itself has it (else the input's is read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import POSITIONS
from ..errors import XPromptError


@dataclass
class PromptConfig:
    """Options every method takes (named as ``TrainConfig``'s fields)."""

    prompt_length: int = 8
    prompt_position: str = "after-bos"

    def __post_init__(self):
        if self.prompt_length < 1:
            raise XPromptError(f"--prompt-length must be at least 1 (got {self.prompt_length})")
        if self.prompt_position not in POSITIONS:
            raise XPromptError(f"unknown --prompt-position '{self.prompt_position}'; known: {', '.join(POSITIONS)}")


def member_rows(table: torch.Tensor, index: torch.Tensor | None, batch: int) -> torch.Tensor:
    """A (members, ...) table as (batch, ...) rows: row r takes member ``index[r]``'s; without an
    index the one member's table (a leading 1) is expanded over the batch, as a single prompt is."""
    return table.expand(batch, *table.shape[1:]) if index is None else table[index]


def widen_mask(mask, size: int, length: int, at: int = 1):
    """A layer's attention mask for ``size`` input positions, widened by ``length`` prompt positions
    inserted at ``at`` (after ``<s>``; 0 for inputs without it) that every position sees; the
    prompt's own rows (if the mask has rows) see what the first position sees. A mask of another
    width (already widened) or None is returned as it is."""
    if mask is None or mask.shape[-1] != size:
        return mask
    visible = torch.ones_like(mask[..., :1]) if mask.dtype == torch.bool else torch.zeros_like(mask[..., :1])
    mask = torch.cat([mask[..., :at], visible.expand(*mask.shape[:-1], length), mask[..., at:]], dim=-1)
    if mask.shape[-2] == size:
        mask = torch.cat([mask[..., :at, :], mask[..., :1, :].expand(*mask.shape[:-2], length, -1),
                          mask[..., at:, :]], dim=-2)
    return mask


class PromptMethod(nn.Module):
    """The input-level soft prompt (Lester et al. 2021) and the interface of every method."""

    name = "soft"
    config_class = PromptConfig
    peft_type: str | None = None  # the PEFT adapter type it is exported as
    peft_imports: tuple[str, ...] = ()  # PEFT adapter types it starts from
    mask_index: int | None = None  # a <mask> the prompt holds itself: its index in the final states (the readout's)

    def __init__(self, config: PromptConfig, hidden: int, num_layers: int):
        super().__init__()
        self.config = config
        self.length = config.prompt_length
        self.position = config.prompt_position
        self.offset = POSITIONS[self.position]  # index of the first prompt vector in the sequence
        self.embeddings = nn.Parameter(torch.zeros(self.length, hidden))

    # -- in the forward pass
    def vectors(self) -> torch.Tensor:
        """The (length x hidden) vectors that go into the input at ``offset``."""
        return self.embeddings

    def tables(self) -> dict[str, torch.Tensor]:
        """What one forward pass reads from the prompt, by name (computed once per pass): here the
        input vectors; methods acting inside the layers add theirs."""
        return {"input": self.vectors()}

    def shape_key(self) -> tuple:
        """Prompts of one key run in one batch (their ``tables`` stacked, one member per row)."""
        return (type(self), self.length, self.offset)

    def insert(self, words: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
               index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with the prompt vectors inserted at ``offset``, and the widened mask;
        ``tables``/``index``: several prompts' stacked tables and each row's member."""
        batch = words.shape[0]
        vectors = self.vectors().unsqueeze(0) if tables is None else tables["input"]
        prompt = member_rows(vectors.to(words.device, words.dtype), index, batch)
        at = self.offset
        ones = attention_mask.new_ones(batch, self.length)
        return (torch.cat([words[:, :at], prompt, words[:, at:]], dim=1),
                torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1))

    def joined_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of the final hidden states, given the mask of the input (with an
        input-level prompt, already the same)."""
        return attention_mask

    def attach(self, backbone) -> None:
        """Take what the method needs from the backbone (nothing for input-level prompts)."""

    def install(self, layers: nn.ModuleList, tables: dict | None = None, index: torch.Tensor | None = None) -> list:
        """Hooks for one forward pass (removed by the caller), reading this prompt's tables or
        several prompts' stacked ones (``insert``); none for input-level prompts."""
        return []

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    # -- initialisation of per-layer vectors
    def record(self, layers: nn.ModuleList) -> list:
        """Hooks that record what the input-level vectors produce inside the backbone, for
        ``init_layers`` (methods with per-layer vectors); none for input-level prompts."""
        return []

    def init_layers(self) -> None:
        """Start the per-layer vectors from what ``record``'s hooks saw."""

    # -- saving, loading, resuming
    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        """The saved tensors by name, as the parameters that hold them."""
        return {"prompt_embeddings": self.embeddings}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved (exported) tensors."""
        return {"prompt_embeddings": self.embeddings.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for name, param in self.named_tensor_params().items():
            if name not in tensors:
                raise XPromptError(f"{where}: tensor '{name}' is missing; was it saved by --method {self.name}?")
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise XPromptError(
                    f"{where}: '{name}' has shape {tuple(tensors[name].shape)}, this model needs "
                    f"{tuple(param.shape)} (another backbone or --prompt-length?)"
                )
            with torch.no_grad():
                param.copy_(tensors[name])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything training needs to resume (by default the saved tensors)."""
        return self.tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.load_tensors(tensors, where)

    def card_fields(self) -> dict:
        """What the prompt card records to rebuild this prompt (its config)."""
        return asdict(self.config)

    # -- what other parts read from a saved prompt (class methods: no model needed)
    @classmethod
    def similarity_tensors(cls, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the method trains, as saved: what prompt similarity compares."""
        return [tensors["prompt_embeddings"]]

    @classmethod
    def to_peft(cls, tensors: dict[str, torch.Tensor], backbone_kind: str) -> tuple[dict, torch.Tensor] | None:
        """PEFT's config fields and ``prompt_embeddings`` for the saved tensors of a prompt on a
        backbone of ``backbone_kind``; None: no twin."""
        return None

    @classmethod
    def from_peft(cls, vectors: torch.Tensor, config: dict, hidden: int, where: str) -> dict[str, torch.Tensor]:
        """This method's tensors from a PEFT adapter's ``prompt_embeddings``."""
        raise XPromptError(f"{where}: a PEFT adapter cannot start --method {cls.name}")
