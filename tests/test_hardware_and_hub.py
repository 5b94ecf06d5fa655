"""The mission's backbones as the hub ships them, and the hardware users have: --dtype auto,
bin-only checkpoints, --revision, native templates, NCCL-safe collectives, sharded models."""

import json
import shutil

import pytest
import torch

from conftest import TEST_DATA
from test_cli import invoke
from xprompt import hardware
from xprompt.config import DType


# ---------------------------------------------------------------- --dtype auto

@pytest.mark.parametrize("level, flags, native", [
    ("AVX512", {"avx512_bf16"}, True),
    ("AVX512", {"amx_tile"}, True),
    ("AVX512", set(), False),   # AVX-512 without BF16 (e.g. Skylake): emulated
    ("AVX2", set(), False),     # the AVX2-only EPYC of the issue
    ("AVX2", {"avx512_bf16"}, False),  # torch held at AVX2 (ATEN_CPU_CAPABILITY): no bf16 unit used
])
def test_auto_dtype_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, level, flags, native):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware, "cpu_capability", lambda: level)
    monkeypatch.setattr(hardware, "_cpu_flag", lambda name: name in flags)
    hardware.cpu_bf16.cache_clear()
    try:
        dtype, reason = hardware.resolve_dtype("auto", "cpu")
        assert dtype is (DType.BF16 if native else DType.FP32)
        assert level in reason
        assert hardware.resolve_dtype("fp32", "cpu")[0] is DType.FP32  # an explicit choice is kept
        assert hardware.resolve_dtype("bf16", "cpu")[0] is DType.BF16
    finally:
        hardware.cpu_bf16.cache_clear()


def test_this_machine_reports_its_capability():
    native, reason = hardware.cpu_bf16()
    assert hardware.cpu_capability() in reason
    assert hardware.resolve_dtype("auto", "cpu")[0] is (DType.BF16 if native else DType.FP32)


@pytest.mark.parametrize("native", [True, False])
def test_train_and_eval_record_the_dtype_auto_chose(tiny_bert_dir, tmp_path, monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: (native, "stand-in CPU (torch capability TEST)"))
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
                 "--prompt-length", 2, "--run-name", "r")
    assert out.exit_code == 0, out.output
    want = "bf16" if native else "fp32"
    assert f"compute: {want} on cpu (stand-in CPU (torch capability TEST))" in out.output
    config = json.loads((runs / "r" / "config.json").read_text())
    assert config["train"]["dtype"] == "auto"  # what was asked ...
    assert config["compute"]["dtype"] == want and "stand-in" in config["compute"]["reason"]  # ... and what ran
    assert config["compute"]["cpu_capability"] == hardware.cpu_capability()
    card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
    assert card["selection"]["dtype"] == want
    ev = invoke("eval", "--run", runs / "r", "--langs", "de", "--data-dir", TEST_DATA)
    assert ev.exit_code == 0, ev.output
    assert json.loads((runs / "r" / "metrics.json").read_text())["eval"]["xnli"]["dev"]["de"]["dtype"] == want


def test_cpu_attention_follows_the_dtype_in_use(backbone):
    """The bf16 CPU attention only takes bf16 inputs; fp32 goes to sdpa unchanged."""
    from unittest import mock

    from xprompt import attention

    q = torch.randn(2, 4, 5, 8)
    with mock.patch("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                    return_value=("sdpa", None)) as sdpa:
        assert attention.cpu_attention(None, q, q, q, None)[0] == "sdpa"
        assert sdpa.call_count == 1
        out, _ = attention.cpu_attention(None, q.bfloat16(), q.bfloat16(), q.bfloat16(), None)
        assert sdpa.call_count == 1 and out.dtype == torch.bfloat16


def test_frozen_weights_held_in_bf16_change_nothing_but_speed(backbone, xnli):
    """Under CPU bf16 the frozen Linear weights are cast once, not at every call: the same logits
    and prompt gradients bit for bit as plain autocast, trainable tensors and embeddings untouched,
    and every weight back in its own fp32 storage afterwards."""
    from xprompt.data import batches, encode, load_split
    from xprompt.model import build_model

    torch.manual_seed(0)
    model = build_model(backbone, 3, "deep", 4, "mean")
    rows = encode(load_split(xnli, "en", "dev").select(range(16)), xnli.template, backbone.tokenizer)
    batch = next(batches(rows, 16, backbone.tokenizer.pad_token_id))
    before = {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()}
    results = []
    for cast in (False, True):
        model.zero_grad(set_to_none=True)
        with hardware.compute(model, "bf16", "cpu") if cast else torch.autocast("cpu", dtype=torch.bfloat16):
            if cast:
                frozen = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
                assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
                assert model.embed.weight.dtype == torch.float32
                assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            logits = model(batch)
            logits.float().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()} == before
    with hardware.compute(model, "fp32", "cpu"):  # fp32 (and GPUs) leave every weight as it is
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_weight_shared_with_an_embedding_stays_in_fp32():
    table = torch.nn.Embedding(10, 4).requires_grad_(False)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = table.weight  # a tied LM head: casting it would change the input embeddings too
    model = torch.nn.ModuleDict({"table": table, "head": head, "dense": torch.nn.Linear(4, 4).requires_grad_(False)})
    with hardware.frozen_weights_in_bf16(model, "bf16", "cpu"):
        assert head.weight.dtype == torch.float32 and model["dense"].weight.dtype == torch.bfloat16
        assert model["dense"].bias.dtype == torch.bfloat16
    assert model["dense"].weight.dtype == torch.float32 and model["dense"].bias.dtype == torch.float32


