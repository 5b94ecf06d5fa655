"""The run registry: an SQLite index of runs and their results, kept beside the run folders.

The folders are the truth; the index (``<runs-dir>/index.sqlite``, WAL mode) is a cache that
``rebuild`` recreates from them at any time, so deleting it loses nothing: an index that SQLite
cannot read (a corrupt or foreign file) is rebuilt from the folders on its first use, with a
one-line notice on stderr.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from .errors import XPromptError
from .lineage import load_lineage, run_protocol

INDEX_FILE = "index.sqlite"
SCHEMA_VERSION = 5  # bump on any schema change: an index of another version is rebuilt from the folders
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, path TEXT, task TEXT, lang TEXT, backbone TEXT, method TEXT,
    prompt_length INTEGER, shots INTEGER, seed INTEGER, lr REAL, max_steps INTEGER,
    finished INTEGER, select_accuracy REAL, train_seconds REAL, config TEXT,
    protocol TEXT, compute_dtype TEXT, backbone_sha256 TEXT, task_version INTEGER, data_dir TEXT
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT, task TEXT, split TEXT, lang TEXT, n INTEGER, accuracy REAL, macro_f1 REAL, correct TEXT,
    row_limit INTEGER, rows TEXT, excluded INTEGER, protocol TEXT, scores TEXT,
    PRIMARY KEY (run_id, task, split, lang)
);
"""

# the figures a result may carry besides accuracy and macro-F1 (a generation task's sacrebleu scores):
# kept, with their sacrebleu signatures, in the results' ``scores`` column (JSON)
TEXT_METRICS = ("chrf", "bleu", "chrf++")


class _Unreadable(Exception):
    """The index file is not a database SQLite can read (corrupt, truncated, another kind of file)."""


