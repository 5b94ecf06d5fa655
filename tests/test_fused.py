"""The fused inference forward of BERT-family layers (xprompt.fused) computes what transformers'
layers compute, runs only where it may, and leaves the model as it found it."""

import pytest
import torch

from conftest import TEST_DATA
from xprompt import fused
from xprompt.attention import use_cpu_attention
from xprompt.data import batches, encode, load_split
from xprompt.fused import FusedLayer, fused_layers, fusable
from xprompt import hardware
from xprompt.hardware import compute
from xprompt.model import build_model


def _random_norms(module):
    """Layer norms away from their (1, 0) initialisation, so that swapping two would show."""
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.2)


def _model(which, method, backbone, tiny_xlmr_mlm_dir, tmp_path, readout="both"):
    if which == "bert":
        bb = backbone
    else:
        from xprompt.backbones import load_backbone

        bb = load_backbone(str(tiny_xlmr_mlm_dir), tmp_path)
    torch.manual_seed(0)
    _random_norms(bb.model)
    model = build_model(bb, 3, method, 4, readout).eval()
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.normal_(0, 1.0)
    return model, bb


def _batch(bb, xnli, n=6):
    ds = encode(load_split(xnli, "en", "dev", [TEST_DATA], use_hub=False).select(range(n)), xnli.template, bb.tokenizer)
    batch = next(batches(ds, n, bb.tokenizer.pad_token_id))
    assert (batch["attention_mask"] == 0).any()  # padded rows
    return batch


def _unfused(monkeypatch):
    monkeypatch.setattr(fused, "fusable", lambda module: False)


def _no_fused_forward_left(model):
    return not any(isinstance(m.__dict__.get("forward"), FusedLayer) for m in model.modules())


@pytest.mark.parametrize("which", ["bert", "xlmr"])
@pytest.mark.parametrize("method", ["deep", "soft", "ptuning"])
def test_fused_layers_give_transformers_states(which, method, backbone, tiny_xlmr_mlm_dir, tmp_path, xnli, monkeypatch):
    """fp32: the same states as transformers' layers (deep: with the key/value prefix), and the
    layers' own forward is never called while fused."""
    model, bb = _model(which, method, backbone, tiny_xlmr_mlm_dir, tmp_path)
    batch = _batch(bb, xnli)
    with torch.inference_mode():
        reference = model.states(batch)
        layer_class = type(model._layers[0])
        with monkeypatch.context() as m, compute(model, "fp32"):
            assert all(isinstance(layer.__dict__.get("forward"), FusedLayer) for layer in model._layers)
            m.setattr(layer_class, "forward", lambda *a, **k: pytest.fail("transformers' layer forward ran"))
            got = model.states(batch)
    assert _no_fused_forward_left(model)
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["bert", "xlmr"])
def test_fused_layers_in_bf16_stay_within_bf16_rounding(which, backbone, tiny_xlmr_mlm_dir, tmp_path, xnli, monkeypatch):
    model, bb = _model(which, "deep", backbone, tiny_xlmr_mlm_dir, tmp_path)
    batch = _batch(bb, xnli)
    with torch.inference_mode():
        with compute(model, "bf16"):
            got = model.states(batch).float()
        with monkeypatch.context() as m:
            _unfused(m)
            with compute(model, "bf16"):
                reference = model.states(batch).float()
        with compute(model, "fp32"):
            exact = model.states(batch)
    # GELU runs inside the matmul on its float32 sums: no further from fp32 than transformers' bf16
    assert (got - exact).abs().max() <= 1.5 * (reference - exact).abs().max() + 1e-3
    assert torch.nn.functional.cosine_similarity(got, reference).min() > 0.999


def test_gradients_on_keep_transformers_forward(backbone, xnli):
    """Entered with gradients on, nothing is installed; gradients on inside a fused region run the
    layers' own forward, so the prompt still gets its gradient."""
    model = build_model(backbone, 3, "deep", 4, "mask")
    batch = _batch(backbone, xnli)
    with compute(model, "fp32"):
        assert _no_fused_forward_left(model)
    model.zero_grad(set_to_none=True)
    model.states(batch).pow(2).sum().backward()
    expected = model.prompt.layer_prompts.grad.clone()
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), compute(model, "fp32"):
        assert not _no_fused_forward_left(model)
        with torch.enable_grad():
            model.states(batch).pow(2).sum().backward()
    torch.testing.assert_close(model.prompt.layer_prompts.grad, expected)


