"""What a run trains of the backbone (``--tune``), as one object, ``BackboneTuning``: it trains its
own copy of the backbone (the caller's stays as loaded: a sweep's next seed, another run's
evaluation in the same process), marks what trains there (every weight: ``full`` and ``head``; the
biases: ``bitfit``; PEFT's own LoRA adapters: ``lora``), gives the optimizer that part at the
backbone's rate, hands its tensors to snapshots and checkpoints (``backbone.<module>.<name>``), and
stores only what changed, in the run's ``prompt/``:

- ``backbone.safetensors``: the backbone tensors whose values differ from the base's, by name
  (``model.``: the encoder the prompt runs through; ``lm_head.``: a masked LM's head, where label
  words are scored; ``seq2seq.``: the whole encoder-decoder, where its decoder scores or writes);
  safetensors only (no pickled weights);
- ``adapter/``: LoRA as PEFT saves it (``adapter_config.json`` + ``adapter_model.safetensors``), so
  ``PeftModel.from_pretrained(base, run/prompt/adapter)`` loads it onto ``AutoModel`` of the backbone
  (``AutoModelForSeq2SeqLM`` for an encoder-decoder).

``apply_stored`` puts a saved run's tensors onto a copy of the base backbone (``own_copy``), for
``eval`` and ``predict``. The prompt-only default builds none of this: its code path is the one before ``--tune``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import Backbone
from .checks import CHANGES_BACKBONE, tune_of
from .errors import XPromptError
from .fileio import atomic_write

BACKBONE_FILE = "backbone.safetensors"
ADAPTER_DIR = "adapter"
PREFIX = "backbone."
LORA_TARGETS = (("query", "value"), ("q", "v"))  # BERT / XLM-R / e5's attention names; T5 / mT5's


def own_copy(backbone: Backbone) -> Backbone:
    """The backbone with its own copy of every module (what they share stays shared: the encoder of an
    encoder-decoder, tied embeddings); the tokenizer is the same object."""
    if backbone.sharded:
        raise XPromptError("--tune full, bitfit, lora and head train a copy of the backbone on one device; "
                           "drop --device-map")
    model, lm_head, seq2seq = copy.deepcopy((backbone.model, backbone.lm_head, backbone.seq2seq))
    return dataclasses.replace(backbone, model=model, lm_head=lm_head, seq2seq=seq2seq)


def roots(backbone: Backbone, verbalizer) -> dict[str, nn.Module]:
    """The backbone modules a model of this verbalizer runs, by name: the encoder; a masked LM's head
    where label words are scored under it; the whole encoder-decoder where its decoder reads the states."""
    if getattr(verbalizer, "seq2seq", None) is not None:
        return {"seq2seq": backbone.seq2seq}
    if getattr(verbalizer, "head", None) is not None and backbone.lm_head is not None:
        return {"model": backbone.model, "lm_head": backbone.lm_head}
    return {"model": backbone.model}


def named_parameters(modules: dict[str, nn.Module | None], once: bool = True) -> dict[str, nn.Parameter]:
    """The parameters as ``<root>.<name>``: each once (a tied one under its first name), or (``once=False``)
    under every name it has."""
    seen, out = set(), {}
    for root, module in modules.items():
        for name, param in (module.named_parameters(remove_duplicate=once) if module is not None else ()):
            if not once or id(param) not in seen:
                seen.add(id(param))
                out[f"{root}.{name}"] = param
    return out


def every_root(backbone: Backbone) -> dict[str, nn.Module | None]:
    return {"model": backbone.model, "lm_head": backbone.lm_head, "seq2seq": backbone.seq2seq}


def lora_targets(module: nn.Module, asked: str | None) -> list[str]:
    """``--lora-targets`` as a list, or the attention's query and value projections of this backbone."""
    if asked:
        return [t.strip() for t in asked.split(",") if t.strip()]
    leaves = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    for pair in LORA_TARGETS:
        if set(pair) <= leaves:
            return list(pair)
    raise XPromptError("--tune lora: cannot tell this backbone's query and value projections apart; name the modules "
                       "with --lora-targets")