def test_evaluation_batches_are_smaller_on_a_cpu():
    assert hardware.eval_batch_size("cpu") == 32 and hardware.eval_batch_size(torch.device("cpu")) == 32
    assert hardware.eval_batch_size("cuda") == 64


# ---------------------------------------------------------------- hub layouts

def test_mt5_folder_as_the_hub_ships_it(tiny_mt5_dir, tmp_path):
    """spiece.model + T5Tokenizer config, no tokenizer.json: loads offline (protobuf converts it);
    <pad>=0 </s>=1 <unk>=2, no <s>, the template's <mask> becomes <extra_id_0>, the last piece."""
    from xprompt.backbones import load_backbone
    from xprompt.data import TemplateEncoder, span_sentinels

    assert not (tiny_mt5_dir / "tokenizer.json").exists() and (tiny_mt5_dir / "spiece.model").is_file()
    bb = load_backbone(str(tiny_mt5_dir), tmp_path)
    tok = bb.tokenizer
    assert bb.kind == "seq2seq" and type(tok).__name__ == "T5Tokenizer"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None and tok.cls_token_id is None and tok.mask_token_id is None
    last = len(tok) - 1
    assert span_sentinels(tok) == (last, last - 1)
    encoder = TemplateEncoder("{premise} ? <mask> , {hypothesis}", tok)
    row = encoder({"premise": ["Der Hund"], "hypothesis": ["你好"]})
    pieces = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [*pieces("Der Hund"), *pieces(" ?"), last, *pieces(" ,"), *pieces("你好"), 1]
    assert row["input_ids"][0] == expected and row["mask_pos"][0] == expected.index(last)


def test_xlmr_folder_as_the_hub_ships_it(tiny_xlmr_mlm_dir, tmp_path, tokenizer):
    """config + model.safetensors + sentencepiece.bpe.model + tokenizer.json, no tokenizer_config:
    XLM-R's own tokenizer class, the same ids as the embedded e5's XLM-R vocabulary, <mask>=250001."""
    from xprompt.backbones import load_backbone
    from xprompt.data import TemplateEncoder

    assert not (tiny_xlmr_mlm_dir / "tokenizer_config.json").exists()
    bb = load_backbone(str(tiny_xlmr_mlm_dir), tmp_path)
    assert type(bb.tokenizer).__name__ == "XLMRobertaTokenizer" and bb.tokenizer.mask_token_id == 250001
    text = "Die Katze sitzt auf der Matte. 猫坐在垫子上。"
    assert bb.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    row = TemplateEncoder("{premise} ? <mask> , {hypothesis}", bb.tokenizer)({"premise": ["A"], "hypothesis": ["B"]})
    ids = row["input_ids"][0]
    assert ids[0] == 0 and ids[-1] == 2 and ids[row["mask_pos"][0]] == 250001
    # the same checkpoint without tokenizer.json: transformers converts sentencepiece.bpe.model
    bare = tmp_path / "bare"
    shutil.copytree(tiny_xlmr_mlm_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert load_backbone(str(bare), tmp_path).tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_bin_only_checkpoint_is_refused_with_the_way_out(tiny_mt5_bin_dir, tmp_path):
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_mt5_bin_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 2, "--prompt-length", 2)
    assert out.exit_code == 1
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pytorch_model.bin" in lines[0]
    assert "--revision refs/pr/" in lines[0] and "--allow-bin-weights" in lines[0]
    assert not runs.exists()


