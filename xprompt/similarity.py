"""Prompt-to-prompt similarity, the measures of "On Transferability of Prompt Tuning" (Su et al. 2022).

Pure functions over saved tensors, compared on what the method trains (its
``similarity_tensors``: a prefix's keys and values, not its fixed placeholders; a unified
prompt's vectors and tower), plus one that asks the backbone which FFN neurons a prompt activates:
- ``flat_cosine``: cosine of the two prompts flattened (every vector of every layer);
- ``mean_cosine``: cosine of the mean prompt vector (per tensor, concatenated);
- ``neuron_overlap``: of the FFN neurons either prompt activates, the fraction both activate
  (intersection over union), from ``activated_neurons``.
"""

from __future__ import annotations

import torch

from .errors import XPromptError
from .prompts import method_class

MEASURES = ("flat", "mean", "neurons")


def _prompt_tensors(tensors: dict[str, torch.Tensor], method: str | None = None) -> list[torch.Tensor]:
    """What ``method`` trains, from its saved tensors (without a method: the input and per-layer vectors)."""
    if method is not None:
        return [t.float() for t in method_class(method).similarity_tensors(tensors)]
    return [tensors[k].float() for k in ("prompt_embeddings", "layer_prompts") if k in tensors]


def prompt_shapes(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """The names and shapes of every prompt tensor a saved prompt holds (not its verbalizer's, whose
    label set may differ): two prompts with equal shapes load into the same model (a unified prompt's
    tower of other depth, or a prefix of other width, does not)."""
    return [(name, tuple(t.shape)) for name, t in sorted(tensors.items()) if not name.startswith("verbalizer.")]


def _compared(a: dict, b: dict, method: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ta, tb = _prompt_tensors(a, method), _prompt_tensors(b, method)
    shapes_a, shapes_b = [tuple(t.shape) for t in ta], [tuple(t.shape) for t in tb]
    if shapes_a != shapes_b:
        raise XPromptError(f"prompts of different shapes cannot be compared: {shapes_a} vs {shapes_b}")
    return ta, tb


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.reshape(1, -1), y.reshape(1, -1)).item())


def flat_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], method: str | None = None) -> float:
    ta, tb = _compared(a, b, method)
    return _cosine(torch.cat([t.reshape(-1) for t in ta]), torch.cat([t.reshape(-1) for t in tb]))


def mean_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], method: str | None = None) -> float:
    """Cosine of the mean prompt vectors: the mean over positions (the second-last axis), per
    layer and tensor, concatenated (a 1-D tensor, e.g. a tower's bias, as it is)."""
    ta, tb = _compared(a, b, method)
    mean = lambda ts: torch.cat([(t.mean(-2) if t.ndim > 1 else t).reshape(-1) for t in ts])  # noqa: E731
    return _cosine(mean(ta), mean(tb))


def neuron_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean activation masks of the same shape."""
    if a.shape != b.shape:
        raise XPromptError(f"activation masks of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    union = (a | b).sum().item()
    return float((a & b).sum().item() / union) if union else 1.0


FFN_BLOCKS = ("intermediate", "mlp", "DenseReluDense")  # BERT/XLM-R, most decoders, T5/mT5 (under layer[-1])


def _ffn_activations(layer: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is a layer's FFN neuron activations: the block's activation function
    where it is a module of its own (T5/mT5's ``DenseReluDense.act``: ReLU, or the GELU gate of a
    gated FFN; BERT's ``intermediate_act_fn``), else the block itself (BERT/XLM-R ``intermediate``,
    whose output is the activation)."""
    for name, block in layer.named_modules():
        if name.rsplit(".", 1)[-1] in FFN_BLOCKS:
            act = getattr(block, "act", None)
            return act if isinstance(act, torch.nn.Module) else block
    raise XPromptError(f"cannot find the feed-forward block of {type(layer).__name__} to read its neurons")


@torch.no_grad()
def activated_neurons(model, bos_id: int | None, eos_id: int) -> torch.Tensor:
    """(layers, ffn) booleans: the neurons whose activation is positive at any prompt position
    when the backbone reads ``<s> prompt </s>`` (``prompt </s>`` without ``<s>``, as (m)T5), with
    the method's per-layer vectors in place."""
    captured: list[torch.Tensor] = []
    length = model.prompt.length

    def capture(module, args, output):
        captured.append((output[0, model.prompt.offset : model.prompt.offset + length] > 0).any(0))

    handles = [_ffn_activations(layer).register_forward_hook(capture) for layer in model._layers]
    device = model.prompt.embeddings.device
    tok = torch.tensor([[eos_id] if bos_id is None else [bos_id, eos_id]], device=device)
    try:
        model.eval()
        model.encode(tok, torch.ones_like(tok))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured).cpu()


def check_prompt_fits(tensors: dict[str, torch.Tensor], hidden: int, num_layers: int, where: str) -> None:
    """Refuse prompt tensors whose shapes cannot sit in a backbone of this width and depth."""
    for name, tensor in tensors.items():
        if tensor.shape[-1] != hidden:
            raise XPromptError(f"{where}: '{name}' has width {tensor.shape[-1]}, the backbone's hidden size is {hidden}")
    layers = tensors.get("layer_prompts")
    if layers is not None and layers.shape[0] != num_layers - 1:
        raise XPromptError(f"{where}: 'layer_prompts' holds {layers.shape[0]} layers, the backbone has "
                           f"{num_layers} (so {num_layers - 1} are expected)")
