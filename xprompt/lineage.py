"""Run lineage: what a run and every run it came from read, and the protocol of each score derived
from it (never copied from a config default).

A run's ``lineage.json`` holds its identity (``run_id``, made once when the run is created), what it
read itself (``reads``: task, split, language, use, whether the rows carried labels, whose rows they
were, how many and a hash of their ids; the ids themselves where a score may meet them) and, nested,
the lineage of each parent (the runs it started from, was adapted from, ensembled, or copied). The
record is self-contained: an ancestor's folder may be gone and its reads still count.

Derivation (``score_protocol``), for a score on (task, split, language L) of a run whose own training
language is S:
- ``transductive``: the lineage pseudo-labelled (read without labels) the very split of L being scored;
- ``few-shot-target``: the lineage trained or selected on labelled target-language rows (an adaptation
  anywhere in it), or on labelled rows of L itself while L is not S (an ancestor's language);
- else ``zero-shot``.
Rows the lineage read with labels from the split being scored are left out of the score
(``excluded_ids``). A run's own protocol (``run_protocol``) is the strongest of what its lineage read:
few-shot-target, then transductive (benchmark inputs pseudo-labelled), then zero-shot.
Runs older than lineage records get one derived from their config and metrics (``load_lineage``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from .fileio import write_json

LINEAGE_FILE = "lineage.json"
ORDER = ("zero-shot", "transductive", "few-shot-target")  # weakest to strongest claim on what was read
BENCHMARK_SPLITS = ("dev", "test")  # splits whose rows are scored: reading their inputs is transductive
IDS_KEPT = 20000  # the ids of a read are kept where a score may meet them: any dev/test read, small train reads


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def rows_hash(ids) -> str:
    """A row set's identity: the sha256 of its sorted ids (16 hex digits)."""
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()[:16]


def read_record(task: str, split: str, lang: str, use: str, ids=None, labels: bool = True, role: str = "source",
                rows: int | None = None) -> dict:
    """One read: ``use`` is train, select, pseudo-label or pretrain; ``role`` says whose rows they were
    (source: the run's own training language; target: a target language's rows, as in an adaptation)."""
    record = {"task": task, "split": split, "lang": lang, "use": use, "labels": labels, "role": role}
    if ids is not None:
        ids = [str(i) for i in ids]
        record.update(rows=len(ids), hash=rows_hash(ids))
        if split != "train" or len(ids) <= IDS_KEPT:
            record["ids"] = sorted(ids)
    else:
        record["rows"] = rows
    return record


def make_lineage(run_id: str, name: str, kind: str, task: str, lang: str, method: str, reads: list[dict],
                 parents: list[tuple[str, dict]], languages=()) -> dict:
    """A lineage record; ``parents`` are (relation, parent lineage). ``languages``: the run's task's
    languages (a labelled read in one of them other than ``lang`` makes the run few-shot-target)."""
    lineage = {"run_id": run_id, "name": name, "kind": kind, "task": task, "lang": lang, "method": method,
               "reads": reads, "parents": [{"relation": relation, "lineage": parent} for relation, parent in parents]}
    lineage["protocol"] = derive_run_protocol(lineage, languages)
    return lineage


def write_lineage(run_dir: Path, lineage: dict) -> None:
    write_json(Path(run_dir) / LINEAGE_FILE, lineage)


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def run_id(run_dir: Path) -> str:
    """A run's identity: the id its config recorded at creation; for a run older than that, the hash
    of its config and prompt card (stable, and different for a copy with another config)."""
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.json")
    if config.get("run_id"):
        return str(config["run_id"])
    digest = hashlib.sha256()
    for part in ("config.json", "prompt/xprompt.json"):
        path = run_dir / part
        digest.update(path.read_bytes() if path.is_file() else b"")
    return "legacy-" + digest.hexdigest()[:12]


def load_lineage(run_dir: Path) -> dict:
    """A run's lineage: its ``lineage.json``, else one derived from what older runs recorded (config,
    metrics, card): its own training and selection rows, self-training's inputs, its --init-from runs."""
    run_dir = Path(run_dir)
    stored = _read(run_dir / LINEAGE_FILE)
    if stored.get("run_id"):
        return stored
    config = _read(run_dir / "config.json")
    card = _read(run_dir / "prompt" / "xprompt.json")
    cfg = config.get("train", {})
    train = _read(run_dir / "metrics.json").get("train", {})
    task, lang = cfg.get("task") or card.get("task"), cfg.get("lang") or card.get("train_language")
    if config.get("ensemble"):
        members = [load_lineage(Path(m)) for m in config["ensemble"]]
        return make_lineage(run_id(run_dir), run_dir.name, "ensemble", task, lang, "ensemble", [],
                            [("ensembled", m) for m in members])
    declared = cfg.get("protocol") or card.get("protocol") or (
        "few-shot-target" if cfg.get("source_split") == "dev" else "zero-shot")
    role = "target" if declared == "few-shot-target" else "source"
    split = cfg.get("source_split", "train")
    used = train.get("used_ids")
    reads = [read_record(task, split, lang, "train+select", used, role=role)] if used else \
        [read_record(task, split, lang, "train+select", role=role)]
    st = train.get("self_training") or card.get("selection", {}).get("self_training") or {}
    source = str(st.get("source") or "")
    for target in st.get("languages", []):
        reads.append(read_record(task, source.split()[0] if source.endswith(" inputs") else "file", target,
                                 "pseudo-label", labels=False))
    parents = []
    for start in str(cfg.get("init_from") or "").split(","):
        if start and start != "library":
            parents.append(("init-from", load_lineage(Path(start)) if (Path(start) / "config.json").is_file()
                            else external(start)))
    kind = "adapt" if role == "target" else "train"
    lineage = make_lineage(run_id(run_dir), run_dir.name, kind, task, lang, cfg.get("method"), reads, parents)
    if declared != "zero-shot" and ORDER.index(declared) > ORDER.index(lineage["protocol"]):
        lineage["protocol"] = declared  # an older run's own word, where it claimed more than its record shows
    lineage["derived_from_config"] = True
    return lineage