def test_a_hook_on_a_sub_module_still_fires(backbone, xnli):
    """Neuron similarity reads the feed-forward activations through forward hooks: a layer with a
    hooked sub-module runs transformers' forward, and the hook sees what it would have seen."""
    model = build_model(backbone, 3, "soft", 4, "mask").eval()
    batch = _batch(backbone, xnli)
    seen = []
    handle = model._layers[1].intermediate.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    with torch.inference_mode():
        model.states(batch)
        with compute(model, "fp32"):
            model.states(batch)
    handle.remove()
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0])


def test_an_error_restores_every_layer(backbone, xnli):
    model = build_model(backbone, 3, "deep", 4, "mask").eval()
    with pytest.raises(RuntimeError, match="boom"), torch.inference_mode(), compute(model, "fp32"):
        assert not _no_fused_forward_left(model)
        raise RuntimeError("boom")
    assert _no_fused_forward_left(model)


def test_a_nested_region_keeps_the_outer_one(backbone):
    model = build_model(backbone, 3, "deep", 4, "mask").eval()
    with torch.inference_mode(), compute(model, "fp32"):
        outer = [layer.__dict__["forward"] for layer in model._layers]
        with compute(model, "fp32"):
            assert all(layer.__dict__["forward"] is f for layer, f in zip(model._layers, outer))
        assert all(layer.__dict__.get("forward") is f for layer, f in zip(model._layers, outer))
    assert _no_fused_forward_left(model)


def test_without_onednn_the_plain_matmuls_give_the_same_states(backbone, xnli, monkeypatch):
    model = build_model(backbone, 3, "deep", 4, "mean").eval()
    batch = _batch(backbone, xnli)
    with torch.inference_mode():
        reference = model.states(batch)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        with compute(model, "fp32"):
            assert all(layer.forward.qkv.packed is None for layer in model._layers)
            got = model.states(batch)
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("capability", ["AVX2", "AVX512", "DEFAULT", "SVE256"])
def test_float32_packs_at_avx2_and_avx512(backbone, xnli, monkeypatch, capability):
    """float32 runs on weights packed for oneDNN at torch capability AVX2 and AVX512 (faster than
    MKL's sgemm at both, scripts/pack_rule.py) and on MKL's plain matmuls elsewhere, with the same
    states either way."""
    model = build_model(backbone, 3, "deep", 4, "mean").eval()
    batch = _batch(backbone, xnli)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    packs = capability in ("AVX2", "AVX512") and torch.backends.mkldnn.is_available()
    with torch.inference_mode():
        reference = model.states(batch)
        with compute(model, "fp32"):
            assert all((layer.forward.down.packed is not None) == packs for layer in model._layers)
            assert all((layer.forward.qkv.packed is not None) == packs for layer in model._layers)
            got = model.states(batch)
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)


def test_bf16_always_packs(backbone):
    """bf16 weights pack whatever the float32 rule, where the CPU runs bf16 (oneDNN packs no bf16
    weight on an AVX2-only CPU)."""
    model = build_model(backbone, 3, "deep", 4, "mean").eval()
    if not (torch.backends.mkldnn.is_available() and hardware.cpu_bf16()[0]):
        pytest.skip("no oneDNN or no native bf16 on this CPU")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), fused_layers(model, pack_float32=False):
        assert all(layer.forward.down.packed is not None for layer in model._layers)


