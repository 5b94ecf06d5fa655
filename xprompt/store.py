"""The run directory on disk: run folders, their lock, the saved prompt and its card (every file
written through ``fileio``: a temporary name, synced and renamed)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from .errors import XPromptError
from .fileio import atomic_write, read_json, write_json
from .lineage import LINEAGE_FILE, load_lineage
from .lineage import run_protocol as lineage_protocol

if TYPE_CHECKING:
    import torch

PROMPT_DIR = "prompt"
PROMPT_FILE = "prompt.safetensors"
CARD_FILE = "xprompt.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_cache_dir() -> Path:
    """Where the converted embedded backbone and tokenised splits are cached: $XDG_CACHE_HOME/xprompt
    (~/.cache/xprompt)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xprompt"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on a run while training it; a second trainer is refused, not interleaved."""
    path = Path(run_dir) / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise XPromptError(f"run {run_dir} is being trained by another process; wait for it or stop it") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def new_run_dir(runs_dir: Path, name: str) -> Path:
    if not _SAFE_NAME.match(name):
        raise XPromptError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'")
    runs_dir = Path(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        path = runs_dir / name
        if path.is_dir() and not any(path.iterdir()):
            return path  # left empty by a run killed as it started: take it over
        suffix = 1
        while path.exists():
            suffix += 1
            path = runs_dir / f"{name}-{suffix}"
        path.mkdir()
    except OSError as e:
        raise XPromptError(f"cannot create a run under {runs_dir}: {e.strerror or e}") from None
    return path


def default_run_name(task: str, lang: str, method: str, seed: int) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{task}-{lang}-{method}-s{seed}"


def run_protocol(run_dir: Path) -> str:
    """A run's protocol (zero-shot, few-shot-target, transductive), derived from its lineage: what it
    and every run it came from read (``xprompt.lineage``)."""
    return lineage_protocol(load_lineage(run_dir))


def latest_run(runs_dir: Path, task: str | None = None) -> Path:
    """The most recently finished run (one holding a saved prompt) of ``task`` (any task: None) whose
    lineage trained on no target-language rows: an adapted run, or one started from one, is never
    the default run to evaluate."""
    runs = [p.parent.parent for p in Path(runs_dir).glob(f"*/{PROMPT_DIR}/{PROMPT_FILE}")]
    if task is not None:
        runs = [run for run in runs if _card_task(run) == task]
    runs = [run for run in runs if run_protocol(run) != "few-shot-target"]
    if not runs:
        of = f" of task {task}" if task else ""
        raise XPromptError(f"no finished run{of} under {runs_dir} (adapted runs aside); train one with "
                           f"'xprompt train{f' --task {task}' if task else ''}' or pass --run")
    return max(runs, key=lambda p: (p / PROMPT_DIR / PROMPT_FILE).stat().st_mtime)


def _card_task(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / PROMPT_DIR / CARD_FILE).read_text(encoding="utf-8")).get("task")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def save_prompt(run_dir: Path, tensors: dict[str, torch.Tensor], card: dict) -> None:
    from safetensors.torch import save_file  # torch: imported where tensors are, not by every command

    folder = Path(run_dir) / PROMPT_DIR
    write_json(folder / CARD_FILE, card)  # the tensors file comes last: its presence means "complete"
    atomic_write(folder / PROMPT_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_prompt(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    folder = Path(run_dir) / PROMPT_DIR
    path = folder / PROMPT_FILE
    if not path.is_file():
        raise XPromptError(f"{run_dir} holds no trained prompt ({path} missing); is it a run directory?")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise XPromptError(f"{path}: corrupt or truncated safetensors file ({e}); retrain or restore it") from None
    return tensors, read_json(folder / CARD_FILE)


def load_card(run_dir: Path) -> dict:
    """A finished run's prompt card alone (no tensors read, no torch imported)."""
    if not (Path(run_dir) / PROMPT_DIR / PROMPT_FILE).is_file():
        raise XPromptError(f"{run_dir} holds no trained prompt ({Path(run_dir) / PROMPT_DIR / PROMPT_FILE} missing); "
                           "is it a run directory?")
    return read_json(Path(run_dir) / PROMPT_DIR / CARD_FILE)


def recorded_tasks_dir(run_dir: Path) -> Path | None:
    """The task cards' folder a run was trained with (None: the bundled cards)."""
    try:
        folder = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("tasks_dir")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return Path(folder) if folder else None


def copy_prompt_folder(source: Path, target: Path, config_extra: dict | None = None) -> None:
    """Copy a run's ``prompt/``, ``config.json``, ``metrics.json`` and lineage (the same run, so the same
    id and record; an older run's derived one is written) to a new folder ``target``, all or nothing
    (staged beside it, then renamed); ``config_extra`` is merged into config.json."""
    import shutil

    if target.exists():
        raise XPromptError(f"{target} exists; remove it first or choose another name")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        shutil.copytree(source / PROMPT_DIR, staging / PROMPT_DIR)
        if (source / "metrics.json").is_file():
            shutil.copy2(source / "metrics.json", staging / "metrics.json")
        config = read_json(source / "config.json") if (source / "config.json").is_file() else {}
        if config or config_extra:
            write_json(staging / "config.json", {**config, **(config_extra or {})})
        write_json(staging / LINEAGE_FILE, load_lineage(source))
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
