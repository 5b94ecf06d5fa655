"""Checks of a run's options that need no model and no torch: made before anything is loaded or
created, so a wrong name or path answers in a moment (the command line calls them before its heavy
imports; ``train_run`` calls them again for every other caller)."""

from __future__ import annotations

import json
import string
from pathlib import Path

from .config import LIBRARY, WORD_VERBALIZERS
from .errors import XPromptError

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
CHANGES_BACKBONE = ("full", "bitfit", "lora", "head")  # the --tune modes whose runs bring their own backbone weights


def tune_of(card: dict) -> str:
    """The --tune mode a saved prompt's card records ('prompt': a run before --tune, or without it)."""
    return (card.get("tune") or {}).get("mode", "prompt")


def refuse_tuned(cards: dict, use: str) -> None:
    """Refuse runs (``{name: card}``) that tuned their backbone where ``use`` runs the base backbone (or
    one backbone for several runs): their prompt without their weights would silently be another model."""
    for name, card in cards.items():
        if tune_of(card) in CHANGES_BACKBONE:
            raise XPromptError(f"{name} was trained with --tune {tune_of(card)}: its prompt needs that run's own "
                               f"backbone weights, which {use} does not apply")


def _card(run: Path) -> dict:
    try:
        return json.loads((Path(run) / "prompt" / "xprompt.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_tune(cfg) -> None:
    """What --tune cannot be combined with: LoRA under a prefix prompt (its keys and values overwrite the
    projections' outputs, which LoRA would then shift again), and, for a run that trains its backbone,
    the library's trials and self-training (their short trainings and restores handle the prompt only)."""
    if cfg.tune == "lora" and cfg.method == "prefix":
        raise XPromptError("--tune lora cannot be combined with --method prefix (its keys and values replace the "
                           "projections LoRA adapts); use --method deep, soft or unified")
    if cfg.tune in CHANGES_BACKBONE and (cfg.init_from == LIBRARY or cfg.unlabeled):
        raise XPromptError(f"--tune {cfg.tune} cannot be combined with "
                           f"{'--init-from library' if cfg.init_from == LIBRARY else '--unlabeled (self-training)'}: "
                           "they train and restore the prompt alone")


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder (not one of xprompt's run folders, which carry one beside their prompt)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / "prompt" / "prompt.safetensors").is_file()


def unlabeled_languages(cfg, task) -> list[str]:
    """``cfg.unlabeled``: comma-separated languages, or ``official`` (the task's official targets)."""
    langs = task.official_targets if cfg.unlabeled == "official" else [x.strip() for x in cfg.unlabeled.split(",") if x.strip()]
    if cfg.lang in langs:
        raise XPromptError(f"--unlabeled {cfg.lang}: the training language has labels; name target languages")
    task.check_languages(langs, None if cfg.unlabeled_file else cfg.unlabeled_split)
    return langs


def check_unlabeled(cfg, task) -> list[str]:
    """Self-training's options checked before anything is trained: the languages (and that their split
    exists), and ``--unlabeled-file``'s one placeholder, {lang}, and a file for each language."""
    langs = unlabeled_languages(cfg, task)
    if cfg.unlabeled_file:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(cfg.unlabeled_file) if name is not None}
        except ValueError as e:
            raise XPromptError(f"--unlabeled-file {cfg.unlabeled_file!r}: {e}; write {{lang}} where the language goes") from None
        if names - {"lang"}:
            raise XPromptError(f"--unlabeled-file {cfg.unlabeled_file!r}: unknown placeholder(s) "
                               f"{', '.join('{' + n + '}' for n in sorted(names - {'lang'}))}; the one placeholder is {{lang}}")
        for lang in langs:
            path = Path(cfg.unlabeled_file.format(lang=lang))
            if not path.is_file():
                raise XPromptError(f"--unlabeled-file {path} (for {lang}) is missing")
    return langs


def check_run(cfg, task) -> None:
    """Everything about a run's options that can be checked before any model is loaded or folder made:
    the language and split it trains on, its start runs, its self-training options."""
    task.check_languages([cfg.lang], cfg.source_split)
    if cfg.init_from and cfg.init_from != LIBRARY:
        for path in cfg.init_from.split(","):
            folder = Path(path)
            if not ((folder / "prompt" / "prompt.safetensors").is_file() or is_adapter(folder)):
                raise XPromptError(f"--init-from {path}: not a finished run folder (no prompt/prompt.safetensors) "
                                   "nor a PEFT adapter folder")
            refuse_tuned({f"--init-from {path}": _card(folder)}, "a new run (it starts from the prompt alone)")
    if cfg.init_from == LIBRARY and cfg.library and not Path(cfg.library).is_dir():
        raise XPromptError(f"--library {cfg.library} is not a folder")
    if cfg.unlabeled:
        check_unlabeled(cfg, task)
    check_tune(cfg)


def check_runs(configs: list, task) -> None:
    """``check_run`` for every config of a sweep (it fails before its first run, not at its third)."""
    for cfg in configs:
        check_run(cfg, task)


def resolve_template(style: str, kind: str) -> str:
    """``--template auto``: each language's own cloze template (``native``) when label words are
    scored (an LM head or a decoder), else the language-agnostic one (``agnostic``)."""
    if style == "auto":
        return "native" if kind in WORD_VERBALIZERS else "agnostic"
    return style


def settle_readout_template(cfg, kind: str, readout: str) -> tuple[str, str]:
    """The readout and template style (``resolve_template``) of a run with ``cfg.prompt_text`` taken
    in: a prompt text holding ``<mask>`` is read there (``--readout auto``: mask) and the input takes
    the card's template without its own (``--template auto``: unmasked). Refuses two ``<mask>``s, a
    readout left without one, and the free vectors' options beside a prompt text."""
    from .config import TrainConfig
    from .tasks import MASK

    text = cfg.prompt_text
    held = MASK in text
    if text and (cfg.init != "vocab" or cfg.init_text or cfg.prompt_length != TrainConfig.prompt_length):
        raise XPromptError("--init, --init-text and --prompt-length set free prompt vectors; a --prompt-text prompt "
                           "has none (its tokens are its positions)")
    readout = "mask" if held and cfg.readout == "auto" else readout
    template = "unmasked" if held and cfg.template == "auto" else resolve_template(cfg.template, kind)
    if held and template != "unmasked":
        raise XPromptError(f"--prompt-text {text!r} holds the <mask>, so the input takes the card's template without "
                           f"its own: use --template auto or unmasked, not {template}")
    if template == "unmasked" and not held and readout in ("mask", "both"):
        raise XPromptError(f"--readout {readout} reads a <mask>, and neither the input (--template unmasked) nor "
                           "--prompt-text holds one: put <mask> into --prompt-text or use --readout mean")
    return readout, template
