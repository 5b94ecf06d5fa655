"""Mixed-prompt batches: one batch whose rows use different prompts of the same frozen backbone.

``MixedModel(members)`` takes several ``PromptModel``s built on one backbone and scores a batch in
which each row names its member (a LongTensor of member indices). Members whose forward passes
have one shape (``group_key``: the method and its shape, ``PromptMethod.shape_key``, the readout,
whether the verbalizer reads the whole sequence) run as one sub-batch: each member's per-forward
tables (``PromptMethod.tables``: input vectors, a deep prompt's per-layer states, a prefix's keys
and values, a unified prompt's tower states, computed once as in one prompt's pass) are stacked and
every row reads its own member's through the method's own hooks; a deep prompt's key/value prefix
becomes (batch, heads, length, dim), one per row (``attention.with_prefix``). Members of other
shapes form other sub-batches. Each row's states then go through its own member's verbalizer, so
members may score different label sets: ``forward`` returns (batch, most labels) scores, a row's
columns past its member's labels at ``-inf`` (a softmax gives them 0, an argmax never picks them).
The logits equal each member's own one-prompt batches (fp32 within 1e-5, ``tests/test_mixed.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import XPromptError

# (``model.PromptModel``s are what it mixes; ``model`` imports this module, so this one names it only)


def group_key(model) -> tuple:
    """Members of one key share a forward pass: their hooks and readouts have one shape."""
    return (model.prompt.shape_key(), model.readout, bool(getattr(model.verbalizer, "reads_sequence", False)),
            model.skip_prompt_rows)


def stack_tables(prompts) -> dict[str, torch.Tensor]:
    """Each prompt's ``tables()``, stacked along a new first (member) dimension."""
    each = [p.tables() for p in prompts]
    return {name: torch.stack([t[name] for t in each]) for name in each[0]}


def _trimmed(batch: dict, rows: torch.Tensor | None) -> dict:
    """The batch's ``rows`` (all when None), without the padding columns no kept row needs (right padding)."""
    sub = {k: batch[k] if rows is None else batch[k][rows] for k in ("input_ids", "attention_mask", "mask_pos")}
    if rows is not None:
        width = int(sub["attention_mask"].any(0).nonzero().max()) + 1
        if width < sub["input_ids"].shape[1]:
            sub["input_ids"], sub["attention_mask"] = sub["input_ids"][:, :width], sub["attention_mask"][:, :width]
    return sub


class MixedModel(nn.Module):
    """Several prompt models of one backbone, scored in one batch: row r uses member ``member[r]``."""

    def __init__(self, members: list):
        super().__init__()
        if not members:
            raise XPromptError("a mixed batch needs at least one prompt model")
        tuned = [m.own_backbone for m in members if getattr(m, "own_backbone", None)]
        if tuned and len(members) > 1:
            raise XPromptError(f"a run trained with --tune {tuned[0]} brings its own backbone weights: it cannot share "
                               "a mixed batch (an ensemble, several runs in predict or serve) with other runs")
        if any(m.backbone is not members[0].backbone for m in members):
            raise XPromptError("the prompts of a mixed batch must share one backbone (the same loaded model)")
        self.members = nn.ModuleList(members)
        keys: dict[tuple, list[int]] = {}
        for i, model in enumerate(members):
            keys.setdefault(group_key(model), []).append(i)
        self.groups = list(keys.values())  # member indices of each sub-batch, in order of first appearance

    def use_language(self, lang: str) -> None:
        """Every member's label words switch to ``lang`` (label vectors ignore it)."""
        for model in self.members:
            model.verbalizer.use_language(lang)

    def _parts(self, batch: dict, member: torch.Tensor):
        """Per sub-batch: (its rows of the batch or None for all, its members, each row's position
        among them, its trimmed batch, its lead model, the members' stacked tables)."""
        member = member.to(batch["input_ids"].device)
        if member.shape[0] != batch["input_ids"].shape[0]:
            raise XPromptError(f"{member.shape[0]} member indices for a batch of {batch['input_ids'].shape[0]} rows")
        if len(member) and (int(member.min()) < 0 or int(member.max()) >= len(self.members)):
            raise XPromptError(f"member indices must lie in 0..{len(self.members) - 1}")
        present = torch.zeros(len(self.members), dtype=torch.bool, device=member.device)
        present[member] = True
        seen = present.nonzero().flatten().tolist()
        for group in self.groups:
            used = [i for i in group if i in seen]
            if not used:
                continue
            if len(used) == len(seen):  # every row is this group's
                rows, local = None, member
            else:
                rows = torch.isin(member, torch.tensor(used, device=member.device)).nonzero().flatten()
                local = member[rows]
            position = torch.full((len(self.members),), -1, dtype=torch.long, device=member.device)
            position[torch.tensor(used, device=member.device)] = torch.arange(len(used), device=member.device)
            lead = self.members[used[0]]
            yield rows, used, position[local], _trimmed(batch, rows), lead, stack_tables(
                [self.members[i].prompt for i in used])

    def states(self, batch: dict, member: torch.Tensor) -> torch.Tensor:
        """(batch, hidden): what each row's member's verbalizer scores (members with a verbalizer
        reading the whole sequence have no such states)."""
        out = None
        for rows, used, index, sub, lead, tables in self._parts(batch, member):
            if getattr(lead.verbalizer, "reads_sequence", False):
                raise XPromptError("a decoder verbalizer scores the whole sequence: such members have no states")
            states = lead.states(sub, tables, index)
            if rows is None:
                return states
            if out is None:
                out = states.new_zeros(len(member), states.shape[-1])
            out[rows] = states
        return out

    def scores(self, batch: dict, member: torch.Tensor) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(rows of the batch, their member, that member's float32 label scores of them), per member present."""
        scored = []
        for rows, used, index, sub, lead, tables in self._parts(batch, member):
            if getattr(lead.verbalizer, "reads_sequence", False):
                hidden, mask = lead.sequence(sub["input_ids"], sub["attention_mask"], tables, index)
            else:
                hidden, mask = lead.states(sub, tables, index), None
            for j, i in enumerate(used):
                mine = (index == j).nonzero().flatten()
                if len(used) > 1:
                    hidden_j, mask_j = hidden[mine], None if mask is None else mask[mine]
                else:
                    hidden_j, mask_j = hidden, mask
                logits = self.members[i].verbalizer(*((hidden_j,) if mask_j is None else (hidden_j, mask_j)))
                scored.append((mine if rows is None else rows[mine], i, logits.float()))
        return scored

    def forward(self, batch: dict, member: torch.Tensor) -> torch.Tensor:
        """(batch, most labels) float32 label scores; past a row's member's labels, ``-inf``."""
        scored = self.scores(batch, member)
        width = max((logits.shape[-1] for *_, logits in scored), default=0)
        out = torch.full((len(member), width), float("-inf"), device=batch["input_ids"].device)
        for rows, _, logits in scored:
            out[rows, : logits.shape[-1]] = logits
        return out
