"""Configs as dataclasses: defaults, help texts, cross-field checks, JSON round trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from .prompts import Method


class DType(str, Enum):
    AUTO = "auto"  # bf16 where the hardware runs it natively, else fp32 (xprompt.hardware)
    FP32 = "fp32"
    BF16 = "bf16"


TEMPLATES = ("auto", "agnostic", "native")


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


@dataclass
class TrainConfig:
    task: str = field(default="xnli", metadata={"help": "task card name under tasks/"})
    lang: str = field(default="en", metadata={"help": "source language to train on"})
    backbone: str = field(default="e5-small", metadata={"help": "'e5-small', a local folder or a HF id"})
    revision: str | None = field(default=None, metadata={"help": "hub revision of the backbone (a branch, tag, commit or refs/pr/N)"})
    allow_bin_weights: bool = field(default=False, metadata={"help": "load a pytorch_model.bin checkpoint with torch.load(weights_only=True)"})
    method: Method = field(default=Method.DEEP, metadata={"help": "prompt method"})
    prompt_length: int = field(default=8, metadata={"help": "number of prompt vectors"})
    verbalizer: str = field(default="auto", metadata={"help": "auto (hard for a masked-LM or seq2seq backbone, else centered), soft (label vectors), centered (label vectors scored around the class means' centre), hard (label words under the LM head) or soft-words (trained label vectors in the LM head's output space, from the label words)"})
    label_reduce: str = field(default="mean", metadata={"help": "hard verbalizer: a multi-piece label word's score, mean/first/max of its pieces' log-probabilities"})
    prompt_position: str = field(default="after-bos", metadata={"help": "where the prompt goes: after-bos (after <s>) or first (before <s>, PEFT's place)"})
    tower_layers: int | None = field(default=None, metadata={"help": "unified: layers of the prompt tower (default: half the backbone's)"})
    reparam: str = field(default="mlp", metadata={"help": "ptuning's prompt encoder: mlp or lstm (+ mlp)"})
    prefix_projection: bool = field(default=False, metadata={"help": "deep/prefix: P-tuning v2's reparameterisation, per-layer vectors = tables + MLP(prompt)"})
    init: str = field(default="vocab", metadata={"help": "prompt start: vocab (sampled frequent pieces), random, text (init_text) or label-words"})
    init_text: str | None = field(default=None, metadata={"help": "with init='text': the text whose piece embeddings start the prompt"})
    template: str = field(default="auto", metadata={"help": "agnostic (the card's one template for every language), native (each language's own cloze template) or auto (native for label words, else agnostic)"})
    readout: str = field(default="auto", metadata={"help": "state read by the verbalizer: mask, mean, both (their average) or auto (mask for label words, else mean)"})
    shots: int | None = field(default=None, metadata={"help": "K examples per class (None: the whole pool)"})
    seed: int = field(default=42, metadata={"help": "seed for init, sampling and data order"})
    max_steps: int | None = field(default=1200, metadata={"help": "optimizer steps (overrides epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data when max_steps is None"})
    lr: float = field(default=3e-2, metadata={"help": "peak learning rate (AdamW)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step (the global batch: over all processes and micro-batches)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step (same result, less memory)"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "linear warm-up share of the steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=128, metadata={"help": "max tokens per example (before the prompt)"})
    select_size: int = field(default=500, metadata={"help": "source-language rows held out for model selection"})
    eval_every: int = field(default=200, metadata={"help": "steps between selection evaluations"})
    init_examples: int = field(default=256, metadata={"help": "examples whose class-mean <mask> states initialise the verbalizer"})
    dtype: DType = field(default=DType.AUTO, metadata={"help": "compute dtype of the frozen backbone: auto (bf16 where the hardware runs it natively, else fp32), bf16 (autocast) or fp32"})
    source_split: str = field(default="train", metadata={"help": "split the training rows come from (dev: target-language few-shot adaptation)"})
    init_from: str | None = field(default=None, metadata={"help": "run directories (comma-separated) whose prompts start training"})
    init_weights: list[float] | None = field(default=None, metadata={"help": "weights of the init_from runs' average (default equal)"})
    library: str | None = field(default=None, metadata={"help": "with init_from='library': the folder of trained runs to retrieve from (default: the runs folder)"})
    top_k: int = field(default=3, metadata={"help": "with init_from='library': library prompts kept after ranking"})
    transfer: str = field(default="best", metadata={"help": "with init_from='library': best (top prompt after a zero-shot trial), average (score-weighted) or mixture (trained on the top-k tasks' data)"})
    rank_by: str = field(default="zero-shot", metadata={"help": "with init_from='library': zero-shot (selection accuracy) or flat/mean/neurons similarity to a probe prompt"})
    same_task: bool = field(default=False, metadata={"help": "with init_from='library': let the run's own task's prompts in"})
    probe_steps: int = field(default=50, metadata={"help": "steps of the probe prompt that similarity ranking compares with"})
    mixture_steps: int = field(default=100, metadata={"help": "steps of the prompt trained on the top-k tasks' mixture (transfer='mixture')"})
    mixture_cap: int | None = field(default=10000, metadata={"help": "examples-proportional mixing limit: a source counts at most this many rows"})

    def __post_init__(self):
        self.method = Method(self.method)
        self.dtype = DType(self.dtype)
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {self.prompt_length}")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots must be >= 1, got {self.shots}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.grad_accum <= self.batch_size:
            raise ValueError(f"grad_accum must be between 1 and batch_size ({self.batch_size}), got {self.grad_accum}")
        if self.source_split not in ("train", "dev"):
            raise ValueError(f"source_split must be 'train' or 'dev', got {self.source_split!r}")
        if self.source_split == "dev" and not self.shots:
            raise ValueError("source_split='dev' needs shots (the rest of dev is kept for evaluation)")
        if self.transfer not in ("best", "average", "mixture"):
            raise ValueError(f"transfer must be 'best', 'average' or 'mixture', got {self.transfer!r}")
        if self.rank_by not in ("zero-shot", "flat", "mean", "neurons"):
            raise ValueError(f"rank_by must be zero-shot, flat, mean or neurons, got {self.rank_by!r}")
        if self.probe_steps < 1 or self.mixture_steps < 1:
            raise ValueError(f"probe_steps and mixture_steps must be >= 1, got {self.probe_steps}, {self.mixture_steps}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.init_from == "library" and self.init_weights is not None:
            raise ValueError("init_weights cannot be combined with init_from='library' (the scores weight the average)")
        if self.verbalizer not in ("auto", "soft", "centered", "hard", "soft-words"):
            raise ValueError(f"verbalizer must be auto, soft, centered, hard or soft-words, got {self.verbalizer!r}")
        if self.label_reduce not in ("mean", "first", "max"):
            raise ValueError(f"label_reduce must be mean, first or max, got {self.label_reduce!r}")
        if self.prompt_position not in ("after-bos", "first"):
            raise ValueError(f"prompt_position must be 'after-bos' or 'first', got {self.prompt_position!r}")
        if self.reparam not in ("mlp", "lstm"):
            raise ValueError(f"reparam must be 'mlp' or 'lstm', got {self.reparam!r}")
        if self.prefix_projection and Method(self.method) not in (Method.DEEP, Method.PREFIX):
            raise ValueError(f"prefix_projection needs method deep or prefix, got {Method(self.method).value!r}")
        if self.init not in ("vocab", "random", "text", "label-words"):
            raise ValueError(f"init must be vocab, random, text or label-words, got {self.init!r}")
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init='text' needs init_text (--init-text)")
        if self.init_text and self.init != "text":
            raise ValueError("init_text is only used with init='text' (--init text)")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be auto, agnostic or native, got {self.template!r}")
        if self.readout not in ("auto", "mask", "mean", "both"):
            raise ValueError(f"readout must be auto, mask, mean or both, got {self.readout!r}")

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
