"""Files written so that a crash never leaves half of one: a temporary name, fsync, rename."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from .errors import XPromptError

_UMASK = os.umask(0)
os.umask(_UMASK)


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
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error, not an OSError
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).removeprefix("Error while serializing: ")
        raise XPromptError(f"cannot write {path}: {reason} (disk full or read-only?)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, data) -> None:
    write_text(path, json_text(data))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XPromptError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XPromptError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive advisory lock named after ``path`` (a file in the temporary folder, so no lock file
    lands beside a store kept in git) while the block runs; other processes taking it wait (where
    ``store.run_lock`` refuses a second trainer instead)."""
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"xprompt-{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_json(path: Path, merge, dump=lambda data: json.dumps(data, indent=2) + "\n"):
    """Read the JSON store at ``path`` ({} when there is none), write ``merge(data)`` back atomically, and
    return it, all under ``locked(path)``: processes that share one store (two lanes of a table script)
    each add their records to what the other wrote instead of writing over it."""
    with locked(path):
        data = read_json(path) if Path(path).is_file() else {}
        merged = merge(data)
        write_text(path, dump(merged))
        return merged


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
