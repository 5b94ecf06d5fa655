"""Where a prompt's input vectors start (``--init``): sampled vocabulary, random, a text, or the
task card's label words. Per-layer vectors then start from what these produce (``record`` /
``init_layers``); label vectors from the class means read through them (``xprompt.model``)."""

from __future__ import annotations

import torch

from ..config import INITS
from ..errors import XPromptError


def vocab_init(embeddings: torch.Tensor, length: int, generator: torch.Generator, top: int = 5000) -> torch.Tensor:
    """Rows of the word-embedding matrix sampled from the first ``top`` pieces (frequent words),
    skipping the special tokens at the start of the vocabulary."""
    low = 5 if embeddings.shape[0] > top + 5 else 0
    high = min(embeddings.shape[0], low + top)
    rows = torch.randint(low, high, (length,), generator=generator)
    return embeddings[rows].detach().clone().float()


def input_vectors(table: torch.Tensor, tokenizer, length: int, init: str, seed: int, init_text: str | None = None,
                    label_words: list[str] | None = None, where: str = "") -> torch.Tensor:
    """``vocab``: embeddings of frequent word pieces, sampled (Lester et al.'s best simple start);
    ``random``: normal with the embedding matrix's spread; ``text``: the embeddings of
    ``init_text``'s pieces, repeated to the prompt length; ``label-words``: the mean piece embedding
    of each label word (``label_words``, the task card's for the training language), then sampled
    vocabulary. ``table`` is the backbone's word-embedding matrix."""
    gen = torch.Generator().manual_seed(seed)
    if init == "vocab":
        return vocab_init(table, length, gen)
    if init == "random":
        return (torch.randn(length, table.shape[1], generator=gen) * table.float().std()).float()
    if init == "text":
        ids = tokenizer(init_text or "", add_special_tokens=False)["input_ids"]
        if not ids:
            raise XPromptError("--init text needs a non-empty --init-text")
        rows = (ids * (length // len(ids) + 1))[:length]
        return table[torch.tensor(rows)].detach().clone().float()
    if init != "label-words":
        raise XPromptError(f"unknown --init '{init}'; known: {', '.join(INITS)}")
    if not label_words:
        raise XPromptError(f"--init label-words: {where} declares no label words for the training language "
                           "in its card; add them or use another --init")
    vectors = [table[torch.tensor(tokenizer(word, add_special_tokens=False)["input_ids"])].float().mean(0)
               for word in label_words][:length]
    rest = vocab_init(table, length - len(vectors), gen) if length > len(vectors) else table.new_zeros(0, table.shape[1]).float()
    return torch.cat([torch.stack(vectors).detach(), rest])
