"""The registry of prompt methods: one line per method (``register_method``), refusing duplicates;
``build_prompt`` builds any of them from options named as ``TrainConfig``'s fields, without
branching on the method."""

from __future__ import annotations

from dataclasses import MISSING, fields

from ..errors import XPromptError
from .base import PromptConfig, PromptMethod
from ..config import METHODS

_METHODS: dict[str, tuple[type[PromptConfig], type[PromptMethod], str]] = {}


def register_method(name: str, config: type[PromptConfig], cls: type[PromptMethod], help: str | None = None) -> None:
    """Make ``cls`` (configured by ``config``) available as ``--method name`` (its help: ``help``, else
    its line in ``config.METHODS``, where the command line reads it without importing torch)."""
    if name in _METHODS:
        raise ValueError(f"prompt method {name!r} is registered twice")
    help = help or METHODS.get(name)
    if help is None:
        raise ValueError(f"prompt method {name!r} has no help: add it to METHODS in xprompt/config.py or pass help")
    if not issubclass(config, PromptConfig) or not issubclass(cls, PromptMethod):
        raise TypeError(f"{name}: a method is a PromptConfig and a PromptMethod subclass")
    cls.name, cls.config_class = name, config
    _METHODS[name] = (config, cls, help)


def method_names() -> list[str]:
    return list(_METHODS)


def method_help() -> str:
    """One help text for --method, from the registrations."""
    return "; ".join(f"{name}: {help}" for name, (_, _, help) in _METHODS.items())


def method_class(name: str) -> type[PromptMethod]:
    try:
        return _METHODS[str(name)][1]
    except KeyError:
        raise XPromptError(f"unknown method '{name}'; known: {', '.join(_METHODS)}") from None


def method_for_peft(peft_type: str) -> type[PromptMethod] | None:
    """The method a PEFT adapter of this type starts (None: no method reads it)."""
    return next((cls for _, cls, _ in _METHODS.values() if peft_type in cls.peft_imports), None)


def method_options(name: str) -> list[str]:
    """The options (TrainConfig field names) a method takes."""
    return [f.name for f in fields(_METHODS[name][0])] if name in _METHODS else []


def check_options(name: str, options: dict) -> None:
    """Refuse an option set away from its default for a method that does not take it (e.g.
    --prefix-projection with --method soft)."""
    from ..config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    taken = set(method_options(name))
    for option, value in options.items():
        if option not in taken and option in defaults and value is not None and value != defaults[option]:
            users = [m for m in _METHODS if option in method_options(m)]
            flag = "--" + option.replace("_", "-")
            raise XPromptError(f"{flag} needs --method {' or '.join(users)}, not {name}")


def build_prompt(name: str, hidden: int, num_layers: int, **options) -> PromptMethod:
    """A method's prompt for a backbone of ``hidden`` width and ``num_layers`` layers; ``options``
    are TrainConfig-named fields (prompt_length, prompt_position, reparam, prefix_projection,
    tower_layers); those a method does not take must be at their defaults."""
    cls = method_class(name)
    check_options(name, options)
    config = cls.config_class(**{k: options[k] for k in method_options(name) if k in options and options[k] is not None})
    return cls(config, hidden, num_layers)
