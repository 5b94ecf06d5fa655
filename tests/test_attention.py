"""xprompt's CPU attention: the same sums as transformers' sdpa, and sdpa itself wherever it does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from xprompt.attention import NAME, cpu_attention, use_cpu_attention
from xprompt.backbones import load_backbone
from xprompt.data import batches, encode, load_split
from xprompt.evaluation import predict
from xprompt.hardware import autocast
from xprompt.model import build_model


class _Module(torch.nn.Module):
    is_causal = False


def _inputs(dtype, seed=0, batch=5, heads=4, length=11, dim=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(dtype) for _ in range(3))
    lengths = torch.tensor([11, 7, 3, 11, 1])
    keep = torch.arange(length)[None, :] < lengths[:, None]
    mask = keep[:, None, None, :].expand(batch, 1, length, length)  # sdpa's boolean padding mask
    return q, k, v, mask


@pytest.mark.parametrize("masked", [True, False])
def test_bf16_attention_matches_sdpa_in_float32(masked):
    q, k, v, mask = _inputs(torch.bfloat16)
    mask = mask if masked else None
    with torch.inference_mode():
        ours, weights = cpu_attention(_Module(), q, k, v, mask, scaling=0.3)
        # the reference: the same bf16 inputs, attention summed in float32 by sdpa
        ref, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), mask, scaling=0.3)
    assert weights is None and ours.dtype == torch.bfloat16
    assert ours.shape == (5, 11, 4, 8)  # (batch, length, heads, dim), as sdpa returns it
    assert torch.allclose(ours.float(), ref, atol=2e-2, rtol=2e-2)
    if masked:  # a padded key changes nothing: give it garbage and the output stays put
        k2, v2 = k.clone(), v.clone()
        k2[2, :, 5:], v2[2, :, 5:] = 100.0, -100.0
        with torch.inference_mode():
            again, _ = cpu_attention(_Module(), q, k2, v2, mask, scaling=0.3)
        assert torch.equal(again[2, :3], ours[2, :3])


def test_additive_float_mask_is_added():
    q, k, v, mask = _inputs(torch.bfloat16, seed=1)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    with torch.inference_mode():
        a, _ = cpu_attention(_Module(), q, k, v, mask, scaling=0.5)
        b, _ = cpu_attention(_Module(), q, k, v, additive, scaling=0.5)
    assert torch.equal(a, b)


def test_gradients_match_sdpa_in_float32():
    """Training runs through it too: the gradients reaching q, k and v are sdpa's."""
    q, k, v, mask = _inputs(torch.bfloat16, seed=3)
    upstream = torch.randn(5, 11, 4, 8)
    grads = []
    for fn, dtype in ((cpu_attention, torch.bfloat16), (sdpa_attention_forward, torch.float32)):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = fn(_Module(), *leaves, mask, scaling=0.3)
        (out.float() * upstream).sum().backward()
        grads.append([t.grad.float() for t in leaves])
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, atol=5e-2, rtol=5e-2), (ours - ref).abs().max()
    # padded keys get no gradient, as with sdpa
    assert torch.count_nonzero(grads[0][1][2, :, 3:]) == 0 and torch.count_nonzero(grads[0][2][4, :, 1:]) == 0


@pytest.mark.parametrize("case", ["fp32", "dropout", "position_bias"])
def test_everything_else_goes_to_sdpa(case):
    q, k, v, mask = _inputs(torch.float32 if case == "fp32" else torch.bfloat16, seed=2)
    kwargs = {"position_bias": torch.zeros(1, 4, 11, 11, dtype=q.dtype)} if case == "position_bias" else {}
    dropout = 0.5 if case == "dropout" else 0.0
    torch.manual_seed(0)
    ours, _ = cpu_attention(_Module(), q, k, v, mask, dropout=dropout, scaling=0.25, **kwargs)
    torch.manual_seed(0)
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, mask, dropout=dropout, scaling=0.25, **kwargs)
    assert torch.equal(ours, ref)  # bit for bit: it is sdpa


def _random_model(bb, method: str, length: int = 4, scale: float = 1.0, readout: str = "mean"):
    torch.manual_seed(0)
    model = build_model(bb, 3, method, length, readout)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
        for p in model.prompt.parameters():
            p.mul_(scale)
    return model


def _logits(bb, model, batch, impl: str, dtype: str, skip_prompt_rows: bool = True) -> torch.Tensor:
    """The model's logits with the backbone switched to ``impl``; ``skip_prompt_rows=False``: the
    prompt's positions computed as rows of the full sequence (no key/value prefix anywhere)."""
    bb.model.set_attn_implementation(impl)
    model.skip_prompt_rows = skip_prompt_rows
    try:
        with torch.inference_mode(), autocast(dtype):
            return model(batch).float()
    finally:
        bb.model.set_attn_implementation(NAME)
        model.skip_prompt_rows = True


def _prompt_effect(bb, model, batch, dtype: str) -> float:
    """How far the logits move when the prompt's vectors are zeroed (the verbalizer kept)."""
    with_prompt = _logits(bb, model, batch, "sdpa", dtype, skip_prompt_rows=False)
    saved = [p.detach().clone() for p in model.prompt.parameters()]
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.zero_()
    without = _logits(bb, model, batch, "sdpa", dtype, skip_prompt_rows=False)
    with torch.no_grad():
        for p, keep in zip(model.prompt.parameters(), saved):
            p.copy_(keep)
    return (with_prompt - without).abs().max().item()


