"""Shared fixtures: the embedded tokenizer (real XLM-R vocabulary) and tiny random backbones."""

from __future__ import annotations

import copy
import os
from pathlib import Path

# The tests never reach the hub (CI is offline): say so before huggingface_hub reads it, so that a
# hub id fails at once instead of after its network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs a worker per core) each worker, and every process a test starts,
# computes on one thread: two workers of two threads each on two cores would fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="session", autouse=True)
def _backbones_loaded_once():
    """The tests' CLI calls load the same few tiny backbone folders over and over (4-5 s each, mostly
    the 250k-piece tokenizer): load each once per session, keyed by its name, options and files, as a
    long-lived process would. Tests that load a backbone directly get their own object as before."""
    import xprompt.backbones as backbones

    cache = {}
    real = backbones.load_backbone

    def identity(name) -> tuple:
        folder = Path(str(name))
        if not folder.is_dir():
            return ()
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))

    def load_once(name, cache_dir, **kwargs):
        key = (str(name), str(cache_dir), repr(sorted((k, str(v)) for k, v in kwargs.items())), identity(name))
        if key not in cache:
            cache[key] = real(name, cache_dir, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "load_backbone", load_once)
        yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from xprompt.backbones.embedded import embedded_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    embedded_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tiny_bert(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=160, pad_token_id=1,
    )
    config.architectures = ["BertModel"]
    return BertModel(config, add_pooling_layer=False)


def save_backbone(model, tokenizer_dir: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random BERT with the embedded XLM-R vocabulary, saved as a local backbone folder."""
    return save_backbone(_tiny_bert(0), tokenizer_dir, tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def other_bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Same shape as tiny_bert_dir, other weights: a prompt trained on one must not load on the other."""
    return save_backbone(_tiny_bert(1), tokenizer_dir, tmp_path_factory.mktemp("other_bert"))


@pytest.fixture(scope="session")
def xlmr_spm(tmp_path_factory) -> Path:
    """XLM-R's sentencepiece.bpe.model (the real vocabulary, in SentencePiece's own format)."""
    from hub_layout import write_xlmr_sentencepiece

    return write_xlmr_sentencepiece(tmp_path_factory.mktemp("xlmr_spm") / "sentencepiece.bpe.model")


@pytest.fixture(scope="session")
def mt5_spm(tmp_path_factory) -> Path:
    """A small spiece.model in mT5's layout: <pad> </s> <unk>, no <s> or <mask>, 100 sentinels last."""
    from hub_layout import write_mt5_sentencepiece

    return write_mt5_sentencepiece(tmp_path_factory.mktemp("mt5_spm") / "spiece.model")


def _tiny_xlmr_mlm():
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    torch.manual_seed(2)
    config = XLMRobertaConfig(
        vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=160, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    config.architectures = ["XLMRobertaForMaskedLM"]
    return XLMRobertaForMaskedLM(config)


@pytest.fixture(scope="session")
def tiny_xlmr_mlm_dir(tmp_path_factory, xlmr_spm) -> Path:
    """A tiny random XLMRobertaForMaskedLM (the masked_lm kind) laid out as FacebookAI/xlm-roberta-base
    on the hub: config, model.safetensors, sentencepiece.bpe.model, tokenizer.json."""
    from hub_layout import save_xlmr

    return save_xlmr(_tiny_xlmr_mlm(), tmp_path_factory.mktemp("tiny_xlmr_mlm"), xlmr_spm)


def _tiny_mt5(vocab: int):
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(3)
    config = MT5Config(
        vocab_size=vocab + 12, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    config.architectures = ["MT5ForConditionalGeneration"]
    return MT5ForConditionalGeneration(config)


def _spm_size(path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


@pytest.fixture(scope="session")
def tiny_mt5_dir(tmp_path_factory, mt5_spm) -> Path:
    """A tiny random MT5ForConditionalGeneration (the seq2seq kind) laid out as google/mt5-small on
    the hub (spiece.model, T5Tokenizer config, no tokenizer.json), with safetensors weights."""
    from hub_layout import save_mt5

    return save_mt5(_tiny_mt5(_spm_size(mt5_spm)), tmp_path_factory.mktemp("tiny_mt5"), mt5_spm)


@pytest.fixture(scope="session")
def tiny_mt5_bin_dir(tmp_path_factory, mt5_spm) -> Path:
    """The same mT5 as the hub's main branch holds it: pytorch_model.bin only."""
    from hub_layout import save_mt5

    return save_mt5(_tiny_mt5(_spm_size(mt5_spm)), tmp_path_factory.mktemp("tiny_mt5_bin"), mt5_spm, weights="bin")


@pytest.fixture(scope="session")
def _backbone(tiny_bert_dir, tmp_path_factory):
    from xprompt.backbones import load_backbone

    return load_backbone(str(tiny_bert_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture
def backbone(_backbone):
    return copy.deepcopy(_backbone)


@pytest.fixture(scope="session")
def xnli():
    from xprompt.tasks import load_task

    return load_task("xnli")


def train_losses(model, batch, lr: float, steps: int) -> list[float]:
    """The loss before each of ``steps`` AdamW steps on one batch (a quick "does it learn" check)."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses
