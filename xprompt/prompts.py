"""Prompts: the trainable vectors. Each method is a small module behind one interface.

- ``soft``: ``length`` vectors inserted after ``<s>`` at the input (Lester et al. 2021).
- ``ptuning``: P-tuning's prompt encoder: the input vectors are ``seed + encoder(seed)``, the encoder
  an MLP or a bidirectional LSTM + MLP (``reparam``) trained end to end; its last layer starts at
  zero, so training starts from the same vectors as ``soft``. Saved as the resulting vectors.
- ``deep``: the same input vectors plus ``length`` vectors for every further layer that overwrite
  the prompt positions before that layer runs (deep prompts as hidden states).
- ``prefix``: trainable keys and values for the prompt positions in every layer (P-tuning v2 /
  prefix tuning; PEFT's ``PrefixTuning``).
- ``deep`` and ``prefix`` take P-tuning v2's optional reparameterisation (``projection``, PEFT's
  ``prefix_projection``): their per-layer tables plus an MLP of the input vectors, trained end to
  end, saved as the resulting tables (see ``LayerProjection``).
- ``unified``: UniPrompt's two towers (see ``UnifiedPrompt``).

Interface: ``prompt.vectors()`` (length x hidden) goes into the input, ``prompt.embeddings`` is
what initialisation writes; ``prompt.install(layers)`` registers whatever the method does inside
the backbone; ``prompt.tensors()`` / ``load_tensors`` give the saved (exported) state and
``state_tensors()`` / ``load_state_tensors`` everything a resumed run needs. The model never
branches on the method.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from .errors import XPromptError

POSITIONS = {"after-bos": 1, "first": 0}  # --prompt-position: where the prompt goes ("first": PEFT's place)


class Method(str, Enum):
    SOFT = "soft"
    PTUNING = "ptuning"
    DEEP = "deep"
    PREFIX = "prefix"
    UNIFIED = "unified"


REPARAMS = ("mlp", "lstm")


def vocab_init(embeddings: torch.Tensor, length: int, generator: torch.Generator, top: int = 5000) -> torch.Tensor:
    """Rows of the word-embedding matrix sampled from the first ``top`` pieces (frequent words),
    skipping the special tokens at the start of the vocabulary."""
    low = 5 if embeddings.shape[0] > top + 5 else 0
    high = min(embeddings.shape[0], low + top)
    rows = torch.randint(low, high, (length,), generator=generator)
    return embeddings[rows].detach().clone().float()


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


class SoftPrompt(nn.Module):
    method = Method.SOFT

    def __init__(self, length: int, hidden: int, num_layers: int, reparam: str = "mlp", position: str = "after-bos"):
        super().__init__()
        if length < 1:
            raise XPromptError(f"--prompt-length must be at least 1 (got {length})")
        if position not in POSITIONS:
            raise XPromptError(f"unknown --prompt-position '{position}'; known: {', '.join(POSITIONS)}")
        self.length = length
        self.position = position
        self.offset = POSITIONS[position]  # index of the first prompt vector in the sequence
        self.embeddings = nn.Parameter(torch.zeros(length, hidden))

    def vectors(self) -> torch.Tensor:
        """The (length x hidden) vectors that go into the input after ``<s>``."""
        return self.embeddings

    def insert(self, words: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with the prompt vectors inserted at ``offset``, and the widened mask."""
        batch = words.shape[0]
        prompt = self.vectors().to(words.device, words.dtype).unsqueeze(0).expand(batch, -1, -1)
        at = self.offset
        ones = attention_mask.new_ones(batch, self.length)
        return (torch.cat([words[:, :at], prompt, words[:, at:]], dim=1),
                torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1))

    def attach(self, backbone) -> None:
        """Take what the method needs from the backbone (nothing for input-level prompts)."""

    def joined_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of the final hidden states, given the mask of the input (with an
        input-level prompt, already the same)."""
        return attention_mask

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def install(self, layers: nn.ModuleList) -> list:
        return []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything training needs to resume (by default the saved tensors)."""
        return self.tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.load_tensors(tensors, where)

    def record(self, layers: nn.ModuleList) -> list:
        """Hooks that record what the input-level vectors produce inside the backbone, for
        ``init_layers`` (methods with per-layer vectors); none for input-level prompts."""
        return []

    def init_layers(self) -> None:
        """Start the per-layer vectors from what ``record``'s hooks saw."""

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


class PTuningPrompt(SoftPrompt):
    """P-tuning (Liu et al. 2021): trainable seed vectors passed through a prompt encoder, an MLP
    (``reparam="mlp"``) or a bidirectional LSTM followed by an MLP (``"lstm"``), residual and with
    a zero-initialised last layer. Saved as the resulting vectors, so a saved P-tuning prompt is
    used exactly like a soft one; the encoder is kept in checkpoints only."""

    method = Method.PTUNING

    def __init__(self, length: int, hidden: int, num_layers: int, reparam: str = "mlp", position: str = "after-bos"):
        super().__init__(length, hidden, num_layers, position=position)
        if reparam not in REPARAMS:
            raise XPromptError(f"unknown --reparam '{reparam}'; known: {', '.join(REPARAMS)}")
        self.reparam = reparam
        self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True) if reparam == "lstm" else None
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


