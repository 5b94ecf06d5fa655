"""The embedded backbone's tokenizer, read when first needed.

Reading its 12 MB ``tokenizer.json`` (250,002 pieces) took 0.8 s here (scripts/startup.py), and an evaluation
whose rows are already tokenised in the cache never tokenises: it needs the special ids and the
tokenizer's cache key (``data.encoding_key``) alone. ``LazyTokenizer`` knows those from a memo under
the cache folder, kept beside the file's size, inode and modification time, and reads the file the
first time anything else is asked of it, and hands every other attribute, call and ``len`` to the
tokenizer then read (``PreTrainedTokenizerFast``, as ``embedded.load_tokenizer`` reads it).

It is a stand-in, not the class: ``isinstance`` sees the stand-in, names starting with ``_`` are its
own, a copy or a serialised form is the tokenizer read again from the file, and a vocabulary changed
through a method (``add_tokens``) is not seen by the ids and key it remembers. xprompt does none of
these; code that needs the tokenizer itself takes ``loaded()``. The memo's entry is kept per ``tokenizer_config.json``
(where the special tokens are named) and per ``tokenizers`` / ``transformers`` version (which decide
the serialised form the key hashes): a change to either is a new entry.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .embedded import load_tokenizer, remembered

SPECIAL_IDS = ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id",
               "unk_token_id")


def facts(tokenizer) -> dict:
    """What an evaluation reads of a tokenizer: its cache key and its special ids."""
    from ..data import _tokenizer_key

    return {"key": _tokenizer_key(tokenizer), "ids": {name: getattr(tokenizer, name) for name in SPECIAL_IDS}}


def _memo_field(folder: Path) -> str:
    """The memo entry's name: the special tokens' file's size and mtime, and the library versions."""
    from importlib.metadata import version

    config = (folder / "tokenizer_config.json").stat()
    return (f"tokenizer {config.st_size}:{config.st_mtime_ns} tokenizers {version('tokenizers')} "
            f"transformers {version('transformers')}")


class LazyTokenizer:
    """The tokenizer of the converted folder ``folder``, read on first use (see the module)."""

    def __init__(self, folder: Path, memo: Path | None = None):
        self.__dict__.update(_folder=Path(folder), _tokenizer=None, _reading=threading.Lock())
        field = _memo_field(Path(folder))
        known = remembered(Path(folder) / "tokenizer.json", field, lambda: facts(self.loaded()), memo)
        self.__dict__.update(_xprompt_key=known["key"], **known["ids"])

    def loaded(self):
        """The tokenizer itself, read now if it has not been."""
        with self._reading:  # once, whichever thread (``serve``'s handlers) asks first
            if self._tokenizer is None:
                self.__dict__["_tokenizer"] = load_tokenizer(self._folder)
        return self._tokenizer

    def __getattr__(self, name: str):  # anything but the special ids and the key: the tokenizer's own
        if name.startswith("__"):  # copying and serialising probe these: not a reason to read the file
            raise AttributeError(name)
        return getattr(self.loaded(), name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):  # xprompt's own marks (the cache key)
            self.__dict__[name] = value
            return
        setattr(self.loaded(), name, value)  # the tokenizer's: its special ids may change with it
        for known in SPECIAL_IDS:
            self.__dict__.pop(known, None)

    def __call__(self, *args, **kwargs):
        return self.loaded()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.loaded())

    def __bool__(self) -> bool:  # a tokenizer is there: no reason to read it (``if tokenizer:``)
        return True

    def __reduce__(self):  # pickled (datasets' fingerprints, worker processes) as the tokenizer it stands for
        return load_tokenizer, (self._folder,)
