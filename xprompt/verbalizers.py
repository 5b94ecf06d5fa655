"""Verbalizers: backbone output -> one score per label; and which one a backbone, a flag or a saved
prompt's card asks for (``make_verbalizer``, ``verbalizer_from_card``).

``WordVerbalizer`` (the hard verbalizer of a masked LM, PET/LM-BFF style) scores each label by the
log-probability its label words get at ``<mask>`` under the frozen LM head; a word of several
pieces reduces its pieces' log-probabilities by mean, first or max; the words are the task card's
for the language being evaluated. It has no trainable tensors.

``SoftVerbalizer`` keeps one trainable vector per label in the backbone's hidden space and scores
a ``<mask>`` state by its negative squared distance to each (a nearest-centroid classifier). It is
initialised from the class-mean ``<mask>`` states of the training data, UniPrompt's "dynamic soft
label words", so before any training step it already predicts the nearest class mean.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LABEL_REDUCES, VERBALIZERS, WORD_VERBALIZERS
from .data import span_sentinels
from .errors import XPromptError
from .generation import FixedHead as _FixedWords, GenerationHead, generation_head  # a verbalizer of fixed words


class SoftVerbalizer(nn.Module):
    kind = "soft"
    needs_init = True  # from class means

    def __init__(self, num_labels: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_labels, hidden))

    def use_language(self, lang: str) -> None:
        """Label vectors are language-agnostic: nothing to switch."""

    def end_step(self, reduce=None) -> None:
        """Called after every optimizer step (the centered verbalizer moves its centre)."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) -> (batch, labels): -||h - w_c||^2 / 2 up to a per-row constant."""
        w = self.weight.to(states.device, states.dtype)
        return states @ w.T - 0.5 * (w * w).sum(-1)

    @torch.no_grad()
    def init_from_class_means(self, states: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Each label's vector from the mean state of its examples. A label without examples
        (a rare class held out for selection) starts at the mean of all states; returns those labels."""
        if len(states) == 0:
            raise XPromptError("no training examples to initialise the label vectors from")
        missing = []
        for c in range(self.weight.shape[0]):
            chosen = states[labels == c]
            if len(chosen) == 0:
                missing.append(c)
                chosen = states
            self.weight[c] = chosen.float().mean(0)
        return missing

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"verbalizer.weight": self.weight.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        value = tensors.get("verbalizer.weight")
        if value is None or tuple(value.shape) != tuple(self.weight.shape):
            got = None if value is None else tuple(value.shape)
            raise XPromptError(
                f"{where}: 'verbalizer.weight' has shape {got}, this task and backbone need "
                f"{tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(value)


class CenteredVerbalizer(SoftVerbalizer):
    """Label vectors scored around a centre ``c``: ``(h - c) . (w_c - c)``. Every label scores 0 at
    the centre, so a state drawn towards it (a less certain reading, as in the languages the prompt
    was not trained on, whose states sit nearer the middle) keeps its ranking of labels instead of
    falling to the label nearest the middle. The centre is the mean of the class means at
    initialisation, then follows the training states as the prompt moves them: after every optimizer
    step it moves ``momentum`` of the way to the mean state of that step's global batch (summed
    over micro-batches and processes, so it does not depend on either). Saved with the vectors."""

    kind = "centered"
    momentum = 0.05

    def __init__(self, num_labels: int, hidden: int):
        super().__init__(num_labels, hidden)
        self.register_buffer("center", torch.zeros(hidden))
        self._sum, self._count = torch.zeros(hidden, dtype=torch.float64), 0

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # a training step: remember its states
            self._sum = self._sum.to(states.device) + states.detach().double().sum(0)
            self._count += states.shape[0]
        w = self.weight.to(states.device, states.dtype)
        c = self.center.to(states.device, states.dtype)
        return (states - c) @ (w - c).T

    @torch.no_grad()
    def end_step(self, reduce=None) -> None:
        """Move the centre towards this step's mean training state (``reduce`` sums over processes)."""
        total = torch.cat([self._sum, self._sum.new_tensor([self._count])])
        total = reduce(total) if reduce is not None else total
        if total[-1] > 0:
            mean = (total[:-1] / total[-1]).to(self.center.device, self.center.dtype)
            self.center.mul_(1 - self.momentum).add_(self.momentum * mean)
        self._sum, self._count = torch.zeros_like(self._sum), 0

    @torch.no_grad()
    def init_from_class_means(self, states: torch.Tensor, labels: torch.Tensor) -> list[int]:
        missing = super().init_from_class_means(states, labels)
        present = [c for c in range(self.weight.shape[0]) if c not in missing]
        self.center.copy_(self.weight[present].mean(0))
        return missing

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "verbalizer.center": self.center.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        super().load_tensors(tensors, where)
        value = tensors.get("verbalizer.center")
        if value is None or tuple(value.shape) != tuple(self.center.shape):
            raise XPromptError(f"{where}: 'verbalizer.center' is missing or of another shape; was it trained with "
                               "--verbalizer centered?")
        self.center.copy_(value)