class LayerProjection(nn.Module):
    """P-tuning v2's reparameterisation of per-layer prompt vectors (PEFT's ``prefix_projection``),
    made residual: vectors = free tables + MLP(input prompt vectors), the MLP hidden -> hidden ->
    ``tables`` x hidden with a tanh between, its last layer starting at zero (so training starts
    from the tables' initialisation, as ``ptuning``'s encoder does)."""

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


class _Projected:
    """Saving and resuming for a method whose per-layer tables may go through a ``LayerProjection``
    (``self.projection``): saved and exported as the resulting tables, loaded back as tables with
    the projection restarted at zero; checkpoints keep the raw tables and the projection."""

    projection: LayerProjection | None

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        SoftPrompt.load_tensors(self, tensors, where)
        if self.projection is not None:
            self.projection.restart()  # the loaded tables are the vectors

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.named_tensor_params().items()}
        if self.projection is not None:
            state.update({f"projection.{k}": v.detach().clone() for k, v in self.projection.state_dict().items()})
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        SoftPrompt.load_tensors(self, tensors, where)
        if self.projection is not None:
            wanted = self.projection.state_dict()
            missing = [f"projection.{k}" for k in wanted if f"projection.{k}" not in tensors]
            if missing:
                raise XPromptError(f"{where}: {', '.join(missing)} missing; was it saved with --prefix-projection?")
            self.projection.load_state_dict({k: tensors[f"projection.{k}"] for k in wanted})


class DeepPrompt(_Projected, SoftPrompt):
    """Input prompt plus one set of vectors per further layer, written over the prompt positions
    before that layer (deep prompts as hidden states); initialised from the states the input prompt
    produces for a bare ``<s> prompt </s>`` (in context, the later layers' prompt states differ a
    little, so training starts close to where the input-level prompt would)."""

    method = Method.DEEP

    def __init__(self, length: int, hidden: int, num_layers: int, reparam: str = "mlp", position: str = "after-bos",
                 projection: bool = False):
        super().__init__(length, hidden, num_layers, position=position)
        self.layer_prompts = nn.Parameter(torch.zeros(num_layers - 1, length, hidden))
        self.projection = LayerProjection(hidden, num_layers - 1) if projection else None
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

    def tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {**super().tensors(), "layer_prompts": self.layer_vectors().detach().contiguous()}

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings, "layer_prompts": self.layer_prompts}


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


class PrefixPrompt(_Projected, SoftPrompt):
    """P-tuning v2 / prefix tuning (Li & Liang 2021; Liu et al. 2022): trainable key and value vectors
    for the prompt positions in every layer's self-attention, PEFT ``PrefixTuning``'s twin. The
    prompt positions hold placeholders whose keys and values are overwritten right after the frozen
    projections, so every input token attends to ``length`` free key/value pairs per layer.
    Initialised from the keys and values the sampled input prompt produces (where ``deep`` starts)."""

    method = Method.PREFIX

    def __init__(self, length: int, hidden: int, num_layers: int, reparam: str = "mlp", position: str = "after-bos",
                 projection: bool = False):
        super().__init__(length, hidden, num_layers, position=position)
        self.embeddings.requires_grad_(False)  # placeholders: what they hold never reaches the input tokens
        self.keys = nn.Parameter(torch.zeros(num_layers, length, hidden))
        self.values = nn.Parameter(torch.zeros(num_layers, length, hidden))
        # with a projection, the placeholders (sampled word vectors, fixed) are what the MLP reads
        self.projection = LayerProjection(hidden, 2 * num_layers) if projection else None
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

    def install(self, layers: nn.ModuleList) -> list:
        handles = []
        tables = self.key_values()  # once per forward pass
        for index, pair in enumerate(self._projections):
            for table, projection in zip(tables, pair):
                handles.append(projection.register_forward_hook(self._hook(table[index])))
        return handles

    def _hook(self, table: torch.Tensor):
        def overwrite(module, args, out):
            vectors = table.to(out.device, out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
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

    def tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            keys, values = self.key_values()
            return {**super().tensors(), "keys": keys.detach().contiguous(), "values": values.detach().contiguous()}

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings, "keys": self.keys, "values": self.values}