@pytest.mark.parametrize("act", ["relu", "gelu_new", "gelu"])
def test_any_activation_and_a_bare_encoder(act):
    """A BERT encoder built by the user (no prompt): the fused layers compute its hidden states,
    whatever its activation (only the exact GELU runs inside oneDNN's matmul)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, hidden_act=act)
    model = BertModel(config, add_pooling_layer=False).eval()
    _random_norms(model)
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert not any(fusable(m) for m in model.modules())  # transformers' sdpa: not xprompt's attention
        assert use_cpu_attention(model)
        with fused_layers(model):
            layers = model.encoder.layer
            assert all(isinstance(layer.forward, FusedLayer) for layer in layers)
            assert all(layer.forward.up.gelu == (act == "gelu") for layer in layers)
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)


def test_decoders_and_other_devices_are_left_alone():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, is_decoder=True, add_cross_attention=True)
    model = BertModel(config, add_pooling_layer=False)
    use_cpu_attention(model)
    assert not any(fusable(m) for m in model.modules())
    encoder = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=37), add_pooling_layer=False)
    assert use_cpu_attention(encoder)
    with torch.no_grad(), fused_layers(encoder, device="cuda"):
        assert _no_fused_forward_left(encoder)


@pytest.mark.parametrize("which", ["bert", "xlmr"])
def test_int8_products_stay_near_fp32_and_are_opt_in(which, backbone, tiny_xlmr_mlm_dir, tmp_path, xnli, monkeypatch):
    """``--int8``: the four matrix products of every fused layer on int8 weights (per-row scales,
    inputs quantised per call). On the tiny fixture the states stay within 5% of fp32's scale
    (cosine > 0.99) and most predicted labels agree; nothing uses it unless asked, and the layers
    come back as they were."""
    import numpy as np

    from xprompt.evaluation import predict

    if not fused.int8_available():
        pytest.skip("this PyTorch has no quantized engine")
    model, bb = _model(which, "deep", backbone, tiny_xlmr_mlm_dir, tmp_path)
    batch = _batch(bb, xnli)
    calls = []
    real = fused._int8_pack
    monkeypatch.setattr(fused, "_int8_pack", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        with compute(model, "fp32"):
            exact = model.states(batch)
        with compute(model, "auto"):
            model.states(batch)
        assert not calls  # not by default, in any dtype
        with compute(model, "fp32", int8=True):
            got = model.states(batch)
            assert all(isinstance(layer.__dict__.get("forward"), FusedLayer) for layer in model._layers)
    assert calls and _no_fused_forward_left(model)
    assert (got - exact).abs().max() <= 0.05 * exact.abs().max()
    assert torch.nn.functional.cosine_similarity(got, exact).min() > 0.99
    ds = encode(load_split(xnli, "en", "dev", [TEST_DATA], use_hub=False), xnli.template, bb.tokenizer)
    pad = bb.tokenizer.pad_token_id
    agree = np.mean(predict(model, ds, 8, pad, "fp32") == predict(model, ds, 8, pad, "fp32", int8=True))
    assert agree >= 0.8, agree


@pytest.mark.parametrize("which", ["bert", "xlmr"])
@pytest.mark.parametrize("method", ["deep", "soft"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_mask_readout_computes_the_last_layer_at_the_mask_alone(which, method, dtype, backbone, tiny_xlmr_mlm_dir,
                                                                   tmp_path, xnli, monkeypatch):
    """``kept_rows``: with the ``<mask>`` state read, the fused last layer computes each row's mask
    position only (deep: the key/value prefix path; soft: the prompt rows in the sequence), and the
    states are those of the whole layer, padded rows included."""
    import contextlib

    import xprompt.model as model_module

    model, bb = _model(which, method, backbone, tiny_xlmr_mlm_dir, tmp_path, readout="mask")
    batch = _batch(bb, xnli)
    seen = []
    call = FusedLayer.__call__

    def watched(self, *args, **kwargs):
        seen.append(self.keep is not None)
        out = call(self, *args, **kwargs)
        assert out.shape == args[0].shape
        return out

    monkeypatch.setattr(FusedLayer, "__call__", watched)
    with torch.inference_mode(), compute(model, dtype):
        got = model.states(batch).float()
        assert seen == [False] * (len(model._layers) - 1) + [True]
        assert model._layers[-1].__dict__["forward"].keep is None  # set for the one call only
        with monkeypatch.context() as m:
            m.setattr(model_module, "kept_rows", lambda layers, positions: contextlib.nullcontext())
            whole = model.states(batch).float()
    assert seen[len(model._layers):] == [False] * len(model._layers)
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