class LinearVerbalizer(SoftVerbalizer):
    """A classification head, as vanilla fine-tuning has: ``states @ weight.T + bias``, one trained
    row and bias per label, both starting at zero (the first step's gradient moves the head; a
    zero head sends none into the backbone). Reads any pooled state (``--readout first``: the
    first token's, BERT's [CLS] / XLM-R's <s>)."""

    kind = "linear"
    needs_init = False

    def __init__(self, num_labels: int, hidden: int):
        super().__init__(num_labels, hidden)
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.weight.to(states.device, states.dtype).T + self.bias.to(states.device, states.dtype)

    def init_from_class_means(self, states: torch.Tensor, labels: torch.Tensor) -> list[int]:
        return []

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "verbalizer.bias": self.bias.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        super().load_tensors(tensors, where)
        value = tensors.get("verbalizer.bias")
        if value is None or tuple(value.shape) != tuple(self.bias.shape):
            raise XPromptError(f"{where}: 'verbalizer.bias' is missing or of another shape; was it trained with "
                               "--verbalizer linear?")
        with torch.no_grad():
            self.bias.copy_(value)


class WordVerbalizer(_FixedWords):
    """Hard verbalizer over a frozen LM head. ``pieces[lang][c]`` are the token ids of label c's
    word in language ``lang``; ``use_language`` picks the set (the training language's by default,
    and for a language the task card gives no words). The head is the backbone's, kept out of this
    module's submodules so that moving the verbalizer never moves (a shard of) the backbone."""

    kind = "hard"

    def __init__(self, head: nn.Module, pieces: dict[str, list[list[int]]], lang: str, reduce: str = "mean"):
        super().__init__()
        if reduce not in LABEL_REDUCES:
            raise XPromptError(f"unknown --label-reduce '{reduce}'; known: {', '.join(LABEL_REDUCES)}")
        if lang not in pieces:
            raise XPromptError(f"no label words for the training language '{lang}' in the task card")
        self._head = (head,)
        self.pieces = pieces
        self.default = lang
        self.lang = lang
        self.reduce = reduce

    @property
    def head(self) -> nn.Module:
        return self._head[0]

    def use_language(self, lang: str) -> None:
        self.lang = lang if lang in self.pieces else self.default

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.head(states).float(), dim=-1)
        scores = []
        for ids in self.pieces[self.lang]:
            piece = logp[:, ids]
            if self.reduce == "mean":
                scores.append(piece.mean(-1))
            elif self.reduce == "first":
                scores.append(piece[:, 0])
            else:
                scores.append(piece.max(-1).values)
        return torch.stack(scores, dim=-1)