def test_bin_only_checkpoint_loads_when_the_user_opts_in(tiny_mt5_bin_dir, tiny_mt5_dir, tmp_path):
    from xprompt.backbones import load_backbone, weights_sha256
    from xprompt.backbones.embedded import file_sha256

    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_mt5_bin_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 2, "--prompt-length", 2, "--allow-bin-weights", "--run-name", "r")
    assert out.exit_code == 0, out.output
    card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
    assert card["backbone_bin_weights"] is True
    assert card["backbone_sha256"] == file_sha256(tiny_mt5_bin_dir / "pytorch_model.bin") == weights_sha256(tiny_mt5_bin_dir)
    # eval of that run needs no flag again (the card says the user opted in for these weights)
    ev = invoke("eval", "--run", runs / "r", "--langs", "de", "--data-dir", TEST_DATA)
    assert ev.exit_code == 0, ev.output
    # the .bin weights are the same tensors as the safetensors twin's
    a = load_backbone(str(tiny_mt5_bin_dir), tmp_path, allow_bin_weights=True)
    b = load_backbone(str(tiny_mt5_dir), tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.seq2seq.state_dict().values(), b.seq2seq.state_dict().values()))


def _fake_hub(home, tiny_mt5_bin_dir, tiny_mt5_dir):
    """A hub cache as huggingface_hub lays it out, for repo xprompt/tiny-mt5: main holds only
    pytorch_model.bin; refs/pr/1 (the hub's safetensors conversion PR) holds model.safetensors."""
    repo = home / "hub" / "models--xprompt--tiny-mt5"
    for ref, commit, source in (("main", "a" * 40, tiny_mt5_bin_dir), ("refs/pr/1", "b" * 40, tiny_mt5_dir)):
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(source, repo / "snapshots" / commit)


