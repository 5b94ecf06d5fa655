"""The run directory on disk; every file is written to a temporary name, synced and renamed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import XPromptError

PROMPT_DIR = "prompt"
PROMPT_FILE = "prompt.safetensors"
CARD_FILE = "xprompt.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise XPromptError(f"cannot write {path}: {e.strerror or e} (disk full or read-only?)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XPromptError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XPromptError(f"{path}: not valid JSON ({e})") from None


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Keep only the log records up to ``step`` (a resumed run logs the later steps again)."""
    if not Path(path).is_file():
        return
    kept = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


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


def latest_run(runs_dir: Path) -> Path:
    """The most recently finished run (one holding a saved prompt)."""
    runs = [p.parent.parent for p in Path(runs_dir).glob(f"*/{PROMPT_DIR}/{PROMPT_FILE}")]
    if not runs:
        raise XPromptError(f"no finished run under {runs_dir}; train one with 'xprompt train' or pass --run")
    return max(runs, key=lambda p: (p / PROMPT_DIR / PROMPT_FILE).stat().st_mtime)


def save_prompt(run_dir: Path, tensors: dict[str, torch.Tensor], card: dict) -> None:
    folder = Path(run_dir) / PROMPT_DIR
    write_json(folder / CARD_FILE, card)  # the tensors file comes last: its presence means "complete"
    atomic_write(folder / PROMPT_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_prompt(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(run_dir) / PROMPT_DIR
    path = folder / PROMPT_FILE
    if not path.is_file():
        raise XPromptError(f"{run_dir} holds no trained prompt ({path} missing); is it a run directory?")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise XPromptError(f"{path}: corrupt or truncated safetensors file ({e}); retrain or restore it") from None
    return tensors, read_json(folder / CARD_FILE)


def copy_prompt_folder(source: Path, target: Path, config_extra: dict | None = None) -> None:
    """Copy a run's ``prompt/``, ``config.json`` and ``metrics.json`` to a new folder ``target``,
    all or nothing (staged beside it, then renamed); ``config_extra`` is merged into config.json."""
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
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