class OutputWordsVerbalizer(nn.Module):
    """A soft verbalizer in the LM head's output space (WARP-style): the frozen head's transform of
    the ``<mask>`` state, dotted with one trainable vector per label plus a bias, both initialised
    from the label words' output embeddings and biases (mean over a word's pieces, over the training
    language's words). At step 0 it is the hard verbalizer without the softmax normaliser."""

    kind = "soft-words"
    needs_init = False

    def __init__(self, head: nn.Module, pieces: dict[str, list[list[int]]], lang: str):
        super().__init__()
        import copy

        if lang not in pieces:
            raise XPromptError(f"no label words for the training language '{lang}' in the task card")
        decoder = _vocab_projection(head)
        # the head without its vocabulary projection (shared, frozen); the projection is not copied
        self.transform = [copy.deepcopy(head, memo={id(decoder): nn.Identity()})]
        hidden = decoder.weight.shape[1]
        self.weight = nn.Parameter(torch.stack([decoder.weight[ids].detach().float().mean(0) for ids in pieces[lang]]))
        bias = decoder.bias if decoder.bias is not None else torch.zeros(decoder.weight.shape[0])
        self.bias = nn.Parameter(torch.stack([bias[ids].detach().float().mean() for ids in pieces[lang]]))
        assert self.weight.shape[1] == hidden

    def use_language(self, lang: str) -> None:
        """Trained label vectors are language-agnostic: nothing to switch."""

    def end_step(self, reduce=None) -> None:
        """Nothing to update after a step."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        transform = self.transform[0].to(states.device)
        out = transform(states)
        return out.float() @ self.weight.T + self.bias

    def init_from_class_means(self, states: torch.Tensor, labels: torch.Tensor) -> list[int]:
        return []

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"verbalizer.weight": self.weight.detach().contiguous(), "verbalizer.bias": self.bias.detach().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for name, param in (("verbalizer.weight", self.weight), ("verbalizer.bias", self.bias)):
            value = tensors.get(name)
            if value is None or tuple(value.shape) != tuple(param.shape):
                raise XPromptError(f"{where}: '{name}' has shape {None if value is None else tuple(value.shape)}, "
                                   f"this verbalizer needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value)


def _vocab_projection(head: nn.Module) -> nn.Linear:
    """The LM head's last Linear layer onto the vocabulary (the largest output)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise XPromptError(f"cannot find the vocabulary projection of {type(head).__name__}")
    return max(linears, key=lambda m: m.out_features)


class DecoderVerbalizer(_FixedWords):
    """Text-to-text scoring (mT5, T5, mT0): each label's word (from the task card, per language) is
    scored by the frozen decoder's log-likelihood given the prompted encoder states, divided by its
    number of scored tokens. In T5's span-corruption format (``sentinels``: the input holds
    ``<extra_id_0>`` where the template has ``<mask>``) the target is ``<extra_id_0> word
    <extra_id_1> </s>`` and the word's pieces plus the closing sentinel are scored (the opening
    sentinel and ``</s>`` are the same for every label); otherwise the target is ``word </s>``,
    all scored. Reads the whole encoder sequence. The encoder-decoder is the backbone's, kept out
    of this module's submodules so that moving the verbalizer never moves (a shard of) the model."""

    kind = "hard"
    reads_sequence = True

    def __init__(self, seq2seq: nn.Module, pieces: dict[str, list[list[int]]], lang: str, eos_id: int,
                 sentinels: tuple[int, int] | None = None):
        super().__init__()
        if lang not in pieces:
            raise XPromptError(f"no label words for the training language '{lang}' in the task card")
        self._seq2seq = (seq2seq,)
        if sentinels is not None:
            first, second = sentinels
            self.targets = {lg: [[first, *ids, second, eos_id] for ids in by_label] for lg, by_label in pieces.items()}
            self.scored = slice(1, -1)
        else:
            self.targets = {lg: [[*ids, eos_id] for ids in by_label] for lg, by_label in pieces.items()}
            self.scored = slice(0, None)
        self.default = lang
        self.lang = lang

    @property
    def seq2seq(self) -> nn.Module:
        return self._seq2seq[0]

    def use_language(self, lang: str) -> None:
        self.lang = lang if lang in self.targets else self.default

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        encoder_outputs = BaseModelOutput(last_hidden_state=hidden)
        scores = []
        for ids in self.targets[self.lang]:  # one label at a time bounds the (batch, len, vocab) logits
            labels = torch.tensor(ids, device=hidden.device).unsqueeze(0).repeat(hidden.shape[0], 1)
            decoder_input_ids = self.seq2seq.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.seq2seq(encoder_outputs=encoder_outputs, attention_mask=mask,
                                  decoder_input_ids=decoder_input_ids).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            scores.append(logp[:, self.scored].mean(-1))
        return torch.stack(scores, dim=-1)


def label_pieces(tokenizer, words: dict[str, dict[str, str]], labels: list[str]) -> dict[str, list[list[int]]]:
    """Token ids of every label word per language; a lone word-start piece (SentencePiece's "▁")
    that a tokenizer puts before a word is dropped, since it carries no meaning of its own."""
    out = {}
    for lang, by_label in words.items():
        out[lang] = []
        for label in labels:
            ids = tokenizer(by_label[label], add_special_tokens=False)["input_ids"]
            kept = [i for i in ids if tokenizer.convert_ids_to_tokens(i) not in ("▁", "Ġ", " ")] or ids
            if not kept:
                raise XPromptError(f"label word {by_label[label]!r} ({lang}, label {label}) has no tokens")
            out[lang].append(kept)
    return out


