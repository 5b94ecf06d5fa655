"""Configs as dataclasses: defaults, help texts (the one source of the CLI's), cross-field checks,
JSON round trip; and every list of choices the other modules and the CLI share."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum


class DType(str, Enum):
    AUTO = "auto"  # bf16 where the hardware runs it natively, else fp32 (xprompt.hardware)
    FP32 = "fp32"
    BF16 = "bf16"


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


# The choices, one place each.
# The prompt methods by name, with the one-line help --method shows: read here by the command line without
# importing torch; each method's class registers under its name in xprompt/prompts/__init__.py (a test holds
# the two equal).
METHODS = {
    "soft": "input prompt (Lester et al.)",
    "ptuning": "input prompt through a trained MLP/LSTM encoder (P-tuning)",
    "deep": "a prompt in every layer, as hidden states",
    "prefix": "trainable keys and values in every layer (P-tuning v2, PEFT PrefixTuning)",
    "unified": "UniPrompt's two towers (the prompt through trained copies of the lower layers, joining the frozen "
               "upper layers)",
    "none": "no prompt (--tune head or probe: a linear head reads the backbone's states)",
}
VERBALIZERS = ("auto", "soft", "centered", "hard", "soft-words", "linear")
WORD_VERBALIZERS = ("hard", "soft-words")  # they score label words (read <mask>, native templates)
LABEL_REDUCES = ("mean", "first", "max")
READOUTS = ("mask", "mean", "both", "first")
TEMPLATES = ("auto", "agnostic", "native", "unmasked")
INITS = ("vocab", "random", "text", "label-words")
POSITIONS = {"after-bos": 1, "first": 0}  # --prompt-position -> the prompt's index ("first": PEFT's place)
REPARAMS = ("mlp", "lstm")
TRANSFERS = ("best", "average", "mixture")
RANK_BY = ("zero-shot", "flat", "mean", "neurons")
SOURCE_SPLITS = ("train", "dev")
UNLABELED_SPLITS = ("test", "dev")  # whose inputs self-training reads (labels never)
PSEUDO_RULES = ("top", "threshold")
AUGMENTS = ("none", "neighbours")
SELF_TRAIN_KEEPS = ("best", "last")  # which step a self-training round hands on
# zero-shot: choices on source-language rows only; few-shot-target: trained on K target-language rows
# (which every score of the run leaves out); transductive: read the very rows it is scored on
PROTOCOLS = ("zero-shot", "few-shot-target", "transductive")
LIBRARY = "library"  # --init-from library
# --tune: what trains beside the prompt and verbalizer, with the backbone's default peak rate (None: frozen)
TUNES = {"prompt": None, "full": 1e-5, "bitfit": 1e-4, "lora": 5e-4, "head": 1e-5, "probe": None}
HEAD_TUNES = ("head", "probe")  # no prompt (method none), a linear head
TUNE_FIELDS = ("tune", "backbone_lr", "lora_rank", "lora_alpha", "lora_targets")  # left out of a prompt run's JSON


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    task: str = _f("xnli", "Task card name (tasks/<name>.yaml).")
    lang: str = _f("en", "Source language to train on.")
    backbone: str = _f("e5-small", "'e5-small' (embedded), a local folder or a Hugging Face id.")
    revision: str | None = _f(None, "Hub revision of the backbone: a branch, tag, commit or refs/pr/N (where the hub "
                                    "keeps a .bin-only model's safetensors conversion).")
    allow_bin_weights: bool = _f(False, "Load a backbone that has only pytorch_model.bin weights, through "
                                        "torch.load(weights_only=True) (tensors only, never arbitrary unpickling). "
                                        "Off: safetensors only.")
    method: str = _f("deep", "The prompt method.")
    tune: str = _f("prompt", "What trains: prompt (the prompt alone on the frozen backbone), full (every backbone weight "
                             "as well: prompt-based fine-tuning), bitfit (the backbone's biases as well), lora (PEFT "
                             "LoRA adapters on --lora-targets as well), head (vanilla fine-tuning: no prompt, a linear "
                             "head on the first token's state, every backbone weight) or probe (no prompt, the linear "
                             "head alone on the frozen backbone). head and probe set --method none and --verbalizer "
                             "linear. A tuned run stores only what it changed, in prompt/.")
    backbone_lr: float | None = _f(None, "With --tune full, bitfit, lora or head: the backbone's peak learning rate "
                                         "(default: 1e-5 for full and head, 1e-4 for bitfit, 5e-4 for lora); the prompt "
                                         "and the head keep --lr (under full, unified's prompt tower, copies of backbone "
                                         "layers, takes this rate too).")
    lora_rank: int = _f(8, "With --tune lora: the rank r of PEFT's LoraConfig.")
    lora_alpha: int = _f(16, "With --tune lora: PEFT's lora_alpha (the update is scaled by alpha / rank).")
    lora_targets: str | None = _f(None, "With --tune lora: comma-separated names of the modules PEFT adapts (default: the "
                                        "attention's query and value projections: query,value on XLM-R, BERT and e5; "
                                        "q,v on mT5).")
    prompt_length: int = _f(8, "Prompt vectors (per layer for deep and prefix).")
    verbalizer: str = _f("auto", "auto (hard on a masked-LM backbone such as XLM-R or a seq2seq one such as mT5, else "
                                 "centered), soft (trained label vectors from class means, scored by distance), centered "
                                 "(the same vectors scored around the centre of the class means, so states drawn to the "
                                 "middle keep their ranking), hard (the task card's label words of each language under "
                                 "the frozen LM head or decoder), soft-words (trained label vectors in the LM head's "
                                 "output space, started from the label words' output embeddings) or linear (a "
                                 "classification head: a trained weight and bias per label, from zero).")
    label_reduce: str = _f("mean", "With a hard verbalizer: score a label word of several pieces by the mean, first or "
                                   "max of their log-probabilities.")
    prompt_position: str = _f("after-bos", "after-bos (after <s>) or first (before <s>, where PEFT puts it: the "
                                           "exported PEFT adapter then gives identical outputs).")
    tower_layers: int | None = _f(None, "With --method unified: layers in the prompt tower (default: half the "
                                        "backbone's).")
    prompt_text: str = _f("", "With --method unified: a model-based prompt (UniPrompt's), e.g. \"It's <mask>.\": "
                              "instead of free vectors the prompt tower reads <s> + these tokens + </s>, embedded by "
                              "the backbone's embedding module (frozen unless --tune trains the backbone; what "
                              "trains besides: the tower's layers and the label vectors), and all its positions go "
                              "before the input (--prompt-position is then first; "
                              "--prompt-length and --init are refused). A <mask> in it is what --readout auto then "
                              "reads, and the input takes the card's template without its own (--template unmasked). "
                              "Empty: free vectors.")
    reparam: str = _f("mlp", "With --method ptuning: the prompt encoder, mlp or lstm (a BiLSTM then the MLP).")
    prefix_projection: bool = _f(False, "With --method deep or prefix: P-tuning v2's reparameterisation (PEFT's "
                                        "prefix_projection): the per-layer vectors are free tables plus an MLP of the "
                                        "prompt vectors (tanh, last layer starting at zero), trained end to end and "
                                        "saved as the resulting tables.")
    init: str = _f("vocab", "Prompt start: vocab (sampled frequent word pieces), random, text (--init-text) or "
                            "label-words (the task card's label words of --lang).")
    init_text: str | None = _f(None, "With --init text: the text whose word pieces start the prompt (repeated to the "
                                     "length).")
    template: str = _f("auto", "agnostic (the task card's one template for every language), native (each language's "
                               "own cloze template from the card), unmasked (the agnostic one without its <mask>: for a "
                               "--prompt-text holding it, or with --readout mean) or auto (unmasked when --prompt-text "
                               "holds <mask>; else native when label words are scored: an LM head or a decoder; else "
                               "agnostic).")
    readout: str = _f("auto", "State the verbalizer reads: mask (the <mask> state: the input's, or the prompt's with "
                              "a --prompt-text holding it), mean (the mean of the input tokens), both (their average), "
                              "first (the first token's: <s> or [CLS]) or auto (mask for label words or a --prompt-text "
                              "holding <mask>, first for a linear head, else mean).")
    shots: int | None = _f(None, "K training examples per class (default: the whole pool).")
    seed: int = _f(42, "Seed for init, sampling and data order.")
    max_steps: int | None = _f(1200, "Optimizer steps; 0 means use --epochs.")
    epochs: float = _f(1.0, "Passes over the data when --max-steps is 0.")
    lr: float = _f(3e-2, "Peak learning rate of AdamW (default: the task card's train_defaults.lr, else 0.03).")
    batch_size: int = _f(16, "Examples per step, over all processes and micro-batches.")
    grad_accum: int = _f(1, "Micro-batches per step: the same result with less memory.")
    warmup_ratio: float = _f(0.06, "Linear warm-up share of the steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(0.0, "Clip the gradient of what trains to this total L2 norm before each step (0: never). "
                                   "Runs whose gradients stay below it are unchanged by it.")
    max_length: int = _f(128, "Max tokens per example (before the prompt).")
    select_size: int = _f(500, "Source-language rows held out for model selection (the default: at most a fifth of the "
                                 "pool; another value is taken as is, the rest of the pool trains).")
    eval_every: int = _f(200, "Steps between model-selection evaluations.")
    restart_check: float = _f(0.25, "Safety net: at the first selection point past this share of the steps, a run whose "
                                    "English held-out accuracy is within 2 points of the majority class restarts from "
                                    "its start at a third of the rate; one that had left that level and falls back to "
                                    "it later rolls back to its best tensors at a third of the rate (each at most "
                                    "twice; recorded in metrics.json and the log; off with fewer than 200 held-out "
                                    "rows). 0: never.")
    average_checkpoints: int = _f(0, "Save the mean of the prompt and label vectors over the last N selection points "
                                     "(checkpoint averaging, Schmidt et al. 2023) instead of the best one; the held-out "
                                     "accuracies of both are recorded. 0: keep the best (the default).")
    average_keep: str = _f("average", "With --average-checkpoints: average (keep the mean) or best (score and record the "
                                      "mean beside the best single checkpoint, keep the best: the run is unchanged).")
    init_examples: int = _f(256, "Training rows (stratified) whose class-mean states start the label vectors.")
    dtype: DType = _f(DType.AUTO, "Backbone compute dtype: auto (bf16 where the hardware runs it natively: GPUs with "
                                  "bf16, CPUs with AVX512_BF16 or AMX; else fp32), bf16 (autocast) or fp32.")
    source_split: str = _f("train", "Split the training rows come from (dev: target-language few-shot adaptation).")
    protocol: str = _f("zero-shot", "What the run may have read: zero-shot, few-shot-target (K target rows; set for "
                                    "adaptations and source_split 'dev') or transductive.")
    init_from: str | None = _f(None, "Start from saved prompts: a run folder, several comma-separated (their weighted "
                                     "average), a PEFT adapter folder, or 'library' (retrieve from the trained runs). "
                                     "Label vectors come along when the task's labels match or the card maps them.")
    init_weights: list[float] | None = _f(None, "Comma-separated weights of the --init-from runs (default: equal).")
    library: str | None = _f(None, "With --init-from library: the folder of trained runs to retrieve from (default: "
                                   "--runs-dir).")
    top_k: int = _f(3, "With --init-from library: keep the K best-ranked prompts.")
    transfer: str = _f("best", "With --init-from library: best (the top-k prompt with the best zero-shot selection "
                               "accuracy), average (the top k weighted by their ranking scores) or mixture (one prompt "
                               "trained --mixture-steps steps on the top-k tasks' data).")
    rank_by: str = _f("zero-shot", "With --init-from library: zero-shot (each prompt's accuracy on the held-out "
                                   "selection rows) or flat / mean / neurons (similarity to a probe prompt trained "
                                   "--probe-steps steps on this task, SPoT's recipe).")
    same_task: bool = _f(False, "With --init-from library: let prompts of this run's own task in (default: other tasks "
                                "only, as in SPoT).")
    library_adapted: bool = _f(False, "With --init-from library: let adapted runs in (few-shot-target: trained on "
                                      "target-language rows; left out by default).")
    probe_steps: int = _f(50, "With --rank-by flat|mean|neurons: steps of the probe prompt.")
    mixture_steps: int = _f(100, "With --transfer mixture: steps on the mixture (examples-proportional, at most "
                                 "--mixture-cap rows counted per source).")
    mixture_cap: int | None = _f(10000, "Examples-proportional mixing limit: a source counts at most this many rows.")
    unlabeled: str | None = _f(None, "Self-training: comma-separated target languages whose unlabeled inputs are "
                                     "pseudo-labelled by the prompt and added to the English rows (or 'official': the "
                                     "task's official targets).")
    unlabeled_split: str = _f("test", "Self-training: whose inputs are read, without labels: test (rows no dev figure "
                                      "uses) or dev. A run is transductive on the split it read.")
    unlabeled_file: str | None = _f(None, "Self-training: a JSON-lines file of your own text per language instead "
                                          "({lang} in the path), with the task's fields.")
    unlabeled_rows: int = _f(2000, "Self-training: unlabeled rows drawn per language (seeded).")
    self_train_rounds: int = _f(1, "Self-training: rounds of pseudo-labelling and training.")
    self_train_steps: int = _f(400, "Self-training: steps of each round (on English + pseudo-labelled rows).")
    self_train_keep: str = _f("best", "Self-training: which prompt a round hands on: best (the step English held-out "
                                      "rows score highest, the start included) or last (its last step, whatever "
                                      "English held-out rows say: the target gains of pseudo-labels can cost English "
                                      "accuracy, which best cannot see).")
    pseudo_rule: str = _f("top", "Self-training: which rows to keep: top (the most confident --pseudo-fraction of each "
                                 "language, balanced over the predicted classes) or threshold (probability >= "
                                 "--pseudo-threshold).")
    pseudo_fraction: float = _f(0.3, "Self-training, rule top: the share of each language's rows kept.")
    pseudo_threshold: float = _f(0.9, "Self-training, rule threshold: the least probability kept.")
    augment: str = _f("none", "English rows made multilingual without translation: none, or neighbours (each word "
                              "piece, with probability --augment-rate, replaced by its nearest neighbour of another "
                              "script in the frozen input-embedding space).")
    augment_rate: float = _f(0.15, "With --augment neighbours: the share of word pieces replaced.")

    def __post_init__(self):
        self.method = str(getattr(self.method, "value", self.method))  # a name, or a member of an Enum of names
        self.dtype = DType(self.dtype)
        for name, value, low in (("prompt_length", self.prompt_length, 1), ("shots", self.shots, 1),
                                 ("max_steps", self.max_steps, 1), ("batch_size", self.batch_size, 1),
                                 ("top_k", self.top_k, 1)):
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 1 <= self.grad_accum <= self.batch_size:
            raise ValueError(f"grad_accum must be between 1 and batch_size ({self.batch_size}), got {self.grad_accum}")
        if self.probe_steps < 1 or self.mixture_steps < 1:
            raise ValueError(f"probe_steps and mixture_steps must be >= 1, got {self.probe_steps}, {self.mixture_steps}")
        for name, choices in (("source_split", SOURCE_SPLITS), ("transfer", TRANSFERS), ("rank_by", RANK_BY),
                              ("verbalizer", VERBALIZERS), ("label_reduce", LABEL_REDUCES),
                              ("prompt_position", tuple(POSITIONS)), ("reparam", REPARAMS), ("init", INITS),
                              ("template", TEMPLATES), ("readout", ("auto", *READOUTS)), ("protocol", PROTOCOLS),
                              ("self_train_keep", SELF_TRAIN_KEEPS), ("average_keep", ("average", "best"))):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
        if self.unlabeled_split not in UNLABELED_SPLITS or self.pseudo_rule not in PSEUDO_RULES or self.augment not in AUGMENTS:
            raise ValueError(f"unlabeled_split must be test or dev, pseudo_rule top or threshold, augment none or "
                             f"neighbours; got {self.unlabeled_split!r}, {self.pseudo_rule!r}, {self.augment!r}")
        if not (0 < self.pseudo_fraction <= 1 and 0 < self.pseudo_threshold < 1 and 0 <= self.augment_rate < 1):
            raise ValueError("pseudo_fraction must be in (0, 1], pseudo_threshold in (0, 1), augment_rate in [0, 1)")
        if self.self_train_rounds < 1 or self.self_train_steps < 1 or self.unlabeled_rows < 1:
            raise ValueError("self_train_rounds, self_train_steps and unlabeled_rows must be >= 1")
        if self.source_split == "dev" and not self.shots:
            raise ValueError("source_split='dev' needs shots (the rest of dev is kept for evaluation)")
        if self.source_split == "dev" and self.protocol == "zero-shot":
            self.protocol = "few-shot-target"  # trained on evaluation-split rows of the target language
        if self.init_from == LIBRARY and self.init_weights is not None:
            raise ValueError("init_weights cannot be combined with init_from='library' (the scores weight the average)")
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init='text' needs init_text (--init-text)")
        if self.init_text and self.init != "text":
            raise ValueError("init_text is only used with init='text' (--init text)")
        self._check_tune()

    def _check_tune(self) -> None:
        """--tune and its options: head and probe train no prompt (method none) and read a linear head;
        the backbone's rate defaults by mode; LoRA's options only with lora."""
        if self.tune not in TUNES:
            raise ValueError(f"tune must be {', '.join(list(TUNES)[:-1])} or {list(TUNES)[-1]}, got {self.tune!r}")
        if self.tune in HEAD_TUNES:
            if self.method not in ("deep", "none"):  # deep: the default, not a choice
                raise ValueError(f"tune={self.tune!r} trains no prompt (method 'none'), got method={self.method!r}")
            self.method = "none"
            self.verbalizer = "linear" if self.verbalizer == "auto" else self.verbalizer
            if self.tune == "probe" and self.verbalizer == "hard":
                raise ValueError("tune='probe' trains only its head, and verbalizer='hard' has none (label words under "
                                 "a frozen LM head): use linear (the default), soft, centered or soft-words")
        if self.method == "none" and self.tune == "prompt":
            raise ValueError("method='none' trains no prompt: use tune='probe' (a linear head on the frozen backbone), "
                             "'head' or another tune that trains the backbone")
        if self.tune == "lora" and self.average_checkpoints > 1 and self.average_keep == "average":
            raise ValueError("average_keep='average' would average LoRA's factors A and B apart (the mean of B times "
                             "the mean of A is not the mean update): use average_keep='best' with tune='lora'")
        if self.backbone_lr is None:
            self.backbone_lr = TUNES[self.tune]
        elif TUNES[self.tune] is None:
            raise ValueError(f"backbone_lr needs tune full, bitfit, lora or head; tune={self.tune!r} keeps the backbone frozen")
        if self.backbone_lr is not None and self.backbone_lr <= 0:
            raise ValueError(f"backbone_lr must be > 0, got {self.backbone_lr}")
        if self.tune != "lora" and (self.lora_rank != 8 or self.lora_alpha != 16 or self.lora_targets):
            raise ValueError(f"lora_rank, lora_alpha and lora_targets need tune='lora', got tune={self.tune!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}")

    @classmethod
    def help(cls, name: str) -> str:
        """A field's help text: the one the CLI shows."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    def to_dict(self) -> dict:
        """Every field; a prompt run (--tune prompt, its options at their defaults) leaves the --tune fields
        out, and a run without --prompt-text that field, so its config reads as before they existed (the same
        file, the same run to continue)."""
        out = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}
        if not self.prompt_text:
            out.pop("prompt_text")
        return {k: v for k, v in out.items() if k not in TUNE_FIELDS} if self.tune == "prompt" else out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
