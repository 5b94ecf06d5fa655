import pytest
import torch

from conftest import TEST_DATA
from xprompt.config import TrainConfig
from xprompt.data import batches, encode, load_split
from xprompt.errors import XPromptError
from xprompt.model import build_model, load_run_model
from xprompt.prompts import DeepPrompt, ProjectedConfig, build_prompt, method_names
from xprompt.store import save_prompt
from xprompt.start import init_prompt_and_verbalizer, prompt_card
from xprompt.verbalizers import SoftVerbalizer


def _batch(xnli, tokenizer, n=6):
    ds = encode(load_split(xnli, "en", "dev", [TEST_DATA], use_hub=False).select(range(n)), xnli.template, tokenizer)
    return ds, next(batches(ds, n, tokenizer.pad_token_id))


@pytest.mark.parametrize("method", [m for m in method_names() if m != "none"])  # none: no prompt (tests/test_tune.py)
def test_backbone_frozen_and_gradients_reach_prompt(backbone, xnli, tokenizer, method):
    model = build_model(backbone, 3, method, 4, "mask")
    ds, batch = _batch(xnli, tokenizer)
    init_prompt_and_verbalizer(model, backbone, ds, TrainConfig(method=method, prompt_length=4, dtype="fp32"))
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trainable = {id(p) for p in model.trainable_parameters()}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in trainable]
    assert frozen == []
    assert all(not p.requires_grad for p in backbone.model.parameters())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
        loss.backward()
        if method == "prefix":  # keys and values only: the placeholders reach no input token
            assert model.prompt.embeddings.grad is None and not model.prompt.embeddings.requires_grad
            assert model.prompt.keys.grad.abs().sum() > 0 and model.prompt.values.grad.abs().sum() > 0
        else:
            assert model.prompt.embeddings.grad is not None and model.prompt.embeddings.grad.abs().sum() > 0
        if method == "deep":
            assert model.prompt.layer_prompts.grad.abs().sum() > 0
        assert model.verbalizer.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in backbone.model.parameters())


def test_training_mode_keeps_backbone_in_eval(backbone, xnli):
    model = build_model(backbone, 3, "soft", 4, "mask")
    model.train()
    assert model.prompt.training and not backbone.model.training


def test_verbalizer_init_equals_class_means(backbone, xnli, tokenizer):
    cfg = TrainConfig(method="soft", prompt_length=4, init_examples=1000, dtype="fp32")
    model = build_model(backbone, 3, cfg.method, cfg.prompt_length, cfg.readout)
    ds = encode(load_split(xnli, "en", "train", [TEST_DATA], use_hub=False), xnli.template, tokenizer)
    init_prompt_and_verbalizer(model, backbone, ds, cfg)
    with torch.no_grad():
        batch = next(batches(ds, len(ds), tokenizer.pad_token_id))
        states = model.states(batch)
    for c in range(3):
        expected = states[batch["labels"] == c].mean(0)
        torch.testing.assert_close(model.verbalizer.weight[c], expected, rtol=1e-4, atol=1e-5)
    # nearest-class-mean scoring: the class whose vector is closest wins
    v = SoftVerbalizer(2, 3)
    v.weight.data = torch.tensor([[0.0, 0, 0], [1.0, 1, 1]])
    assert v(torch.tensor([[0.1, 0.2, 0.0], [0.9, 0.8, 1.2]])).argmax(-1).tolist() == [0, 1]


def _soft_twin(model, backbone):
    """A soft prompt model holding ``model``'s input vectors and label vectors."""
    soft = build_model(backbone, 3, "soft", model.prompt.length, "mask")
    soft.prompt.embeddings.data.copy_(model.prompt.embeddings.data)
    soft.verbalizer.weight.data.copy_(model.verbalizer.weight.data)
    return soft