@pytest.fixture(scope="module")
def switched(tiny_bert_dir, tmp_path_factory):
    from xprompt.tasks import load_task

    bb = load_backbone(str(tiny_bert_dir), tmp_path_factory.mktemp("switched"))
    xnli = load_task("xnli")
    encoded = encode(load_split(xnli, "en", "dev").select(range(40)), xnli.template, bb.tokenizer)
    return bb, encoded, next(batches(encoded, 16, bb.tokenizer.pad_token_id))


def test_backbones_switch(tiny_bert_dir, tiny_mt5_dir, tmp_path):
    bb = load_backbone(str(tiny_bert_dir), tmp_path)
    assert bb.model.config._attn_implementation == NAME
    t5 = load_backbone(str(tiny_mt5_dir), tmp_path)  # an encoder-decoder keeps sdpa (T5's position bias)
    assert t5.model.config._attn_implementation != NAME and not use_cpu_attention(t5.model)


@pytest.mark.parametrize("method", ["soft", "deep", "prefix", "unified"])  # prefix: keys longer than queries
def test_switched_to_sdpa_the_prompt_stays_in_place(switched, method):
    """float32, where both attentions are exact: ours, sdpa on the same model (a deep prompt's
    key/value prefix in place) and sdpa over the full sequence (the prompt's rows computed) agree to
    a tolerance far under the prompt's whole effect on the logits, so a prompt lost on the way (a
    prefix the sdpa path ignored) fails."""
    bb, _, batch = switched
    model = _random_model(bb, method)
    tolerance = 1e-4
    effect = _prompt_effect(bb, model, batch, "fp32")
    assert effect > 20 * tolerance, effect  # 0.007 (soft) to 0.2 (prefix)
    full = _logits(bb, model, batch, "sdpa", "fp32", skip_prompt_rows=False)
    ours = _logits(bb, model, batch, NAME, "fp32")
    sdpa = _logits(bb, model, batch, "sdpa", "fp32")
    assert (ours - full).abs().max() < tolerance, method
    assert (sdpa - full).abs().max() < tolerance, method


def test_bf16_deep_prefix_matches_sdpa(switched):
    """bf16: our kernel with a deep prompt's prefix against sdpa's (prefix in place, and the full
    sequence). The prompt is scaled up (x30, 16 positions) so that its effect on the logits stands
    well above bf16's rounding of them (at x1 it is under it: 0.01 on logits of about 30)."""
    bb, _, batch = switched
    model = _random_model(bb, "deep", length=16, scale=30.0, readout="mask")
    assert model._attentions is not None  # the prefix path: the prompt's rows are never computed
    tolerance = 0.04
    effect = _prompt_effect(bb, model, batch, "bf16")
    assert effect > 4 * tolerance, effect  # about 0.2
    ours = _logits(bb, model, batch, NAME, "bf16")
    for reference in (_logits(bb, model, batch, "sdpa", "bf16"),
                      _logits(bb, model, batch, "sdpa", "bf16", skip_prompt_rows=False)):
        assert (ours - reference).abs().max() < tolerance


@pytest.mark.parametrize("method", ["soft", "deep", "prefix", "unified"])
def test_bf16_predictions_match_fp32(switched, method):
    bb, encoded, _ = switched
    model = _random_model(bb, method)
    pad = bb.tokenizer.pad_token_id
    ours = predict(model, encoded, 16, pad, "bf16")
    fp32 = predict(model, encoded, 16, pad, "fp32")
    assert np.mean(ours == fp32) >= 0.95, method


@pytest.mark.parametrize("mask_kind", ["bool", "additive", None])
def test_prefix_keys_are_seen_by_every_row(mask_kind):
    """A key/value prefix inserted at ``at`` gives what attention over the full sequence gives at
    the other rows (the prefix's columns visible to all, padded keys still hidden)."""
    from xprompt.attention import with_prefix

    q, k, v, mask = _inputs(torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    pk, pv = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 4, 3, 8, generator=g)
    at = 1
    full_k = torch.cat([k[:, :, :at], pk.expand(5, -1, -1, -1), k[:, :, at:]], dim=2)
    full_v = torch.cat([v[:, :, :at], pv.expand(5, -1, -1, -1), v[:, :, at:]], dim=2)
    keep = torch.cat([mask[..., :at], torch.ones(5, 1, 11, 3, dtype=torch.bool), mask[..., at:]], dim=-1)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif mask_kind is None:
        mask, keep = None, None
    ref, _ = sdpa_attention_forward(_Module(), q, full_k, full_v, keep, scaling=0.3)
    k2, v2, widened = with_prefix(k, v, mask, pk, pv, at)
    assert torch.equal(k2, full_k) and torch.equal(v2, full_v)
    assert widened is None if mask_kind is None else widened.shape == (5, 1, 11, 14)
    module = _Module()
    module._xprompt_prefix = (pk, pv, at)
    ours, _ = cpu_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, scaling=0.3)
    assert torch.allclose(ours.float(), ref, atol=3e-2, rtol=3e-2)
