"""``unified``: UniPrompt's two towers (Huang et al. 2022), with the backbone frozen. The prompt
vectors run through a *prompt tower*: copies of the backbone's lower ``tower_layers`` layers,
trained (without dropout). The input runs through the frozen backbone's own lower layers (the
*context tower*) without any prompt. Before the first upper layer the prompt tower's states are inserted at the
prompt's place, and the frozen upper layers read both. The prompt tower never sees the input, so
its states are computed once per forward pass in training and, at inference, once per run and
reused (the cache is keyed by the parameters' versions, so a changed prompt is never read stale).
BERT/XLM-R style layers (``layer(hidden, attention_mask)``) and T5/mT5 ones (with the relative
position bias passed on; the prompt joins with zero bias). No PEFT twin."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import XPromptError
from .base import PromptConfig, PromptMethod, member_rows, widen_mask


@dataclass
class UnifiedConfig(PromptConfig):
    tower_layers: int | None = None  # default: half the backbone's layers


class UnifiedPrompt(PromptMethod):
    name = "unified"
    config_class = UnifiedConfig
    TOWER_LR_SCALE = 3e-3  # the tower is whole transformer layers: a fine-tuning rate (3e-2 -> 1e-4)

    def __init__(self, config: UnifiedConfig, hidden: int, num_layers: int):
        super().__init__(config, hidden, num_layers)
        if num_layers < 2:
            raise XPromptError("--method unified needs a backbone of at least 2 layers")
        self.split = config.tower_layers or num_layers // 2
        if not 1 <= self.split < num_layers:
            raise XPromptError(f"--tower-layers must be between 1 and {num_layers - 1}, got {self.split}")
        self.tower = nn.ModuleList()
        self._ends: tuple = ()  # (embeddings module, word embeddings, bos, eos, relative): the backbone's
        self.cache_enabled = True
        self._cache: tuple | None = None

    def attach(self, backbone) -> None:
        from ..data import sequence_ends

        layers = backbone.layers()
        if len(self.tower) == 0:  # the tower starts as copies of the lower layers (then trained)
            self.tower = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.split))
            self.tower.float()  # trained: fp32 weights even where the frozen backbone holds bf16 (GPU)
            self.tower.requires_grad_(True)
            self.tower.to(next(layers.parameters()).device)
        bos, eos = sequence_ends(backbone.tokenizer)
        # BERT/XLM-R: an embeddings module (positions + LayerNorm) and layer(hidden, mask).
        # T5/mT5 (seq2seq): bare word vectors, no <s>, and layer(hidden, mask, position_bias) with the
        # relative position bias computed by the first layer and passed on.
        embeddings = getattr(backbone.model, "embeddings", None)
        relative = backbone.kind == "seq2seq"
        if eos is None or (embeddings is None and not relative):
            raise XPromptError(f"--method unified supports BERT/XLM-R and T5/mT5 style models; '{backbone.name}' is neither")
        self._ends = (embeddings, backbone.input_embeddings(), bos, eos, relative)

    def insert(self, words: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
               index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return words, attention_mask  # the context tower reads the input alone

    def tables(self) -> dict[str, torch.Tensor]:
        return {"tower": self.tower_states()}  # cached at inference, as in one prompt's pass

    def shape_key(self) -> tuple:
        return (*super().shape_key(), self.split)

    def joined_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask of the final states: the prompt positions joined at ``offset`` (after ``<s>``)."""
        ones = attention_mask.new_ones(attention_mask.shape[0], self.length)
        at = self.offset
        return torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1)

    def tower_states(self) -> torch.Tensor:
        """(length x hidden): the prompt tower's output at the prompt positions for ``<s> prompt </s>``
        (``prompt </s>`` for models without ``<s>``)."""
        embeddings, words, bos, eos, relative = self._ends
        # (the backbone's embeddings count too: a run that tunes its backbone trains them)
        read = [*self.parameters(), *(embeddings.parameters() if embeddings is not None else ()), words.weight]
        key = (tuple(p._version for p in read), torch.is_autocast_enabled("cpu"),
               torch.is_autocast_enabled("cuda"), self.embeddings.device)
        if self.cache_enabled and not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        ids = [eos] if bos is None else [bos, eos]
        ends = words(torch.tensor(ids, device=self.embeddings.device))
        start = min(self.offset, len(ids) - 1)
        x = torch.cat([ends[:start], self.embeddings.to(ends.dtype), ends[start:]]).unsqueeze(0)
        hidden = embeddings(inputs_embeds=x) if embeddings is not None else x
        bias = None
        for layer in self.tower:
            out = layer(hidden, None, bias) if relative else layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
            if relative:
                bias = out[1]
        states = hidden[0, start : start + self.length]
        if self.cache_enabled and not torch.is_grad_enabled():
            self._cache = (key, states)
        return states

    def install(self, layers: nn.ModuleList, tables: dict | None = None, index: torch.Tensor | None = None) -> list:
        states = self.tower_states().unsqueeze(0) if tables is None else tables["tower"]  # (members, length, hidden)
        length, at = self.length, self.offset

        def widen(mask, size):
            return widen_mask(mask, size, length, at)

        def hook(first: bool):
            def fuse(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                size = hidden.shape[1] if first else hidden.shape[1] - length
                if first:
                    prompt = member_rows(states.to(hidden.device, hidden.dtype), index, hidden.shape[0])
                    hidden = torch.cat([hidden[:, :at], prompt, hidden[:, at:]], dim=1)
                # the attention mask and (T5) the relative position bias, (.., query, key) both:
                # widened at the join; later layers get the layer's own widened bias back already
                if args:
                    args = (hidden, *(widen(a, size) if torch.is_tensor(a) else a for a in args[1:3]), *args[3:])
                else:
                    kwargs["hidden_states"] = hidden
                for name in ("attention_mask", "position_bias"):
                    if torch.is_tensor(kwargs.get(name)):
                        kwargs[name] = widen(kwargs[name], size)
                return args, kwargs

            return fuse

        return [layers[i].register_forward_pre_hook(hook(i == self.split), with_kwargs=True)
                for i in range(self.split, len(layers))]

    def train(self, mode: bool = True) -> "UnifiedPrompt":
        """The tower's layers run without dropout, as the frozen backbone does: training sees the
        function evaluation will, and a step draws no random numbers (a resumed run is bit-identical)."""
        super().train(mode)
        self.tower.eval()
        return self

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.embeddings], "lr": lr},
                {"params": list(self.tower.parameters()), "lr": lr * self.TOWER_LR_SCALE}]

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings,
                **{f"tower.{k}": v for k, v in self.tower.state_dict(keep_vars=True).items()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        tower = {f"tower.{k}": v.detach().contiguous() for k, v in self.tower.state_dict().items()}
        return {"prompt_embeddings": self.embeddings.detach().contiguous(), **tower}

    def card_fields(self) -> dict:
        return {**super().card_fields(), "tower_layers": self.split}  # the depth it resolved to

    @classmethod
    def similarity_tensors(cls, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # the input vectors and the tower: both are trained
        return [tensors["prompt_embeddings"], *(tensors[k] for k in sorted(tensors) if k.startswith("tower."))]