def test_deep_prompt_starts_as_the_soft_prompt(backbone, xnli, tokenizer):
    """Initialised from the states the input prompt produces, the deep prompt gives the same
    output as the input-level prompt before training; changing a layer's vectors changes it."""
    cfg = TrainConfig(method="deep", prompt_length=3, dtype="fp32")
    ds, batch = _batch(xnli, tokenizer)
    deep = build_model(backbone, 3, "deep", 3, "mask")
    init_prompt_and_verbalizer(deep, backbone, ds, cfg)
    soft = _soft_twin(deep, backbone)
    deep_logits = deep(batch)
    torch.testing.assert_close(soft(batch), deep_logits, rtol=1e-4, atol=1e-4)
    deep.prompt.layer_prompts.data[0] += 1.0
    assert not torch.allclose(deep(batch), deep_logits, atol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "mt5"])
def test_prefix_starts_as_the_soft_prompt_and_is_a_key_value_prefix(backbone, tiny_mt5_dir, tmp_path, xnli, tokenizer, kind):
    """The prefix method starts from the keys and values the input prompt produces (on the tiny BERT,
    the soft prompt's output); then only its keys and values matter, not the placeholders."""
    if kind == "mt5":
        from xprompt.backbones import load_backbone

        backbone = load_backbone(str(tiny_mt5_dir), tmp_path)
    cfg = TrainConfig(method="prefix", prompt_length=3, dtype="fp32")
    ds, batch = _batch(xnli, backbone.tokenizer)
    prefix = build_model(backbone, 3, "prefix", 3, "mask")
    init_prompt_and_verbalizer(prefix, backbone, ds, cfg)
    soft = _soft_twin(prefix, backbone)
    with torch.no_grad():
        logits = prefix(batch)
        if kind == "bert":  # (mT5's relative positions make the bare prompt's keys differ in context)
            torch.testing.assert_close(soft(batch), logits, rtol=1e-4, atol=1e-4)
        prefix.prompt.embeddings.data.normal_()  # placeholders: no effect
        torch.testing.assert_close(prefix(batch), logits, rtol=1e-5, atol=1e-5)
        prefix.prompt.values.data[-1] += 1.0  # the last layer's values: an effect
        assert not torch.allclose(prefix(batch), logits, atol=1e-4)
    n_layers = backbone.num_layers
    assert sum(p.numel() for p in prefix.prompt.param_groups(1.0)[0]["params"]) == 2 * n_layers * 3 * backbone.hidden_size


def test_prompt_save_load_round_trip(backbone, xnli, tokenizer, tmp_path):
    cfg = TrainConfig(method="deep", prompt_length=3, dtype="fp32", readout="mask")
    ds, batch = _batch(xnli, tokenizer)
    model = build_model(backbone, 3, cfg.method, 3, "mask")
    init_prompt_and_verbalizer(model, backbone, ds, cfg)
    save_prompt(tmp_path, {**model.prompt.tensors(), **model.verbalizer.tensors()},
                prompt_card(cfg, xnli, backbone, {}, model.verbalizer.kind, model.prompt))
    loaded, card = load_run_model(tmp_path, backbone)
    for name, tensor in model.prompt.tensors().items():
        assert torch.equal(tensor, loaded.prompt.tensors()[name])
    assert torch.equal(model.verbalizer.weight, loaded.verbalizer.weight)
    assert card["method"] == "deep" and card["backbone_sha256"] == backbone.sha256
    with torch.no_grad():
        torch.testing.assert_close(model(batch), loaded(batch))


def test_prompt_shape_mismatch_is_refused():
    prompt = build_prompt("soft", 8, 2, prompt_length=4)
    with pytest.raises(XPromptError, match=r"'prompt_embeddings' has shape \(5, 8\), this model needs \(4, 8\)"):
        prompt.load_tensors({"prompt_embeddings": torch.zeros(5, 8)}, "p")
    with pytest.raises(XPromptError, match="'layer_prompts' is missing"):
        DeepPrompt(ProjectedConfig(prompt_length=4), 8, 2).load_tensors({"prompt_embeddings": torch.zeros(4, 8)}, "p")
    with pytest.raises(XPromptError, match="unknown method 'lora'; known: soft, ptuning, deep"):
        build_prompt("lora", 8, 2, prompt_length=4)


