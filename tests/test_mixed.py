"""Mixed-prompt batches (``xprompt.mixed``): rows of one batch using different prompts of one backbone
give the logits each prompt gives in its own batch (fp32, within 1e-5), for every method, on tiny
BERT, XLM-R masked-LM and mT5 models; methods and lengths mixed; members of different label counts."""

import pytest
import torch

from conftest import TEST_DATA
from xprompt.backbones import load_backbone
from xprompt.data import batches, encode, load_split
from xprompt.errors import XPromptError
from xprompt.hardware import compute
from xprompt.mixed import MixedModel
from xprompt.model import EnsembleModel, build_model
from xprompt.tasks import load_task
from xprompt.verbalizers import CenteredVerbalizer, make_verbalizer, task_label_words

XNLI = load_task("xnli")
METHODS = ["soft", "ptuning", "deep", "prefix", "unified"]


@pytest.fixture(scope="module")
def mlm(tiny_xlmr_mlm_dir, tmp_path_factory):
    return load_backbone(str(tiny_xlmr_mlm_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def mt5(tiny_mt5_dir, tmp_path_factory):
    return load_backbone(str(tiny_mt5_dir), tmp_path_factory.mktemp("cache"))


def _batch(bb, rows: int = 10, lang: str = "en", template=None):
    ds = load_split(XNLI, lang, "dev", [TEST_DATA], use_hub=False).select(range(rows))
    batch = next(batches(encode(ds, template or XNLI.template, bb.tokenizer), rows, bb.tokenizer.pad_token_id))
    assert (batch["attention_mask"] == 0).any()  # padded rows: masks and trimming are exercised
    return batch


def _model(bb, method, length, seed, labels=3, kind="centered", readout="mean", **options):
    """A prompt model with random prompt and label tensors (every member differs)."""
    torch.manual_seed(seed)
    if kind == "centered":
        verbalizer = CenteredVerbalizer(labels, bb.hidden_size)
    else:
        verbalizer = make_verbalizer(bb, kind, list(XNLI.labels), task_label_words(XNLI), "en", readout="auto")
        readout = "mask"
    model = build_model(bb, labels, method, length, readout, verbalizer=verbalizer, **options)
    with torch.no_grad():
        for name, p in model.prompt.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if name.startswith("tower.") else 0.5))
        for p in [*model.verbalizer.parameters(), *model.verbalizer.buffers()]:
            p.normal_(0, 0.5)
    return model.eval()


def _shuffled_members(rows: int, members: int, seed: int = 0) -> torch.Tensor:
    """Every member present, rows shuffled across them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(rows) % members)[torch.randperm(rows, generator=g)]


def _assert_mixed_equals_alone(models, batch, member, fused=False):
    mixed = MixedModel(models)
    with torch.no_grad(), compute(mixed, "fp32") if fused else torch.no_grad():
        got = mixed(batch, member)
        for i, model in enumerate(models):
            rows = (member == i).nonzero().flatten()
            alone = model(batch).float()[rows]
            torch.testing.assert_close(got[rows, : alone.shape[1]], alone, atol=1e-5, rtol=1e-5)
            assert torch.isneginf(got[rows, alone.shape[1]:]).all()
    return got


@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_a_mixed_batch_gives_its_one_prompt_logits(method, backbone):
    models = [_model(backbone, method, 4, seed) for seed in range(3)]
    batch = _batch(backbone)
    member = _shuffled_members(10, 3)
    got = _assert_mixed_equals_alone(models, batch, member)
    assert len(MixedModel(models).groups) == 1  # one method, one length: one forward pass
    # the members really differ: each row's scores are its own member's
    other = models[(int(member[0]) + 1) % 3](batch)[0].float()
    assert not torch.allclose(got[0], other, atol=1e-3)


@pytest.mark.parametrize("skip", [True, False], ids=["key-value-prefix", "overwrite"])
@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused"])
@pytest.mark.parametrize("projection", [False, True])
def test_deep_both_readout_paths_per_row(skip, fused, projection, backbone):
    """Deep's key/value prefix becomes one prefix per row, (batch, heads, length, dim), through
    transformers' layers and through the fused inference forward; the overwrite path writes each
    row's own per-layer states."""
    models = [_model(backbone, "deep", 4, seed, readout="both", projection=projection) for seed in range(3)]
    for model in models:
        model.skip_prompt_rows = skip
    assert models[0]._attentions is not None
    batch = _batch(backbone)
    seen = []
    hook = models[0]._layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    _assert_mixed_equals_alone(models, batch, _shuffled_members(10, 3, seed=1), fused=fused)
    hook.remove()
    width = batch["input_ids"].shape[1]
    assert seen[0] == (width if skip else width + 4)  # the mixed pass took the asked path too