def test_revision_reaches_the_hub_safetensors_branch(tiny_mt5_bin_dir, tiny_mt5_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _fake_hub(tmp_path / "hf", tiny_mt5_bin_dir, tiny_mt5_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    runs = tmp_path / "runs"
    common = ["--backbone", "xprompt/tiny-mt5", "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", 2,
              "--prompt-length", 2]
    out = invoke("train", *common)
    assert out.exit_code == 1 and "--revision refs/pr/" in out.output
    out = invoke("train", *common, "--revision", "refs/pr/1", "--run-name", "r")
    assert out.exit_code == 0, out.output
    card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
    assert card["backbone_revision"] == "refs/pr/1" and card["backbone_bin_weights"] is False
    config = json.loads((runs / "r" / "config.json").read_text())
    assert config["train"]["revision"] == "refs/pr/1" and config["backbone"]["revision"] == "refs/pr/1"
    ev = invoke("eval", "--run", runs / "r", "--langs", "de", "--data-dir", TEST_DATA)  # the card's revision
    assert ev.exit_code == 0, ev.output


# ---------------------------------------------------------------- native templates

@pytest.mark.parametrize("style, expect_native", [("auto", True), ("native", True), ("agnostic", False)])
def test_each_language_gets_its_own_template_and_words(tiny_xlmr_mlm_dir, tmp_path, monkeypatch, style, expect_native):
    """With label words (XLM-R's LM head), --template auto|native encodes every language with its own
    cloze template from the card and scores its own words; agnostic keeps the one template."""
    import xprompt.data as data
    import xprompt.evaluation as evaluation
    import xprompt.verbalizers as verbalizers
    from xprompt.tasks import load_task

    xnli = load_task("xnli")
    seen = []
    for module in (evaluation, data):  # evaluation's encode, and training data's (data.prepare_data)
        real = module.encode
        monkeypatch.setattr(module, "encode", lambda ds, template, *a, _real=real, **k: (seen.append(template), _real(ds, template, *a, **k))[1])
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_xlmr_mlm_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 2, "--prompt-length", 2, "--template", style, "--run-name", "r")
    assert out.exit_code == 0, out.output
    card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
    assert card["template_style"] == ("native" if expect_native else "agnostic")
    assert seen and set(seen) == {xnli.languages["en"].template if expect_native else xnli.template}
    seen.clear()
    languages = []
    real_use = verbalizers.WordVerbalizer.use_language
    monkeypatch.setattr(verbalizers.WordVerbalizer, "use_language", lambda self, lang: (languages.append(lang), real_use(self, lang))[1])
    ev = invoke("eval", "--run", runs / "r", "--langs", "zh,de", "--data-dir", TEST_DATA)
    assert ev.exit_code == 0, ev.output
    if expect_native:
        assert seen == [xnli.languages["zh"].template, xnli.languages["de"].template]
        assert "{premise}？<mask>，{hypothesis}" == seen[0]
    else:
        assert seen == [xnli.template, xnli.template]
    assert languages == ["zh", "de"]  # each language's label words


def test_label_vectors_keep_the_agnostic_template(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                 "--max-steps", 2, "--prompt-length", 2, "--run-name", "r")
    assert out.exit_code == 0, out.output
    card = json.loads((runs / "r" / "prompt" / "xprompt.json").read_text())
    assert card["template_style"] == "agnostic" and card["template"] == "{premise} ? <mask> , {hypothesis}"


# ---------------------------------------------------------------- readouts and similarity without <s>

def test_mean_readout_reads_every_input_token_without_bos(tiny_mt5_dir, tmp_path):
    from xprompt.backbones import load_backbone
    from xprompt.data import batches, encode, load_split
    from xprompt.model import build_model
    from xprompt.tasks import load_task

    bb = load_backbone(str(tiny_mt5_dir), tmp_path)
    xnli = load_task("xnli")
    model = build_model(bb, 3, "soft", 2, "mean")
    model.prompt.embeddings.data.normal_()
    batch = next(batches(encode(load_split(xnli, "de", "dev", [TEST_DATA]), xnli.template, bb.tokenizer), 4,
                         bb.tokenizer.pad_token_id))
    with torch.no_grad():
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        got = model.states(batch)
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        torch.testing.assert_close(got[row], hidden[row, 2 : 2 + n].mean(0))  # prompt first, then every token


def test_neuron_similarity_on_mt5_reads_the_gated_ffn(tiny_mt5_dir, tmp_path):
    from xprompt.backbones import load_backbone
    from xprompt.data import sequence_ends
    from xprompt.model import build_model
    from xprompt.similarity import _ffn_activations, activated_neurons

    bb = load_backbone(str(tiny_mt5_dir), tmp_path)
    assert type(_ffn_activations(bb.layers()[0])).__name__ in ("NewGELUActivation", "GELUActivation")
    model = build_model(bb, 3, "deep", 2, "mean")
    model.prompt.embeddings.data.normal_()
    model.prompt.layer_prompts.data.normal_()
    bos, eos = sequence_ends(bb.tokenizer)
    assert bos is None and eos == 1
    active = activated_neurons(model, bos, eos)
    assert active.shape == (2, 37) and 0 < active.sum() < active.numel()
    model.prompt.layer_prompts.data[0].mul_(-1)  # another prompt in layer 1: other neurons there
    assert not torch.equal(activated_neurons(model, bos, eos)[1], active[1])


# ---------------------------------------------------------------- GPUs: collectives and sharding

def test_collectives_use_the_process_device(monkeypatch):
    from xprompt import distributed

    assert distributed.collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)


def test_nccl_setup_takes_the_local_gpu_first(monkeypatch):
    from xprompt import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("XPROMPT_DIST_BACKEND", raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert distributed.setup() == (1, 2)
    assert calls == [("set_device", 1), ("init", "nccl")]


@pytest.mark.parametrize("which", ["mt5", "xlmr"])
def test_placing_a_model_never_moves_a_sharded_backbone(which, tiny_mt5_dir, tiny_xlmr_mlm_dir, tmp_path, monkeypatch):
    """--device-map auto: the verbalizer holds the backbone's LM head / decoder without owning it,
    so placing the model moves only the prompt and the verbalizer's own tensors."""
    from xprompt.backbones import load_backbone
    from xprompt.model import build_model
    from xprompt.verbalizers import make_verbalizer, task_label_words
    from xprompt.tasks import load_task

    folder = tiny_mt5_dir if which == "mt5" else tiny_xlmr_mlm_dir
    bb = load_backbone(str(folder), tmp_path, device_map="auto")
    assert bb.sharded
    xnli = load_task("xnli")
    verbalizer = make_verbalizer(bb, "hard", list(xnli.labels), task_label_words(xnli), "en")
    model = build_model(bb, 3, "soft", 2, "mask", verbalizer=verbalizer)
    frozen = {id(m) for m in (bb.seq2seq or bb.lm_head).modules()} | {id(m) for m in bb.model.modules()}
    assert not frozen & {id(m) for m in model.verbalizer.modules()}
    moved = []
    real = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: (moved.append(id(self)), real(self, *a, **k))[1])
    model.place(torch.device("cpu"))
    assert moved and not frozen & set(moved)
