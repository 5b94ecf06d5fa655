"""PromptModel: frozen backbone + prompt + verbalizer; ``forward(batch) -> logits``.

The prompt's vectors go in at the prompt's place through ``inputs_embeds``; the state read out is
the final hidden state at ``<mask>`` (``readout="mask"``), the mean over the input's tokens
(``readout="mean"``, the e5 sentence-embedding convention) or the first token's (``readout="first"``:
[CLS] / <s>, a classification head's). It never branches on the method. A run that tunes its
backbone hands the model its ``tuning`` (``xprompt.tuning``): its part of the optimizer and tensors.
Here too: building a model, from options or from a saved prompt's card.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .attention import PREFIX, prefix_attention_modules
from .backbones import Backbone
from .checks import CHANGES_BACKBONE, tune_of
from .config import READOUTS
from .data import sequence_ends
from .errors import XPromptError
from .fused import kept_rows
from .mixed import MixedModel
from .prompts import PromptMethod, build_prompt
from .store import load_prompt
from .verbalizers import resolve_choices, verbalizer_from_card


class PromptModel(nn.Module):
    skip_prompt_rows = True  # False: the readouts compute every position, as ``encode`` does

    def __init__(self, backbone: Backbone, prompt: PromptMethod, verbalizer: nn.Module, readout: str = "mask"):
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
        # a prompt whose positions only serve as keys and values (deep) on an encoder that takes them
        # as a prefix: the readouts skip computing those positions' rows (``_token_states``)
        self._attentions = (prefix_attention_modules(self.backbone, self._layers)
                            if hasattr(prompt, "install_key_values") else None)
        self.tuning = None  # a run that tunes its backbone: its ``tuning.BackboneTuning``
        self.own_backbone = None  # the --tune mode of a model on its own (tuned) copy of the backbone

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
        """Optimizer groups: the prompt's (a method may give a part its own rate), the label vectors'
        and, where the run tunes it, the backbone's (at its own rate)."""
        backbone = self.tuning.param_groups(lr) if self.tuning is not None else []
        prompt = self.prompt.param_groups(lr)
        for group in prompt:  # a prompt's copies of backbone layers (unified's tower) learn as the backbone does
            if group.pop("layers", False) and self.tuning is not None and self.tuning.mode == "full":
                group["lr"] = backbone[0]["lr"]
        groups = [*prompt, {"params": [p for p in self.verbalizer.parameters() if p.requires_grad], "lr": lr}, *backbone]
        return [g for g in groups if g["params"]]

    def backbone_tensors(self) -> dict[str, torch.Tensor]:
        """The tuned backbone tensors (``backbone.*``) of a run that tunes it; none otherwise."""
        return self.tuning.tensors() if self.tuning is not None else {}

    def load_backbone_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.tuning is not None:
            self.tuning.load_tensors(tensors, where)

    def _with_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
                     index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with whatever the prompt puts into the input, and the matching mask."""
        return self.prompt.insert(self.embed(input_ids), attention_mask, tables, index)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states with the prompt inserted: (batch, prompt + tokens, hidden)."""
        return self.sequence(input_ids, attention_mask)[0]

    def sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states with the prompt inserted and the matching attention mask. ``tables``
        and ``index``: several prompts of this one's shape, stacked, and each row's (``mixed``)."""
        inputs, mask = self._with_prompt(input_ids, attention_mask, tables, index)
        # The method's hooks live only for this call, so models sharing a backbone never interfere.
        handles = self.prompt.install(self._layers, tables, index)
        try:
            return self.backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state, self.prompt.joined_mask(mask)
        finally:
            for handle in handles:
                handle.remove()

    def _token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tables: dict | None = None,
                      index: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states at the input's own positions only, (batch, tokens, hidden): the
        prompt's positions enter every layer as keys and values, their rows are never computed.
        Equal to ``encode`` without the prompt's rows (to float rounding)."""
        inputs, _ = self._with_prompt(input_ids, attention_mask, tables, index)
        handles = self.prompt.install_key_values(self.backbone.embeddings, self._layers, self._attentions, tables, index)
        try:
            return self.backbone(inputs_embeds=inputs, attention_mask=attention_mask).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
            for module in self._attentions:
                module.__dict__.pop(PREFIX, None)

    def states(self, batch: dict, tables: dict | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """The (batch, hidden) states that the verbalizer scores (``tables``/``index``: see ``sequence``)."""
        tokens = self._attentions is not None and self.skip_prompt_rows
        shift = 0 if tokens else self.prompt.length
        only_mask = self.readout == "mask" and self.prompt.mask_index is None  # one row of the last layer read
        with kept_rows(self._layers, batch["mask_pos"] + shift if only_mask else None):
            if tokens:
                hidden = self._token_states(batch["input_ids"], batch["attention_mask"], tables, index)
            else:
                hidden = self.sequence(batch["input_ids"], batch["attention_mask"], tables, index)[0]
        parts = []
        if self.readout == "first":  # the input's first token: after a prompt placed before it
            parts.append(hidden[:, 0 if self.prompt.offset > 0 else shift])
        if self.readout in ("mask", "both"):
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            at = self.prompt.mask_index  # the prompt's own <mask> (``--prompt-text``), else the input's
            parts.append(hidden[rows, batch["mask_pos"] + shift] if at is None else hidden[:, at])
        if self.readout in ("mean", "both"):
            # the input's own tokens after <s>, if any (the prompt sits before them, before or after <s>)
            tokens = hidden[:, self._skip + shift :]
            mask = batch["attention_mask"][:, self._skip :].unsqueeze(-1).to(tokens.dtype)
            parts.append((tokens * mask).sum(1) / mask.sum(1))
        return parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])

    def forward(self, batch: dict) -> torch.Tensor:
        if getattr(self.verbalizer, "reads_sequence", False):  # a decoder scores the label strings
            return self.verbalizer(*self.sequence(batch["input_ids"], batch["attention_mask"]))
        return self.verbalizer(self.states(batch))

    def loss(self, batch: dict) -> torch.Tensor:
        """The batch's summed training loss: cross-entropy over the label scores, or (generation) the
        decoder's teacher-forced loss of the target."""
        if "target_ids" in batch:
            return self.verbalizer.loss(*self.sequence(batch["input_ids"], batch["attention_mask"]), batch["target_ids"])
        logits = self(batch)
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"].to(logits.device), reduction="sum")

    def generate(self, batch: dict, num_beams: int = 1, max_new_tokens: int = 48) -> torch.Tensor:
        """Token ids the decoder writes for each row (a generation task)."""
        return self.verbalizer.generate(*self.sequence(batch["input_ids"], batch["attention_mask"]), num_beams,
                                        max_new_tokens)

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