# ---------------------------------------------------------------- which verbalizer, built from names or a card


VECTOR_READOUT = "mean"  # what label vectors read by default (docs/compare_methods.md: the best transfer)


def resolve_choices(backbone, kind: str, readout: str) -> tuple[str, str]:
    """``--verbalizer auto``: hard when the backbone has an LM head or a decoder, else centered label
    vectors; ``--readout auto``: the ``<mask>`` state for label words, the first token's for a linear
    head, else ``VECTOR_READOUT``."""
    if kind == "auto":
        kind = "hard" if backbone.lm_head is not None or backbone.seq2seq is not None else "centered"
    if readout == "auto":
        readout = "mask" if kind in WORD_VERBALIZERS else "first" if kind == "linear" else VECTOR_READOUT
    return kind, readout


def make_verbalizer(backbone, kind: str, labels: list[str], words: dict[str, dict[str, str]], lang: str,
                    reduce: str = "mean", readout: str = "mask"):
    """``soft`` or ``centered`` (label vectors), ``hard`` (label words under the LM head or the
    decoder), ``soft-words``, ``linear`` (a classification head) or ``auto`` (see ``resolve_choices``)."""
    kind, readout = resolve_choices(backbone, kind, readout)
    if kind == "linear":
        return LinearVerbalizer(len(labels), backbone.hidden_size)
    if kind == "soft":
        return SoftVerbalizer(len(labels), backbone.hidden_size)
    if kind == "centered":
        return CenteredVerbalizer(len(labels), backbone.hidden_size)
    if kind not in WORD_VERBALIZERS:
        raise XPromptError(f"unknown --verbalizer '{kind}'; known: {', '.join(VERBALIZERS)}")
    if not words:
        raise XPromptError(f"--verbalizer {kind} scores label words, and the task card gives none: add "
                           "languages.<lang>.label_words to it, or use --verbalizer centered or soft")
    if kind == "soft-words":
        if backbone.lm_head is None or readout != "mask":
            raise XPromptError(f"--verbalizer soft-words needs a masked-LM backbone and --readout mask; '{backbone.name}' "
                               f"is of kind {backbone.kind}")
        return OutputWordsVerbalizer(backbone.lm_head, label_pieces(backbone.tokenizer, words, labels), lang)
    pieces = label_pieces(backbone.tokenizer, words, labels) if backbone.kind in ("masked_lm", "seq2seq") else None
    if backbone.seq2seq is not None:
        tok = backbone.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        return DecoderVerbalizer(backbone.seq2seq, pieces, lang, eos, span_sentinels(tok))
    if backbone.lm_head is None:
        raise XPromptError(f"--verbalizer hard needs a masked-LM or seq2seq backbone (an LM head); '{backbone.name}' "
                           f"is of kind {backbone.kind}: use --verbalizer soft")
    if readout != "mask":
        raise XPromptError("--verbalizer hard reads the <mask> state: use --readout mask")
    return WordVerbalizer(backbone.lm_head, pieces, lang, reduce)


def vector_verbalizer(card: dict, num_labels: int, hidden: int) -> SoftVerbalizer:
    """An empty verbalizer of the label-vector kind a saved prompt was trained with (soft, centered or linear)."""
    kinds = {"centered": CenteredVerbalizer, "linear": LinearVerbalizer}
    return kinds.get(card.get("verbalizer"), SoftVerbalizer)(num_labels, hidden)


def task_label_words(task) -> dict[str, dict[str, str]]:
    return {lang: dict(spec.label_words) for lang, spec in task.languages.items() if spec.label_words}


def verbalizer_from_card(card: dict, backbone, num_labels: int | None = None):
    """An empty verbalizer of the kind a saved prompt was trained with: label words from its card,
    or label vectors (soft or centered) for ``num_labels`` labels (default: the card's)."""
    if card.get("verbalizer") == GenerationHead.kind:
        return generation_head(backbone)
    if card.get("verbalizer") in WORD_VERBALIZERS:
        return make_verbalizer(backbone, card["verbalizer"], card["labels"], card["label_words"],
                               card["train_language"], card.get("label_reduce", "mean"))
    return vector_verbalizer(card, num_labels or len(card["labels"]), backbone.hidden_size)