def _unreadable(error: sqlite3.Error) -> bool:
    """Whether an SQLite error says the file itself is damaged (not, say, locked by a writer)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return type(error) is sqlite3.DatabaseError


def _damaged(error: BaseException) -> bool:
    return isinstance(error, _Unreadable) or (isinstance(error, sqlite3.Error) and _unreadable(error))


_recovering: set[str] = set()


def _recover(runs_dir: Path, error: BaseException) -> None:
    """Rebuild an unreadable index from the run folders, saying so in one line on stderr (once: an
    index that is unreadable again while it is being rebuilt is an error)."""
    path = Path(runs_dir) / INDEX_FILE
    if str(path) in _recovering:
        raise XPromptError(f"the run index {path} is unreadable even when rebuilt ({error}); check the disk "
                           f"and the folder's permissions") from None
    print(f"note: the run index {path} was unreadable ({error}); rebuilding it from the run folders", file=sys.stderr)
    _recovering.add(str(path))
    try:
        rebuild(runs_dir)
    finally:
        _recovering.discard(str(path))


def _connect(runs_dir: Path) -> sqlite3.Connection:
    try:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(Path(runs_dir) / INDEX_FILE, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        if db.execute("PRAGMA user_version").fetchone()[0] == 0:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as e:
        if _unreadable(e):
            raise _Unreadable(str(e)) from e
        raise XPromptError(f"cannot open the run index {Path(runs_dir) / INDEX_FILE}: {e}; "
                           f"delete it and run 'xprompt runs --rebuild'") from None
    except OSError as e:
        raise XPromptError(f"cannot open the run index {Path(runs_dir) / INDEX_FILE}: {e}; "
                           f"delete it and run 'xprompt runs --rebuild'") from None
    return db


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _current(runs_dir: Path) -> bool:
    """Whether an index exists and has this version's schema (an unreadable one has none: its
    callers rebuild it)."""
    path = Path(runs_dir) / INDEX_FILE
    if not path.is_file():
        return False
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            return db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    except sqlite3.Error as e:
        if not _unreadable(e):
            raise XPromptError(f"cannot open the run index {path}: {e}") from None
        print(f"note: the run index {path} was unreadable ({e}); rebuilding it from the run folders", file=sys.stderr)
        return False


def _scores(result: dict) -> str | None:
    """A result's text-generation figures and their sacrebleu signatures, as JSON (None for a
    classification result: its accuracy and macro-F1 have columns of their own)."""
    figures = {name: result[name] for name in TEXT_METRICS if result.get(name) is not None}
    if not figures:
        return None
    return json.dumps({**figures, "signature": result.get("signature") or {}}, sort_keys=True, ensure_ascii=False)


def index_run(runs_dir: Path, run_dir: Path) -> None:
    """Insert or refresh one run (its config, training summary and every evaluation)."""
    try:
        _index_run(runs_dir, run_dir)
    except (sqlite3.Error, _Unreadable) as e:
        if not _damaged(e):
            raise
        _recover(runs_dir, e)  # every folder indexed again, this one included


def _index_run(runs_dir: Path, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    if (Path(runs_dir) / INDEX_FILE).is_file() and not _current(runs_dir):
        rebuild(runs_dir)
        return
    config = _read(run_dir / "config.json")
    if "train" not in config:
        return  # not a run folder
    cfg, metrics = config["train"], _read(run_dir / "metrics.json")
    train = metrics.get("train", {})
    finished = (run_dir / "prompt" / "prompt.safetensors").is_file()
    protocol = run_protocol(load_lineage(run_dir))  # derived from what the run and its ancestors read
    dtype = (config.get("compute") or {}).get("dtype") or train.get("dtype") or cfg.get("dtype")
    with closing(_connect(runs_dir)) as db, db:
        db.execute("DELETE FROM results WHERE run_id = ?", (run_dir.name,))
        db.execute(
            "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run_dir.name, str(run_dir), cfg.get("task"), cfg.get("lang"), cfg.get("backbone"), cfg.get("method"),
             cfg.get("prompt_length"), cfg.get("shots"), cfg.get("seed"), cfg.get("lr"), cfg.get("max_steps"),
             int(finished), train.get("select_accuracy"), train.get("train_seconds"), json.dumps(cfg, sort_keys=True),
             protocol, dtype, (config.get("backbone") or {}).get("sha256"), config.get("task_version"),
             config.get("data_dir")),
        )
        for task, splits in metrics.get("eval", {}).items():
            for split, langs in splits.items():
                for lang, r in langs.items():
                    db.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                               (run_dir.name, task, split, lang, r.get("n"), r.get("accuracy"), r.get("macro_f1"),
                                r.get("correct"), r.get("limit"), r.get("rows"), r.get("excluded"),
                                r.get("protocol") or protocol, _scores(r)))


def forget_run(runs_dir: Path, run_id: str) -> None:
    """Drop one run's rows from the index (its folder is gone)."""
    if not (Path(runs_dir) / INDEX_FILE).is_file():
        return
    try:
        with closing(_connect(runs_dir)) as db, db:
            db.execute("DELETE FROM results WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
    except (sqlite3.Error, _Unreadable) as e:
        if not _damaged(e):
            raise
        _recover(runs_dir, e)  # the folder is gone (or being removed): the rebuilt index lacks it


def rebuild(runs_dir: Path) -> int:
    """Recreate the index from the run folders; returns the number of runs indexed."""
    path = Path(runs_dir) / INDEX_FILE
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    count = 0
    # a folder named .<something> is no run (remove_run renames a run to .removing-<name> first)
    for run_dir in sorted(p for p in Path(runs_dir).iterdir()
                          if not p.name.startswith(".") and (p / "config.json").is_file()):
        index_run(runs_dir, run_dir)
        count += 1
    return count


def list_runs(runs_dir: Path, **filters) -> list[dict]:
    """Runs matching every given column value (``task="xnli"``, ``method="deep"`` ...), oldest first."""
    if not _current(runs_dir):
        if not Path(runs_dir).is_dir():
            return []
        rebuild(runs_dir)
    wanted = {k: v for k, v in filters.items() if v is not None}
    columns = {"task", "lang", "backbone", "method", "shots", "seed", "finished", "prompt_length", "protocol"}
    unknown = set(wanted) - columns
    if unknown:
        raise XPromptError(f"unknown filter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(columns))}")
    try:
        return _select(runs_dir, wanted)
    except (sqlite3.Error, _Unreadable) as e:
        if not _damaged(e):
            raise
        _recover(runs_dir, e)
        return _select(runs_dir, wanted)


def _select(runs_dir: Path, wanted: dict) -> list[dict]:
    """The runs matching ``wanted`` with their results; a result's generation figures (``scores``)
    come back as keys of their own (``chrf``, ``bleu``, ``signature``...)."""
    where = " AND ".join(f"{k} = ?" for k in wanted) or "1"
    with closing(_connect(runs_dir)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute(f"SELECT * FROM runs WHERE {where} ORDER BY run_id", list(wanted.values()))]
        for row in rows:
            row["results"] = [dict(r) for r in db.execute(
                "SELECT task, split, lang, n, accuracy, macro_f1, correct, row_limit AS 'limit', rows, excluded, protocol, "
                "scores FROM results WHERE run_id = ?", (row["run_id"],))]
            for result in row["results"]:
                result.update(json.loads(result.pop("scores") or "{}"))
    return rows