class BackboneTuning:
    """The tuned part of a backbone copy (see the module's docstring). ``start`` makes the copy;
    ``attach`` marks what trains once the model is built on it (PEFT's LoRA goes in then, after the
    prompt took what it copies of the layers)."""

    def __init__(self, base: Backbone, cfg):
        self.base, self.mode = base, cfg.tune
        self.backbone = own_copy(base)
        self.base_lr, self.backbone_lr = cfg.lr, cfg.backbone_lr
        self.lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets}
        self.params: dict[str, nn.Parameter] = {}
        self.roots: dict[str, nn.Module] = {}
        self.peft = None
        self._start: dict[str, torch.Tensor] = {}

    @classmethod
    def start(cls, cfg, backbone: Backbone) -> "BackboneTuning | None":
        """The tuning a config asks for (None: the backbone stays frozen, nothing is copied)."""
        return cls(backbone, cfg) if cfg.tune in CHANGES_BACKBONE else None

    def attach(self, model) -> None:
        """Mark what trains on the model's (copied) backbone and hand the model this object."""
        self.roots = roots(self.backbone, model.verbalizer)
        if self.mode == "lora":
            self._inject_lora()
            self.params = {k: p for k, p in named_parameters(self.roots).items() if p.requires_grad}
            self._start = {k: p.detach().clone() for k, p in self.params.items()}  # PEFT's seeded start
        else:
            everything = named_parameters(self.roots)
            base = named_parameters(every_root(self.base), once=False)  # the same names in the base
            self.params = {k: p for k, p in everything.items() if self.mode != "bitfit" or k.endswith("bias")}
            if not self.params:
                raise XPromptError(f"--tune bitfit: backbone '{self.base.name}' has no bias parameters (T5 and mT5 "
                                   "layers have none); use --tune lora or full")
            self._start = {k: base[k] for k in self.params}  # the base's own tensors: nothing copied
            for param in self.params.values():
                param.requires_grad_(True)
                if param.dtype != torch.float32:  # trained in fp32 (a GPU backbone may be held in bf16)
                    param.data = param.data.float()
        model.tuning, model.own_backbone = self, self.mode

    def _inject_lora(self) -> None:
        LoraConfig, get_peft_model = _peft("LoraConfig", "get_peft_model")

        # the adapter's base: the encoder (AutoModel of the backbone) or the whole encoder-decoder
        # (AutoModelForSeq2SeqLM), whose decoder is adapted only where it reads the prompted states
        seq2seq = self.backbone.seq2seq
        name, root = ("seq2seq", seq2seq) if seq2seq is not None else ("model", self.backbone.model)
        targets = lora_targets(root, self.lora["targets"])
        if seq2seq is not None and "seq2seq" not in self.roots:  # PEFT matches a string as a regex of module names
            targets = rf"encoder\..*\.({'|'.join(re.escape(t) for t in targets)})"
        self.roots = {name: root}
        config = LoraConfig(r=self.lora["rank"], lora_alpha=self.lora["alpha"], lora_dropout=0.0, bias="none",
                            target_modules=targets)
        try:
            with warnings.catch_warnings():  # (transformers' deprecation notes, read by PEFT)
                warnings.simplefilter("ignore", FutureWarning)
                self.peft = get_peft_model(root, config)  # injects the adapters into ``root`` itself
        except ValueError as e:
            raise XPromptError(f"--tune lora: {str(e).splitlines()[0]}") from None
        self.peft.peft_config["default"].base_model_name_or_path = self.base.name  # its name, never a cache path

    # -- the optimizer, snapshots and checkpoints
    def param_groups(self, lr: float) -> list[dict]:
        """The backbone's group: ``backbone_lr``, scaled as the prompt's rate is (a restart's third)."""
        rate = self.backbone_lr if lr == self.base_lr else self.backbone_lr * lr / self.base_lr
        return [{"params": list(self.params.values()), "lr": rate}]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: p.detach() for k, p in self.params.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                value = tensors.get(PREFIX + name)
                if value is None or value.shape != param.shape:
                    raise XPromptError(f"{where}: backbone tensor '{name}' is missing or of another shape; was it "
                                       f"saved by a --tune {self.mode} run on this backbone?")
                param.copy_(value)

    def reset(self) -> None:
        """Back to the start (a restart of the safety net): the base's values, or PEFT's initial adapters."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self._start[name])

    # -- what a finished run stores
    def save(self, folder: Path, best: dict[str, torch.Tensor]) -> dict:
        """Store what the run changed (``best``: the kept step's snapshot) in ``folder`` (the run's
        ``prompt/``); returns the card's record: the mode, rates, files and their bytes."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"mode": self.mode, "backbone_lr": self.backbone_lr, "trained_tensors": len(self.params),
                  "trained_parameters": sum(p.numel() for p in self.params.values())}
        if self.mode == "lora":
            self.load_tensors(best, "the kept step")
            staging = folder / f".{ADAPTER_DIR}-partial"
            shutil.rmtree(staging, ignore_errors=True)
            self.peft.save_pretrained(str(staging))
            (staging / "README.md").unlink(missing_ok=True)  # PEFT's model card template: not the run's
            shutil.rmtree(folder / ADAPTER_DIR, ignore_errors=True)
            staging.rename(folder / ADAPTER_DIR)
            name = next(iter(self.roots))
            files = sorted(p for p in (folder / ADAPTER_DIR).rglob("*") if p.is_file())
            record.update(root=name, lora_rank=self.lora["rank"], lora_alpha=self.lora["alpha"],
                          lora_targets=_names(self.peft.peft_config["default"].target_modules))
        else:
            changed = {k: best[PREFIX + k].contiguous() for k in self.params  # compared in the trained dtype
                       if not torch.equal(best[PREFIX + k], self._start[k].to(best[PREFIX + k].device, best[PREFIX + k].dtype))}
            atomic_write(folder / BACKBONE_FILE, lambda tmp: save_file(changed, str(tmp), metadata={"format": "pt"}))
            files = [folder / BACKBONE_FILE]
            record["changed_tensors"] = len(changed)
        record["files"] = [str(f.relative_to(folder)) for f in files]
        record["stored_bytes"] = sum(f.stat().st_size for f in files)
        return record


