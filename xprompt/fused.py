"""An inference forward for BERT-family encoder layers (BERT, XLM-R, the embedded e5) on CPU.

transformers runs one encoder layer as a tree of seven modules: three query/key/value projections
that each cast the same input under autocast, GELU after the intermediate matmul as a pass of its
own, and Python calls around every step. When gradients are off and the weights cannot change
(``xprompt eval``, the evaluations inside training), ``fused_layers`` gives each such layer, for
the duration, a forward that projects query, key and value in one matmul, runs every projection
on weights packed once for oneDNN (PyTorch's own CPU kernels, as ``torch.compile`` packs them for
CPU inference) with GELU applied inside the intermediate matmul, and keeps the residual stream and
the layer norms in float32 as autocast does. Attention is ``attention.cpu_attention``, so a deep
prompt's key/value prefix is honoured. ``scripts/bench.py`` times it against transformers' layers.

A layer keeps transformers' forward whenever the fused one would not compute the same function:
gradients on, a layer in training mode (dropout), decoders and cross-attention, a cache, chunked
feed-forward, relative positions, another attention implementation, or hooks on any of its
sub-modules (neuron similarity reads the feed-forward activations through them).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import NAME, cpu_attention

PACK_ROWS = 768  # the rows a packed weight is laid out for (oneDNN's hint); a batch of any size runs on it


def _linear(module) -> bool:
    return isinstance(module, nn.Linear) and module.bias is not None


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a BERT-style post-norm encoder layer that ``FusedLayer`` computes exactly."""
    attention = getattr(layer, "attention", None)
    self_attn, out = getattr(attention, "self", None), getattr(attention, "output", None)
    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if None in (self_attn, out, intermediate, output):
        return False
    config = getattr(self_attn, "config", None)
    return (all(_linear(getattr(self_attn, n, None)) for n in ("query", "key", "value"))
            and all(_linear(getattr(m, "dense", None)) for m in (out, intermediate, output))
            and all(isinstance(getattr(m, "LayerNorm", None), nn.LayerNorm) for m in (out, output))
            and callable(getattr(intermediate, "intermediate_act_fn", None))
            and not getattr(layer, "is_decoder", False) and not hasattr(layer, "crossattention")
            and not getattr(layer, "chunk_size_feed_forward", 0)
            and not getattr(self_attn, "is_causal", False)
            and getattr(self_attn, "position_embedding_type", "absolute") == "absolute"
            and getattr(config, "_attn_implementation", None) == NAME)


def _exact_gelu(fn) -> bool:
    """transformers' ``GELUActivation`` (erf form), which oneDNN's "gelu" post-op computes."""
    from transformers.activations import GELUActivation

    return isinstance(fn, GELUActivation) and getattr(fn, "act", None) is F.gelu


def int8_available() -> bool:
    """Whether this PyTorch has a quantized engine for dynamic int8 linear layers (fbgemm / x86 / onednn)."""
    try:
        return torch.backends.quantized.engine in ("fbgemm", "x86", "onednn", "qnnpack") and bool(
            set(torch.backends.quantized.supported_engines) - {"none"})
    except (AttributeError, RuntimeError):
        return False


def _int8_pack(weight: torch.Tensor, bias: torch.Tensor):
    """``weight`` quantised to int8 per output row (symmetric, scale = max |w| / 127) and packed
    with ``bias`` for ``quantized.linear_dynamic``."""
    import warnings

    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # quantized tensor constructors warn of a future deprecation
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, bias.detach().float())


