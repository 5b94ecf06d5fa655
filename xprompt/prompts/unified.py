"""``unified``: UniPrompt's two towers (Huang et al. 2022), with the backbone frozen. The prompt
vectors run through a *prompt tower*: copies of the backbone's lower ``tower_layers`` layers,
trained (without dropout). The input runs through the frozen backbone's own lower layers (the
*context tower*) without any prompt. Before the first upper layer the prompt tower's states are inserted at the
prompt's place, and the frozen upper layers read both. The prompt tower never sees the input, so
its states are computed once per forward pass in training and, at inference, once per run and
reused (the cache is keyed by the parameters' versions, so a changed prompt is never read stale).
BERT/XLM-R style layers (``layer(hidden, attention_mask)``) and T5/mT5 ones (with the relative
position bias passed on; the prompt joins with zero bias). No PEFT twin.

With ``prompt_text`` (``--prompt-text "It's <mask>."``) the prompt is *model-based*, as the authors'
code has it: the tower reads that text's real tokens, ``[<s>] + tokens + [</s>]``, embedded by the
backbone's own embedding module (frozen here: the tower's layers and the label vectors train), and
every tower position joins, first: ``[<s> It's <mask> . </s> ; <s> text </s>]`` before the first
upper layer. A ``<mask>`` in the text is where the readout looks (``mask_index``)."""

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
    prompt_text: str = ""  # a model-based prompt: its tokens through the tower (empty: free vectors)


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
        self.text, self.prompt_ids = config.prompt_text, None  # the text's ids: set by ``attach``
        if self.text:  # no free vectors; the prompt leads the joint sequence
            self.embeddings = nn.Parameter(torch.zeros(0, hidden), requires_grad=False)
            self.position, self.offset = "first", 0

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
        if self.text:
            self.prompt_ids, self.mask_index = text_ids(self.text, backbone.tokenizer, bos, eos)
            self.length = len(self.prompt_ids)

    def insert(self, words: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
               index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return words, attention_mask  # the context tower reads the input alone

    def tables(self) -> dict[str, torch.Tensor]:
        return {"tower": self.tower_states()}  # cached at inference, as in one prompt's pass

    def shape_key(self) -> tuple:
        return (*super().shape_key(), self.split, self.mask_index)

    def joined_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask of the final states: the prompt positions joined at ``offset`` (after ``<s>``)."""
        ones = attention_mask.new_ones(attention_mask.shape[0], self.length)
        at = self.offset
        return torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1)

    def tower_states(self) -> torch.Tensor:
        """(length x hidden): the prompt tower's output at the prompt positions for ``<s> prompt </s>``
        (``prompt </s>`` for models without ``<s>``); with ``prompt_text``, at every position of
        ``<s> text </s>``. Cached at inference, keyed by the versions of the tower's and the
        embedding module's parameters."""
        embeddings, words, bos, eos, relative = self._ends
        # (the backbone's embeddings count too: a run that tunes its backbone trains them)
        read = (*self.parameters(), *words.parameters(), *(embeddings.parameters() if embeddings is not None else ()))
        key = (tuple(p._version for p in read), torch.is_autocast_enabled("cpu"),
               torch.is_autocast_enabled("cuda"), self.embeddings.device)
        if self.cache_enabled and not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if self.prompt_ids is not None:  # the text's own tokens, every position kept
            x, start = words(torch.tensor(self.prompt_ids, device=self.embeddings.device)), 0
        else:
            ids = [eos] if bos is None else [bos, eos]
            ends = words(torch.tensor(ids, device=self.embeddings.device))
            start = min(self.offset, len(ids) - 1)
            x = torch.cat([ends[:start], self.embeddings.to(ends.dtype), ends[start:]])
        x = x.unsqueeze(0)
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
        # "layers": copies of backbone layers; a run that fine-tunes its backbone trains them at the backbone's rate
        tower = {"params": list(self.tower.parameters()), "lr": lr * self.TOWER_LR_SCALE, "layers": True}
        return [tower] if self.text else [{"params": [self.embeddings], "lr": lr}, tower]

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        vectors = {} if self.text else {"prompt_embeddings": self.embeddings}  # a text prompt has no free vectors
        return {**vectors, **{f"tower.{k}": v for k, v in self.tower.state_dict(keep_vars=True).items()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.named_tensor_params().items()}

    def card_fields(self) -> dict:
        fields = {**super().card_fields(), "tower_layers": self.split}  # the depth it resolved to
        if not self.text:
            del fields["prompt_text"]
            return fields
        return {**fields, "prompt_length": self.length, "prompt_position": "first"}  # its tokens' positions

    @classmethod
    def similarity_tensors(cls, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # the input vectors (none for a text prompt) and the tower: both are trained
        return [*(tensors[k] for k in ("prompt_embeddings",) if k in tensors),
                *(tensors[k] for k in sorted(tensors) if k.startswith("tower."))]


def text_ids(text: str, tokenizer, bos: int | None, eos: int) -> tuple[list[int], int | None]:
    """``[bos] + text's tokens + [eos]`` (no ``bos`` for (m)T5), the text tokenised as a template's
    literal text is (``data.TemplateEncoder``: the pieces around ``<mask>`` each on their own, ``<mask>``
    one token, T5's ``<extra_id_0>`` where the tokenizer has no mask token); and the index of its
    ``<mask>`` (None: it has none)."""
    from ..data import mask_token_id
    from ..tasks import template_parts

    try:
        parts = template_parts(text)
    except ValueError as e:
        raise XPromptError(f"--prompt-text {text!r}: {e}") from None
    kinds = [kind for kind, _ in parts]
    if "field" in kinds or kinds.count("mask") > 1:
        raise XPromptError(f"--prompt-text {text!r} may hold one <mask> and no {{field}} (the input is read apart)")
    ids, at = [] if bos is None else [bos], None
    for kind, value in parts:
        if kind == "mask":
            at = len(ids)
            ids.append(mask_token_id(tokenizer))
        else:
            ids.extend(tokenizer(value, add_special_tokens=False)["input_ids"])
    if len(ids) == (0 if bos is None else 1):
        raise XPromptError(f"--prompt-text {text!r} has no tokens")
    return [*ids, eos], at