class UnifiedPrompt(SoftPrompt):
    """UniPrompt's two towers (Huang et al. 2022), with the backbone frozen. The prompt vectors
    run through a *prompt tower*: copies of the backbone's lower ``tower_layers`` layers, trained.
    The input runs through the frozen backbone's own lower layers (the *context tower*) without
    any prompt. Before the first upper layer the prompt tower's states are inserted after ``<s>``,
    and the frozen upper layers read both. The prompt tower never sees the input, so its states are
    computed once per forward pass in training and, at inference, once per run and reused (the
    cache is keyed by the parameters' versions, so a changed prompt is never read stale).
    Supports BERT/XLM-R style layers (``layer(hidden, attention_mask)``)."""

    method = Method.UNIFIED
    TOWER_LR_SCALE = 3e-3  # the tower is whole transformer layers: a fine-tuning rate (3e-2 -> 1e-4)

    def __init__(self, length: int, hidden: int, num_layers: int, reparam: str = "mlp", position: str = "after-bos",
                 tower_layers: int | None = None):
        super().__init__(length, hidden, num_layers, position=position)
        if num_layers < 2:
            raise XPromptError("--method unified needs a backbone of at least 2 layers")
        self.split = tower_layers or num_layers // 2
        if not 1 <= self.split < num_layers:
            raise XPromptError(f"--tower-layers must be between 1 and {num_layers - 1}, got {self.split}")
        self.tower = nn.ModuleList()
        self._ends: tuple = ()  # (embeddings module, bos id, eos id): the backbone's, not ours to save
        self.cache_enabled = True
        self._cache: tuple | None = None

    def attach(self, backbone) -> None:
        import copy

        layers = backbone.layers()
        if len(self.tower) == 0:  # the tower starts as copies of the lower layers (then trained)
            self.tower = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.split))
            self.tower.float()  # trained: fp32 weights even where the frozen backbone holds bf16 (GPU)
            self.tower.requires_grad_(True)
            self.tower.to(next(layers.parameters()).device)
        from .data import sequence_ends

        bos, eos = sequence_ends(backbone.tokenizer)
        # BERT/XLM-R: an embeddings module (positions + LayerNorm) and layer(hidden, mask).
        # T5/mT5 (seq2seq): bare word vectors, no <s>, and layer(hidden, mask, position_bias) with the
        # relative position bias computed by the first layer and passed on.
        embeddings = getattr(backbone.model, "embeddings", None)
        relative = backbone.kind == "seq2seq"
        if eos is None or (embeddings is None and not relative):
            raise XPromptError(f"--method unified supports BERT/XLM-R and T5/mT5 style models; '{backbone.name}' is neither")
        self._ends = (embeddings, backbone.input_embeddings(), bos, eos, relative)

    def insert(self, words: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return words, attention_mask  # the context tower reads the input alone

    def joined_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask of the final states: the prompt positions joined at ``offset`` (after ``<s>``)."""
        ones = attention_mask.new_ones(attention_mask.shape[0], self.length)
        at = self.offset
        return torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1)

    def tower_states(self) -> torch.Tensor:
        """(length x hidden): the prompt tower's output at the prompt positions for ``<s> prompt </s>``
        (``prompt </s>`` for models without ``<s>``)."""
        embeddings, words, bos, eos, relative = self._ends
        key = (tuple(p._version for p in self.parameters()), torch.is_autocast_enabled("cpu"),
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

    def install(self, layers: nn.ModuleList) -> list:
        states = self.tower_states()
        length, at = self.length, self.offset

        def widen(mask, size):
            return widen_mask(mask, size, length, at)

        def hook(first: bool):
            def fuse(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                size = hidden.shape[1] if first else hidden.shape[1] - length
                if first:
                    prompt = states.to(hidden.device, hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
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

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.embeddings], "lr": lr},
                {"params": list(self.tower.parameters()), "lr": lr * self.TOWER_LR_SCALE}]

    def tensors(self) -> dict[str, torch.Tensor]:
        tower = {f"tower.{k}": v.detach().contiguous() for k, v in self.tower.state_dict().items()}
        return {"prompt_embeddings": self.embeddings.detach().contiguous(), **tower}

    def named_tensor_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embeddings,
                **{f"tower.{k}": v for k, v in self.tower.state_dict(keep_vars=True).items()}}


PROMPTS: dict[Method, type[SoftPrompt]] = {Method.SOFT: SoftPrompt, Method.PTUNING: PTuningPrompt, Method.DEEP: DeepPrompt,
                                           Method.PREFIX: PrefixPrompt, Method.UNIFIED: UnifiedPrompt}


def build_prompt(method: Method | str, length: int, hidden: int, num_layers: int, reparam: str = "mlp",
                 position: str = "after-bos", tower_layers: int | None = None, projection: bool = False) -> SoftPrompt:
    try:
        cls = PROMPTS[Method(method)]
    except ValueError:
        known = ", ".join(m.value for m in Method)
        raise XPromptError(f"unknown method '{method}'; known: {known}") from None
    if cls is UnifiedPrompt:
        return cls(length, hidden, num_layers, position=position, tower_layers=tower_layers)
    if projection:
        if cls not in (DeepPrompt, PrefixPrompt):
            raise XPromptError(f"--prefix-projection needs --method deep or prefix, not {cls.method.value}")
        return cls(length, hidden, num_layers, reparam, position, projection=True)
    return cls(length, hidden, num_layers, reparam, position)