def external(path: str) -> dict:
    """A start from outside the run folders (a PEFT adapter): nothing known of what it read."""
    return {"run_id": f"external:{path}", "name": str(path), "kind": "external", "task": None, "lang": None,
            "method": None, "reads": [], "parents": [], "protocol": "zero-shot"}


def all_reads(lineage: dict) -> list[dict]:
    """Every read of a lineage and its ancestors, each with ``by``: the name of the run that read it."""
    out = [{**r, "by": lineage.get("name")} for r in lineage.get("reads", [])]
    for parent in lineage.get("parents", []):
        out.extend(all_reads(parent["lineage"]))
    return out


def ancestors(lineage: dict) -> list[dict]:
    out = []
    for parent in lineage.get("parents", []):
        out.append(parent["lineage"])
        out.extend(ancestors(parent["lineage"]))
    return out


def _strongest(protocols) -> str:
    return max(protocols, key=ORDER.index, default="zero-shot")


def derive_run_protocol(lineage: dict, languages=()) -> str:
    """The strongest claim over the lineage: few-shot-target where any run in it trained on target rows
    (or on labelled rows of another of the task's languages than this run's), transductive where it
    pseudo-labelled benchmark inputs, else zero-shot."""
    reads = all_reads(lineage)
    own = lineage.get("lang")
    found = [p["lineage"].get("protocol", "zero-shot") for p in lineage.get("parents", [])]
    if any(r["labels"] and (r["role"] == "target" or (r["lang"] != own and r["lang"] in languages)) for r in reads):
        found.append("few-shot-target")
    if any(r["use"] == "pseudo-label" and r["split"] in BENCHMARK_SPLITS for r in reads):
        found.append("transductive")
    return _strongest(found)


def run_protocol(lineage: dict) -> str:
    return lineage.get("protocol") or derive_run_protocol(lineage)


def score_protocol(lineage: dict, task: str, split: str, lang: str) -> str:
    """The protocol of one score: see the module docstring."""
    reads = all_reads(lineage)
    if any(r["use"] == "pseudo-label" and (r["task"], r["split"], r["lang"]) == (task, split, lang) for r in reads):
        return "transductive"
    if any(r["labels"] and (r["role"] == "target" or (r["lang"] == lang and lang != lineage.get("lang")))
           for r in reads):
        return "few-shot-target"
    if any(a.get("derived_from_config") and a.get("protocol") == "few-shot-target" for a in [lineage, *ancestors(lineage)]):
        return "few-shot-target"
    return "zero-shot"


def excluded_ids(lineage: dict, task: str, split: str) -> dict[str, set[str]]:
    """Per language, the ids of ``task``'s ``split`` rows that the lineage read with labels: never scored."""
    out: dict[str, set[str]] = {}
    for r in all_reads(lineage):
        if r["labels"] and r["task"] == task and r["split"] == split and r.get("ids"):
            out.setdefault(r["lang"], set()).update(r["ids"])
    return out


def describe_read(read: dict) -> str:
    rows = f"{read['rows']} rows" if read.get("rows") is not None else "rows"
    what = "labelled" if read["labels"] else "inputs only"
    tag = f" {read['hash']}" if read.get("hash") else ""
    return f"{read['use']}: {read['task']}/{read['split']}/{read['lang']} ({rows}, {what}, {read['role']}{tag})"


def tree_lines(lineage: dict, relation: str | None = None, depth: int = 0) -> list[str]:
    """The lineage as indented lines: each run, how it relates to its child, its protocol, what it read."""
    pad = "    " * depth
    head = f"{relation} " if relation else ""
    note = " (derived from its config: an older run)" if lineage.get("derived_from_config") else ""
    lines = [f"{pad}{head}{lineage.get('name')} [{lineage.get('kind')}, {lineage.get('task')}/{lineage.get('lang')}, "
             f"{run_protocol(lineage)}, id {lineage.get('run_id')}]{note}"]
    lines += [f"{pad}    reads {describe_read(r)}" for r in lineage.get("reads", [])]
    for parent in lineage.get("parents", []):
        lines += tree_lines(parent["lineage"], f"<- {parent['relation']}", depth + 1)
    return lines