@pytest.mark.parametrize("method", METHODS)
def test_masked_lm_label_words_per_row(method, mlm):
    models = [_model(mlm, method, 3, seed, kind="hard") for seed in range(3)]
    batch = _batch(mlm, template=XNLI.languages["en"].template)
    _assert_mixed_equals_alone(models, batch, _shuffled_members(10, 3, seed=2))


@pytest.mark.parametrize("method", METHODS)
def test_seq2seq_decoder_scoring_per_row(method, mt5):
    models = [_model(mt5, method, 3, seed, kind="hard") for seed in range(2)]
    models.append(_model(mt5, method, 3, 7))  # label vectors on the same encoder: another sub-batch
    batch = _batch(mt5, rows=8, template=XNLI.languages["en"].template)
    _assert_mixed_equals_alone(models, batch, _shuffled_members(8, 3, seed=3))
    assert [len(g) for g in MixedModel(models).groups] == [2, 1]


def test_methods_and_lengths_mixed_in_one_call(backbone):
    specs = [("soft", 2), ("deep", 4), ("ptuning", 5), ("deep", 3), ("prefix", 4), ("unified", 2), ("soft", 2),
             ("deep", 4)]
    models = [_model(backbone, method, length, seed) for seed, (method, length) in enumerate(specs)]
    models[-1].skip_prompt_rows = False  # deep on the overwrite path: a sub-batch of its own
    mixed = MixedModel(models)
    assert sorted(map(sorted, mixed.groups)) == [[0, 6], [1], [2], [3], [4], [5], [7]]
    batch = _batch(backbone, rows=20)
    member = _shuffled_members(20, len(models), seed=4)
    _assert_mixed_equals_alone(models, batch, member)
    _assert_mixed_equals_alone(models, batch, member, fused=True)
    # rows of only some members: the others are not run
    some = torch.tensor([1, 3, 1, 5, 3, 1, 5, 5, 1, 3])
    _assert_mixed_equals_alone(models, _batch(backbone), some)


def test_members_with_different_label_counts(backbone):
    models = [_model(backbone, "deep", 4, 0, labels=2), _model(backbone, "deep", 4, 1, labels=5),
              _model(backbone, "soft", 3, 2, labels=3)]
    member = _shuffled_members(10, 3, seed=5)
    got = _assert_mixed_equals_alone(models, _batch(backbone), member)
    assert got.shape == (10, 5)
    probs = torch.softmax(got, -1)
    counts = torch.tensor([2, 5, 3])[member]
    assert all(probs[r, counts[r]:].sum() == 0 for r in range(10))
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))


def test_states_and_ensembles(backbone):
    models = [_model(backbone, method, 4, seed) for seed, method in enumerate(["deep", "prefix", "deep"])]
    batch = _batch(backbone)
    member = _shuffled_members(10, 3, seed=6)
    with torch.no_grad():
        states = MixedModel(models).states(batch, member)
        for i, model in enumerate(models):
            rows = member == i
            torch.testing.assert_close(states[rows], model.states(batch)[rows], atol=1e-5, rtol=1e-5)
        # the ensemble scores its members in one mixed pass: the log of the mean of their probabilities
        expected = torch.stack([torch.softmax(m(batch).float(), -1) for m in models]).mean(0).log()
        torch.testing.assert_close(EnsembleModel(models)(batch), expected, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_refuses_other_backbones_and_bad_indices(backbone, tiny_bert_dir, tmp_path):
    other = load_backbone(str(tiny_bert_dir), tmp_path)
    with pytest.raises(XPromptError, match="share one backbone"):
        MixedModel([_model(backbone, "soft", 2, 0), _model(other, "soft", 2, 1)])
    mixed = MixedModel([_model(backbone, "soft", 2, 0)])
    batch = _batch(backbone)
    with pytest.raises(XPromptError, match="member indices"):
        mixed(batch, torch.full((10,), 1))
    with pytest.raises(XPromptError, match="10 rows"):
        mixed(batch, torch.zeros(3, dtype=torch.long))


def test_deep_per_row_prefix_through_sdpa_and_bf16(backbone):
    """The per-row key/value prefix after a switch to transformers' sdpa (``sdpa_with_prefix``), and
    through ``cpu_attention``'s own bf16 kernel under autocast (to bf16 rounding)."""
    models = [_model(backbone, "deep", 4, seed, readout="mask") for seed in range(3)]
    batch = _batch(backbone)
    member = _shuffled_members(10, 3, seed=7)
    with torch.no_grad(), compute(MixedModel(models), "bf16"):
        got = MixedModel(models)(batch, member)
        for i, model in enumerate(models):
            rows = member == i
            torch.testing.assert_close(got[rows], model(batch).float()[rows], atol=0.05, rtol=0.02)
    backbone.model.set_attn_implementation("sdpa")
    assert models[0]._attentions is not None  # built on cpu_attention: the prefix path stays
    _assert_mixed_equals_alone(models, batch, member)