def test_label_without_examples_starts_at_the_mean_of_all_states():
    verbalizer = SoftVerbalizer(3, 2)
    states = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    missing = verbalizer.init_from_class_means(states, torch.tensor([0, 0, 2]))
    assert missing == [1]
    torch.testing.assert_close(verbalizer.weight.data, torch.tensor([[2.0, 0.0], [4 / 3, 4 / 3], [0.0, 4.0]]))


def test_centered_verbalizer_keeps_its_ranking_when_states_shrink_to_the_centre():
    from xprompt.verbalizers import CenteredVerbalizer

    torch.manual_seed(0)
    verbalizer = CenteredVerbalizer(3, 8)
    states, labels = torch.randn(30, 8) + 2.0, torch.arange(30) % 3
    states[labels == 1] += 1.5
    assert verbalizer.init_from_class_means(states, labels) == []
    means = torch.stack([states[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(verbalizer.center, means.mean(0))
    h = torch.randn(5, 8) + 2.0
    logits = verbalizer(h)
    # (h - c) . (w - c) by hand; zero at the centre; a state pulled halfway in keeps its ranking
    torch.testing.assert_close(logits, (h - means.mean(0)) @ (means - means.mean(0)).T)
    torch.testing.assert_close(verbalizer(verbalizer.center[None]), torch.zeros(1, 3), atol=1e-5, rtol=0)
    shrunk = verbalizer.center + 0.5 * (h - verbalizer.center)
    torch.testing.assert_close(verbalizer(shrunk), 0.5 * logits)
    # entailment and contradiction far out on either side, neutral near the middle: a state pulled
    # in towards the centre stays entailment here, while the distance verbalizer turns it neutral
    d, side = torch.zeros(8), torch.zeros(8)
    d[0], side[1] = 2.0, 0.3
    base = torch.full((8,), 1.0)
    vectors = torch.stack([base + d, base + 0.1 * d + side, base - d])
    verbalizer.weight.data.copy_(vectors)
    verbalizer.center.copy_(vectors.mean(0))
    plain = SoftVerbalizer(3, 8)
    plain.weight.data.copy_(vectors)
    far, near = verbalizer.center + 1.0 * d, verbalizer.center + 0.1 * d
    assert verbalizer(far[None]).argmax() == verbalizer(near[None]).argmax() == 0
    assert plain(far[None]).argmax() == 0 and plain(near[None]).argmax() == 1


def test_centered_verbalizer_round_trip_from_the_cli(tiny_bert_dir, tmp_path):
    from test_cli import invoke

    from xprompt.backbones import load_backbone

    runs = tmp_path / "runs"
    ok = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
                "--prompt-length", "3", "--dtype", "fp32", "--verbalizer", "centered", "--run-name", "c")
    assert ok.exit_code == 0, ok.output
    model, card = load_run_model(runs / "c", load_backbone(str(tiny_bert_dir), tmp_path / "cache"))
    assert card["verbalizer"] == "centered" and type(model.verbalizer).__name__ == "CenteredVerbalizer"
    assert model.verbalizer.center.abs().sum() > 0
    from safetensors.torch import load_file

    saved = load_file(str(runs / "c" / "prompt" / "prompt.safetensors"))
    assert torch.equal(saved["verbalizer.center"], model.verbalizer.center)


def test_centered_verbalizer_centre_follows_each_global_batch(backbone, xnli, tokenizer):
    """After a step the centre moves 5% of the way to the batch's mean state, the same whether the
    batch ran whole or in three micro-batches; evaluation leaves it alone."""
    import copy

    from xprompt.training import accumulate_gradients

    ds, batch = _batch(xnli, tokenizer)
    from xprompt.verbalizers import CenteredVerbalizer

    model = build_model(backbone, 3, "deep", 3, "mask", verbalizer=CenteredVerbalizer(3, 32))
    init_prompt_and_verbalizer(model, backbone, ds, TrainConfig(prompt_length=3, dtype="fp32", verbalizer="centered"))
    start = model.verbalizer.center.clone()
    with torch.no_grad():
        model.eval()
        model(batch)
        expected = 0.95 * start + 0.05 * model.states(batch).mean(0)
    assert torch.equal(model.verbalizer.center, start)  # evaluation: no update
    centres = []
    for accum in (1, 3):
        twin = copy.deepcopy(model).train()
        accumulate_gradients(twin, batch, TrainConfig(prompt_length=3, dtype="fp32", grad_accum=accum), torch.device("cpu"))
        centres.append(twin.verbalizer.center)
    torch.testing.assert_close(centres[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(centres[1], centres[0], atol=1e-6, rtol=1e-6)


def _key_value_only_case(which, backbone, tiny_xlmr_mlm_dir, tmp_path):
    if which == "bert":
        return backbone
    from xprompt.backbones import load_backbone

    return load_backbone(str(tiny_xlmr_mlm_dir), tmp_path)


@pytest.mark.parametrize("which", ["bert", "xlmr"])
@pytest.mark.parametrize("readout,position", [("mask", "after-bos"), ("mean", "after-bos"), ("both", "first")])
def test_deep_readouts_skip_the_prompt_rows(which, readout, position, backbone, tiny_xlmr_mlm_dir, tmp_path, xnli):
    """The deep prompt's positions are keys and values only: the readouts run the encoder on the
    input's own rows (never the prompt's) and get the same states and gradients as the full sequence."""
    from xprompt.attention import PREFIX

    bb = _key_value_only_case(which, backbone, tiny_xlmr_mlm_dir, tmp_path)
    torch.manual_seed(0)
    model = build_model(bb, 3, "deep", 4, readout, position=position)
    with torch.no_grad():
        model.prompt.embeddings.normal_(0, 1.0)
        model.prompt.layer_prompts.normal_(0, 1.0)
    assert model._attentions is not None and len(model._attentions) == bb.num_layers
    ds = encode(load_split(xnli, "en", "dev", [TEST_DATA], use_hub=False).select(range(6)), xnli.template, bb.tokenizer)
    batch = next(batches(ds, 6, bb.tokenizer.pad_token_id))
    assert (batch["attention_mask"] == 0).any()  # padded rows: the widened mask is exercised
    seen = []
    hook = model._layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    results = []
    for skip in (False, True):
        model.skip_prompt_rows = skip
        model.zero_grad(set_to_none=True)
        states = model.states(batch)
        states.pow(2).sum().backward()
        results.append((states.detach(), [p.grad.clone() for p in model.prompt.parameters() if p.grad is not None]))
    hook.remove()
    width = batch["input_ids"].shape[1]
    assert seen == [width + 4, width]  # the full sequence, then the input's own rows only
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert len(results[0][1]) == len(results[1][1]) == 2
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(results[0][1], results[1][1]))
    assert all(PREFIX not in m.__dict__ for m in model._attentions)  # nothing left for the next call


def test_key_value_only_path_leaves_nothing_behind_on_error(backbone, xnli, tokenizer):
    """A failed pass must not leave a prefix on the attention modules for the next (full) pass."""
    from xprompt.attention import PREFIX

    model = build_model(backbone, 3, "deep", 4, "mask")
    _, batch = _batch(xnli, tokenizer)
    boom = model._layers[-1].register_forward_pre_hook(lambda m, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        model.states(batch)
    boom.remove()
    assert all(PREFIX not in m.__dict__ for m in model._attentions)
    full = model.encode(batch["input_ids"], batch["attention_mask"])
    assert full.shape[1] == batch["input_ids"].shape[1] + 4


@pytest.mark.parametrize("method", [m for m in method_names() if m != "deep"])
def test_only_the_deep_prompt_skips_rows(backbone, method):
    assert build_model(backbone, 3, method, 4, "mask")._attentions is None