class _Projection:
    """``x @ weight.T + bias`` (then GELU if asked) on a weight packed for oneDNN, or plain
    ``F.linear`` where packing is unavailable (a PyTorch built without oneDNN, an unsupported dtype);
    with ``int8``, on int8 weights (per-row scales) and inputs quantised per call (PyTorch's dynamic
    quantized linear: fbgemm on x86, 7-bit inputs so that AVX2's 16-bit sums never saturate)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False, act=None, pack: bool = True,
                 int8: bool = False):
        self.bias, self.gelu, self.act = bias, gelu, act
        self.packed = self.int8 = None
        if int8:
            self.int8 = _int8_pack(weight, bias)
            self.weight = None
            return
        if pack and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
                torch.ops.mkldnn._linear_pointwise(weight.new_zeros(1, weight.shape[1]), self.packed, bias,
                                                   "none", [], "none")
            except (RuntimeError, AttributeError, NotImplementedError):
                self.packed = None
        self.weight = weight if self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.int8 is not None:
            y = torch.ops.quantized.linear_dynamic(rows.float(), self.int8, True)
            y = F.gelu(y) if self.gelu else y
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "gelu" if self.gelu else "none", [], "none")
        else:
            y = F.linear(rows, self.weight, self.bias)
            y = F.gelu(y) if self.gelu else y
        y = self.act(y) if self.act is not None else y
        return y.view(*x.shape[:-1], y.shape[-1])


class FusedLayer:
    """The forward of one fusable layer (see ``fusable``), installed on it by ``fused_layers``."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, pack_float32: bool = True, int8: bool = False):
        attention = layer.attention
        sa = attention.self
        self.layer, self.dtype, self.attention = layer, dtype, sa
        self.heads, self.head_size = sa.num_attention_heads, sa.attention_head_size
        self.scaling = getattr(sa, "scaling", None)
        self.submodules = [m for m in layer.modules() if m is not layer]

        def cast(t):
            return t.detach().to(dtype)

        pack = dtype == torch.bfloat16 or pack_float32
        if int8:  # int8 products take float32 inputs and give float32 outputs
            self.dtype = dtype = torch.float32
        extra = {"int8": True} if int8 else {}

        qkv_w = torch.cat([cast(sa.query.weight), cast(sa.key.weight), cast(sa.value.weight)])
        qkv_b = torch.cat([cast(sa.query.bias), cast(sa.key.bias), cast(sa.value.bias)])
        self.qkv = _Projection(qkv_w, qkv_b, pack=pack, **extra)
        self.out = _Projection(cast(attention.output.dense.weight), cast(attention.output.dense.bias), pack=pack, **extra)
        act = layer.intermediate.intermediate_act_fn
        exact = _exact_gelu(act)
        self.up = _Projection(cast(layer.intermediate.dense.weight), cast(layer.intermediate.dense.bias), gelu=exact,
                              act=None if exact else act, pack=pack, **extra)
        self.down = _Projection(cast(layer.output.dense.weight), cast(layer.output.dense.bias), pack=pack, **extra)
        self.norm1, self.norm2 = attention.output.LayerNorm, layer.output.LayerNorm
        self.keep = None  # (batch,) positions: the only rows this layer's output is read at (``kept_rows``)

    def applies(self, encoder_hidden_states, cache) -> bool:
        return (not torch.is_grad_enabled() and not self.layer.training and encoder_hidden_states is None
                and cache is None and not any(m._forward_hooks or m._forward_pre_hooks for m in self.submodules)
                and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 encoder_hidden_states=None, encoder_attention_mask=None, cache=None, **kwargs) -> torch.Tensor:
        if not self.applies(encoder_hidden_states, cache):
            return type(self.layer).forward(self.layer, hidden_states, attention_mask, encoder_hidden_states,
                                            encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)
        batch, length, width = hidden_states.shape
        residual = hidden_states.float()
        qkv = self.qkv(residual.to(self.dtype)).view(batch, length, 3, self.heads, self.head_size)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, batch, heads, length, head size)
        query, mask = qkv[0], attention_mask
        keep = self.keep if not self.layer._forward_hooks else None  # a hook after the layer may read any row
        if keep is not None:  # one query row per sequence: keys and values of every position, the rest for one
            rows = torch.arange(batch, device=keep.device)
            query, residual = query[rows, :, keep].unsqueeze(2), residual[rows, keep].unsqueeze(1)
            if mask is not None and mask.shape[-2] == length:  # a mask with a row per query position
                mask = mask.expand(batch, *mask.shape[1:])[rows, :, keep].unsqueeze(2)
        context, _ = cpu_attention(self.attention, query, qkv[1], qkv[2], mask, scaling=self.scaling)
        hidden = residual + self.out(context.reshape(batch, query.shape[2], width))  # float32, one pass
        hidden = F.layer_norm(hidden, (width,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        out = hidden + self.down(self.up(hidden.to(self.dtype)))
        out = F.layer_norm(out, (width,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        if keep is None:
            return out
        full = hidden_states.float().clone()  # rows never read keep the layer's input
        full[rows, keep] = out[:, 0]
        return full


@contextlib.contextmanager
def kept_rows(layers, positions: torch.Tensor | None):
    """For the duration, the last of ``layers``, where it runs ``FusedLayer`` (``fused_layers``), computes
    its output at ``positions`` alone, one per row: the caller reads nothing else of it (a ``<mask>``
    readout). The other rows' queries, attention outputs and feed-forward blocks (three quarters of
    the layer) are skipped, and those rows hold the layer's input. Nothing changes where the layer is
    not fused or has a forward hook (which might read every row), or ``positions`` is None."""
    fused = layers[-1].__dict__.get("forward") if len(layers) and positions is not None else None
    if not isinstance(fused, FusedLayer):
        yield
        return
    fused.keep = positions
    try:
        yield
    finally:
        fused.keep = None


@contextlib.contextmanager
def fused_layers(model: nn.Module, device: str = "cpu", pack_float32: bool = True, int8: bool = False):
    """For the duration, every fusable encoder layer of ``model`` on CPU runs ``FusedLayer``'s
    forward when gradients are off. Weights are packed on entry, in the dtype the layer's
    projections compute in (bf16 under CPU autocast or when held in bf16, else their own); nothing
    happens when entered with gradients on or on another device. ``pack_float32=False`` keeps
    float32 projections on plain ``F.linear`` (bf16 ones always pack). ``int8`` (opt-in: ``--int8``)
    runs the four matrix products of every layer on int8 weights instead (``_Projection``); the
    rest of the layer stays float32. Restored on exit."""
    if device != "cpu" or torch.is_grad_enabled():
        yield
        return
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    installed = []
    for layer in model.modules():
        if isinstance(layer.__dict__.get("forward"), FusedLayer) or not fusable(layer):
            continue  # already fused by an enclosing region, or not a layer we compute
        weight = layer.attention.self.query.weight
        if weight.device.type != "cpu" or layer.output.LayerNorm.weight.dtype != torch.float32:
            continue
        layer.forward = FusedLayer(layer, torch.bfloat16 if autocast else weight.dtype, pack_float32, int8)
        installed.append(layer)
    try:
        yield
    finally:
        for layer in installed:
            layer.__dict__.pop("forward", None)
