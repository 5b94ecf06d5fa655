"""Generation heads: for a generation task (a task card of ``kind: generation``) on a seq2seq
backbone, the frozen decoder writes the target from the prompted encoder states."""

from __future__ import annotations

import torch
from torch import nn

from .errors import XPromptError


class FixedHead(nn.Module):
    """A head with nothing trained: nothing to initialise, update, save or load (fixed label words,
    a frozen decoder)."""

    needs_init = False

    def end_step(self, reduce=None) -> None:
        """Nothing to update after a step."""

    def init_from_class_means(self, states: torch.Tensor, labels: torch.Tensor) -> list[int]:
        return []

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Nothing saved: the words come from the card, the decoder is the backbone's."""


class GenerationHead(FixedHead):
    """For a generation task on a seq2seq backbone: the frozen decoder writes the target from the
    prompted encoder states. ``loss`` is teacher forcing (each row's mean token negative
    log-likelihood, summed over rows); ``generate`` decodes (greedy, or beam search). The
    encoder-decoder is the backbone's, kept out of this module's submodules."""

    kind = "generate"
    reads_sequence = True

    def __init__(self, seq2seq: nn.Module):
        super().__init__()
        self._seq2seq = (seq2seq,)

    @property
    def seq2seq(self) -> nn.Module:
        return self._seq2seq[0]

    def use_language(self, lang: str) -> None:
        """The decoder writes whatever language the input asks for: nothing to switch."""

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        labels = target_ids.to(hidden.device)
        decoder_input_ids = self.seq2seq.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self.seq2seq(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                              decoder_input_ids=decoder_input_ids).logits
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")
        tokens = (labels != -100).sum(1).clamp(min=1)
        return (nll.sum(1) / tokens).sum()

    def generate(self, hidden: torch.Tensor, mask: torch.Tensor, num_beams: int = 1, max_new_tokens: int = 48):
        from transformers.modeling_outputs import BaseModelOutput

        return self.seq2seq.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                                     num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise XPromptError("a generation task is scored by what the model writes (chrF, BLEU), not by label scores")


def generation_head(backbone):
    """The generation head of a seq2seq backbone; any other kind is refused."""
    if backbone.seq2seq is None:
        raise XPromptError(f"a generation task needs a seq2seq backbone (mT5, T5, mT0); '{backbone.name}' is of kind "
                           f"{backbone.kind}")
    return GenerationHead(backbone.seq2seq)
