"""Prompts: the trainable vectors. One file per method behind one interface (``base.PromptMethod``),
registered here, one line each; ``build_prompt`` builds any of them. A new method is one file and
one line below."""

from .base import PromptConfig, PromptMethod, widen_mask
from .deep import DeepPrompt
from .init import input_vectors, vocab_init
from .none import NoneConfig, NonePrompt
from .prefix import PrefixPrompt, kv_projections
from .projection import LayerProjection, ProjectedConfig
from .ptuning import PTuningConfig, PTuningPrompt
from .registry import build_prompt, check_options, method_class, method_for_peft, method_help, method_names, register_method
from .soft import SoftPrompt
from .unified import UnifiedConfig, UnifiedPrompt

register_method("soft", PromptConfig, SoftPrompt)
register_method("ptuning", PTuningConfig, PTuningPrompt)
register_method("deep", ProjectedConfig, DeepPrompt)
register_method("prefix", ProjectedConfig, PrefixPrompt)
register_method("unified", UnifiedConfig, UnifiedPrompt)
register_method("none", NoneConfig, NonePrompt)

__all__ = ["PromptConfig", "PromptMethod", "SoftPrompt", "PTuningPrompt", "DeepPrompt",
           "PrefixPrompt", "UnifiedPrompt", "NonePrompt", "LayerProjection", "build_prompt", "check_options", "input_vectors",
           "kv_projections", "method_class", "method_for_peft", "method_help", "method_names", "register_method",
           "vocab_init", "widen_mask"]
