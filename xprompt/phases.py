"""What a long step before the first training step (or an evaluation) tells its caller: a phase is
a description and a count of rows, entered as a context manager that yields ``advance(rows)``. The
CLI shows each as a progress bar and a closing line; library callers hear nothing (``silent``)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def silent(description: str, total: int | None = None):
    """The phase of a caller that asked for none: ``advance`` does nothing."""
    yield lambda rows=1: None


def phase_or_silent(phase):
    """``phase`` where the caller gave one, else ``silent``."""
    return phase if phase is not None else silent