class _Languages:
    """An ensemble's verbalizer as ``evaluate_languages`` sees it: switching language switches every member's."""

    def __init__(self, members):
        self.members = members

    def use_language(self, lang: str) -> None:
        for model in self.members:
            model.verbalizer.use_language(lang)


class EnsembleModel(nn.Module):
    """Several prompt models on one backbone, read as one: ``forward`` returns the log of the mean of
    their label probabilities (so its argmax is the ensemble's prediction, and one model's ensemble
    is that model). The members score a batch in one mixed pass (``mixed``): the rows once per
    member, each copy through its member's prompt."""

    def __init__(self, members: list[PromptModel]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.verbalizer = _Languages(members)
        self.mixed = MixedModel(members)

    def member_logits(self, batch: dict) -> torch.Tensor:
        """(members, batch, labels) float32 label scores: every member's on every row."""
        rows, count = batch["input_ids"].shape[0], len(self.members)
        member = torch.arange(count, device=batch["input_ids"].device).repeat_interleave(rows)
        copies = {k: batch[k].repeat(count, *([1] * (batch[k].dim() - 1))) for k in ("input_ids", "attention_mask",
                                                                                     "mask_pos")}
        return self.mixed(copies, member).view(count, rows, -1)

    def forward(self, batch: dict) -> torch.Tensor:
        return torch.softmax(self.member_logits(batch), dim=-1).mean(0).log()


# ---------------------------------------------------------------- building models


def build_model(backbone: Backbone, num_labels: int, method: str, prompt_length: int, readout: str,
                reparam: str | None = None, position: str = "after-bos", verbalizer=None,
                tower_layers: int | None = None, projection: bool = False, prompt_text: str = "") -> PromptModel:
    """A prompt model; ``verbalizer`` defaults to a soft one of ``num_labels`` label vectors."""
    from .verbalizers import SoftVerbalizer

    if position == "after-bos" and sequence_ends(backbone.tokenizer)[0] is None:
        position = "first"  # (m)T5 inputs start without <s>: the prompt leads
    prompt = build_prompt(method, backbone.hidden_size, backbone.num_layers, prompt_length=prompt_length,
                          prompt_position=position, reparam=reparam, prefix_projection=projection,
                          tower_layers=tower_layers, prompt_text=prompt_text)
    prompt.attach(backbone)
    verbalizer = verbalizer if verbalizer is not None else SoftVerbalizer(num_labels, backbone.hidden_size)
    readout = resolve_choices(backbone, verbalizer.kind, readout)[1]  # "auto" by the verbalizer's kind
    return PromptModel(backbone, prompt, verbalizer, readout)


def model_from_card(card: dict, backbone: Backbone, verbalizer=None) -> PromptModel:
    """The PromptModel a prompt card describes (method, its options, readout), without its
    tensors; ``verbalizer`` defaults to the card's own kind."""
    verbalizer = verbalizer if verbalizer is not None else verbalizer_from_card(card, backbone)
    return build_model(backbone, len(card["labels"]), card["method"], int(card["prompt_length"]),
                       card.get("readout", "mask"), reparam=card.get("reparam"),
                       position=card.get("position", "after-bos"), verbalizer=verbalizer,
                       tower_layers=card.get("tower_layers"), prompt_text=card.get("prompt_text", ""))


def check_backbone(card: dict, backbone: Backbone, where: str) -> None:
    """Refuse a prompt whose card names other backbone weights than ``backbone``'s."""
    if card.get("backbone_sha256") not in (None, "unknown", backbone.sha256) and backbone.sha256 != "unknown":
        raise XPromptError(
            f"{where}: the prompt was trained on backbone '{card.get('backbone')}' "
            f"(weights sha256 {str(card.get('backbone_sha256'))[:12]}), not on '{backbone.name}' "
            f"({backbone.sha256[:12]}); pass --backbone {card.get('backbone')}"
        )


def load_run_model(run_dir: Path, backbone: Backbone) -> tuple[PromptModel, dict]:
    """Rebuild the PromptModel a run saved; refuses a prompt trained on another backbone. A run that
    tuned its backbone runs on a copy of ``backbone`` with its stored weights applied."""
    tensors, card = load_prompt(run_dir)
    where = str(Path(run_dir) / "prompt")
    check_backbone(card, backbone, where)
    if not card.get("labels") and card.get("verbalizer") != "generate":
        raise XPromptError(f"{where}/xprompt.json: 'labels' is missing; the card is damaged")
    tuned = tune_of(card) in CHANGES_BACKBONE
    if tuned:
        from .tuning import apply_stored, own_copy

        backbone = own_copy(backbone)
    model = model_from_card(card, backbone)
    if tuned:  # onto the model's own copy, once it is built (as in training)
        apply_stored(backbone, Path(where), card)
        model.own_backbone = tune_of(card)
    model.prompt.load_tensors(tensors, where)
    model.verbalizer.load_tensors(tensors, where)
    return model, card
