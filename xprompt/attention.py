"""Attention for short bf16 sequences on CPU, registered with transformers' ``AttentionInterface``.

On XNLI-length inputs (about 57 tokens with the prompt, 12 heads of 32 dimensions) PyTorch's fused
CPU attention kernel runs at a tenth of the machine's matmul speed: a fifth of an evaluation, and
its backward pass is slower still. Two batched bf16 matmuls around a float32 softmax do the same
sum faster, forward and backward (``scripts/bench.py`` times both against ``sdpa``). Everything
else goes to transformers' own ``sdpa`` unchanged: GPUs, float32, dropout, T5's position bias,
causal or cross attention.

It also takes a per-layer key/value prefix (``with_prefix``): the deep prompt's positions as keys
and values only. Their own outputs are overwritten by the next layer's prompt vectors (and never
read after the last layer), so computing their queries, attention outputs and feed-forward blocks
is wasted work; with the prefix the encoder runs on the input's own tokens (one prefix for the
batch, or one per row when the rows use different prompts: ``mixed``). A model built on this
attention keeps taking the prefix after a switch to ``sdpa`` (``bench.py`` and the tests compare the
two on one model): ``sdpa`` is registered as ``sdpa_with_prefix``, which inserts a module's prefix
and is transformers' sdpa otherwise. (Other attentions, eager or flash, know no prefix: a model
switched to one of them after it was built would run without its deep prompt; nothing switches so.)
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "xprompt_cpu"
PREFIX = "_xprompt_prefix"  # set on a self-attention module for one forward pass: (keys, values, at)


def with_prefix(key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                prefix_key: torch.Tensor, prefix_value: torch.Tensor, at: int):
    """Keys and values with a prefix's (1, heads, P, dim) inserted at position ``at`` (where the
    prompt sits in the full sequence), and the mask widened by P columns that every row sees. A
    (batch, heads, P, dim) prefix gives each row its own (a mixed-prompt batch, ``mixed``)."""
    batch, length = key.shape[0], prefix_key.shape[2]

    def insert(x, p):  # three copies into one new tensor: torch.cat of these strided views took 6x longer
        out = x.new_empty(batch, x.shape[1], x.shape[2] + length, x.shape[3])
        out[:, :, :at], out[:, :, at : at + length], out[:, :, at + length :] = x[:, :, :at], p, x[:, :, at:]
        return out

    if attention_mask is not None:
        seen = (torch.ones_like if attention_mask.dtype == torch.bool else torch.zeros_like)(attention_mask[..., :1])
        attention_mask = torch.cat([attention_mask[..., :at], seen.expand(*attention_mask.shape[:-1], length),
                                    attention_mask[..., at:]], dim=-1)
    return insert(key, prefix_key), insert(value, prefix_value), attention_mask


def sdpa_with_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *args, **kwargs):
    """transformers' ``sdpa`` with a module's key/value prefix (``PREFIX``) inserted first: what a
    model built on ``cpu_attention`` runs after ``set_attn_implementation("sdpa")``. Without a
    prefix it is ``sdpa_attention_forward`` itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, PREFIX, None)
    if prefix is not None:
        key, value, attention_mask = with_prefix(key, value, attention_mask, *prefix)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    """This module's attention under its name, and ``sdpa`` as ``sdpa_with_prefix`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cpu_attention)  # the same function under the same name
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks sdpa gets
    AttentionInterface.register("sdpa", sdpa_with_prefix)


def prefix_attention_modules(model: nn.Module, layers) -> list[nn.Module] | None:
    """The self-attention modules whose ``cpu_attention`` can take a key/value prefix (BERT and
    XLM-R layers running this module's attention), or None for any other encoder. The prefix
    stays honoured after a switch to ``sdpa`` (no hook on the modules: ``fused`` would step aside)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != NAME or getattr(model, "embeddings", None) is None:
        return None
    modules = [getattr(getattr(layer, "attention", None), "self", None) for layer in layers]
    if not all(hasattr(m, "key") and hasattr(m, "value") and hasattr(m, "attention_head_size") for m in modules):
        return None
    _register()
    return modules


def cpu_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
    """Same contract as transformers' ``sdpa_attention_forward``: (batch, heads, length, dim)
    inputs, a boolean (True = attend) or additive mask, output (batch, length, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, PREFIX, None)
    if prefix is not None:
        key, value, attention_mask = with_prefix(key, value, attention_mask, *prefix)
    if (query.device.type != "cpu" or query.dtype != torch.bfloat16
            or kwargs.get("position_bias") is not None or kwargs.get("is_causal") or getattr(module, "is_causal", False)
            or key.shape[1] != query.shape[1] or dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    # the scores scaled inside one bf16 matmul (float32 accumulation), then upcast by the mask's
    # float32 add and normalised in float32: three passes over the scores where an upcast, a scale,
    # a mask fill and a softmax took four (bf16 softmax kernels are slower than float32 ones)
    q = query.reshape(batch * heads, length, dim)
    kt = key.reshape(batch * heads, keys, dim).transpose(1, 2)
    ignored = q.new_empty(()).expand(batch * heads, length, keys)  # beta=0: baddbmm only takes its shape
    scores = torch.baddbmm(ignored, q, kt, beta=0.0, alpha=scale)
    scores = scores.view(batch, heads, length, keys)
    if attention_mask is None:
        scores = scores.float()
    elif attention_mask.dtype == torch.bool:
        scores = torch.zeros(attention_mask.shape).masked_fill_(~attention_mask, float("-inf")).add(scores)
    else:
        scores = scores.float().add_(attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch * heads, length, keys)
    out = torch.bmm(probs, value.reshape(batch * heads, keys, dim)).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch an encoder that runs transformers' ``sdpa`` to ``cpu_attention`` (which hands every
    case it does not cover back to ``sdpa``). Returns whether it switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or config.is_encoder_decoder:
        return False
    _register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):  # a model that only knows its built-in backends
        return False
    return config._attn_implementation == NAME