def _names(targets) -> list[str]:
    return [targets] if isinstance(targets, str) else sorted(targets)


def apply_stored(backbone: Backbone, folder: Path, card: dict) -> None:
    """Put what a tuned run stored in ``folder`` (its ``prompt/``) onto ``backbone`` (a copy: ``own_copy``),
    in place: the changed tensors, or PEFT's adapter (``PeftModel.from_pretrained``, for inference). Applied
    after the model is built on it, as in training (a unified prompt's tower copies the layers without it)."""
    info = card.get("tune") or {}
    folder = Path(folder)
    if info.get("mode") == "lora":
        (PeftModel,) = _peft("PeftModel")
        root = backbone.seq2seq if info.get("root") == "seq2seq" else backbone.model
        if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
            raise XPromptError(f"{folder / ADAPTER_DIR}: the run's LoRA adapter is missing")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            PeftModel.from_pretrained(root, str(folder / ADAPTER_DIR))  # the adapters go into ``root`` itself
        root.eval()
        return
    path = folder / BACKBONE_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise XPromptError(f"{path}: the run's backbone weights are missing or unreadable ({e}); a --tune "
                           f"{info.get('mode')} run needs them") from None
    params = named_parameters(every_root(backbone), once=False)
    with torch.no_grad():
        for name, value in tensors.items():
            param = params.get(name)
            if param is None or param.shape != value.shape:
                raise XPromptError(f"{path}: tensor '{name}' does not fit backbone '{backbone.name}'")
            if param.dtype == value.dtype:
                param.copy_(value)
            else:  # as trained: in fp32 (a GPU backbone held in bf16 would round the stored updates)
                param.data = value.to(param.device)


def _peft(*names: str) -> tuple:
    """PEFT's own classes (a dependency; an install without it gets one line, not a traceback)."""
    try:
        import peft
    except ImportError:
        raise XPromptError("--tune lora needs PEFT: pip install 'peft>=0.21'") from None
    return tuple(getattr(peft, name) for name in names)


def stored_bytes(folder: Path) -> int:
    """The bytes a run keeps in ``folder`` (its ``prompt/``): what it needs to be applied again."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


__all__ = ["BackboneTuning", "apply_stored", "own_copy", "stored_bytes", "tune_of", "BACKBONE_FILE", "ADAPTER_DIR"]
