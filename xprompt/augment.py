"""English training rows made multilingual without a translation system (``--augment neighbours``):
each word piece of an input, with probability ``rate``, is replaced by its nearest neighbour of
another script in the frozen backbone's input-embedding space (cosine), a code-switching that the
multilingual vocabulary itself offers. The draw is per piece and input, not per position: a piece
chosen in one input is replaced everywhere in it, in both sentences of a pair, so the overlap
between the two sentences (the cue PAWS-X turns on, and much of XNLI's) survives the swap; drawn
per position, the swap broke that overlap and PAWS-X training stalled at 56% on English held-out
rows (docs/close_gap.md). The table is computed once per run from the pieces the
training rows use; the replacement is drawn per step from a seeded generator, so a resumed run sees
the same batches."""

from __future__ import annotations

import unicodedata

import torch

from .data import mask_token_id, sequence_ends


def script_of(piece: str) -> str | None:
    """The Unicode script of a piece's first letter (LATIN, CJK, CYRILLIC, ARABIC ...), or None."""
    for ch in piece.lstrip("▁"):
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            return name.split(" ")[0] if name else None
    return None


@torch.no_grad()
def neighbour_table(embeddings: torch.Tensor, tokenizer, pieces: list[int], candidates: int = 50_000,
                    chunk: int = 512) -> dict[int, int]:
    """For each piece id in ``pieces``: the id, among the first ``candidates`` of the vocabulary
    (XLM-R's is ordered roughly by frequency), of the most cosine-similar input embedding whose
    script is another one (both must have a script)."""
    vocab = min(candidates, embeddings.shape[0])
    names = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    scripts = [script_of(p) if isinstance(p, str) else None for p in names]
    special = set(tokenizer.all_special_ids)
    table = torch.nn.functional.normalize(embeddings[:vocab].float(), dim=-1)
    script_ids = {s: i for i, s in enumerate(sorted({s for s in scripts if s}))}
    cand_script = torch.tensor([script_ids.get(s, -1) if i not in special else -1 for i, s in enumerate(scripts)])
    queries = [p for p in pieces if p < embeddings.shape[0] and p not in special]
    query_names = tokenizer.convert_ids_to_tokens(queries)
    query_script = torch.tensor([script_ids.get(script_of(n) if isinstance(n, str) else None, -1) for n in query_names])
    keep = query_script >= 0
    queries = [q for q, k in zip(queries, keep.tolist()) if k]
    query_script = query_script[keep]
    out: dict[int, int] = {}
    for start in range(0, len(queries), chunk):
        ids = torch.tensor(queries[start : start + chunk])
        sims = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1) @ table.T
        other = (cand_script.unsqueeze(0) >= 0) & (cand_script.unsqueeze(0) != query_script[start : start + chunk, None])
        sims.masked_fill_(~other, float("-inf"))
        best = sims.argmax(-1)
        out.update({int(q): int(b) for q, b in zip(ids, best)})
    return out


class NeighbourSwap:
    """A batch transform: each replaceable piece of an input becomes its neighbour with probability
    ``rate``, one draw per distinct piece of the input, applied at all its positions."""

    def __init__(self, table: dict[int, int], vocab_size: int, rate: float, seed: int):
        self.lookup = torch.arange(vocab_size)
        for piece, neighbour in table.items():
            self.lookup[piece] = neighbour
        self.replaceable = self.lookup != torch.arange(vocab_size)
        self.rate = rate
        self.seed = seed

    def __call__(self, batch: dict, step: int) -> dict:
        ids = batch["input_ids"]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        swap = torch.zeros_like(ids, dtype=torch.bool)
        for row in range(ids.shape[0]):
            pieces, where = torch.unique(ids[row], return_inverse=True)
            swap[row] = (torch.rand(len(pieces), generator=generator) < self.rate)[where]
        swap &= self.replaceable[ids] & batch["attention_mask"].bool()
        return {**batch, "input_ids": torch.where(swap, self.lookup[ids], ids)}


def neighbour_swap(backbone, train_rows, rate: float, seed: int) -> tuple[NeighbourSwap, dict]:
    """The transform for a run's training rows, and what it records (how many pieces can be
    replaced, and a few of the replacements)."""
    tok = backbone.tokenizer
    used = sorted({i for ids in train_rows["input_ids"] for i in ids})
    fixed = {i for i in (*sequence_ends(tok), tok.pad_token_id, tok.unk_token_id, mask_token_id(tok)) if i is not None}
    table = neighbour_table(backbone.input_embeddings().weight, tok, [i for i in used if i not in fixed])
    examples = list(table.items())[:: max(1, len(table) // 8)][:8]
    info = {"replaceable_pieces": len(table), "of_pieces_used": len(used), "rate": rate,
            "examples": [f"{tok.convert_ids_to_tokens(a)} -> {tok.convert_ids_to_tokens(b)}" for a, b in examples]}
    return NeighbourSwap(table, backbone.input_embeddings().weight.shape[0], rate, seed), info
