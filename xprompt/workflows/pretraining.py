"""``xprompt pretrain``: PPT's self-supervised prompt pre-training as a run like any other. The
pre-training task (its card and rows, built from a corpus) is written into the run's folder, the
run trains through the same workflow as every other (selection on held-out pre-training rows,
checkpoints, resume, registry), and its prompt starts downstream runs with ``--init-from RUN``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..backbones import Backbone
from ..config import TrainConfig
from ..data import BUNDLED_DATA_DIR
from ..fileio import write_json, write_text
from ..pretraining import CORPUS_LANGUAGE, bundled_corpus, choice_rows, pair_rows, read_corpus, task_card
from ..store import default_run_name, new_run_dir
from ..tasks import load_task
from .runs import RunEvents, train_run

LANGUAGE = CORPUS_LANGUAGE  # a pre-training corpus mixes languages: the run's "language"


def pretrain(cfg: TrainConfig, fmt: str, backbone: Backbone, runs_dir: Path, corpus: Path | None = None,
             run_name: str | None = None, device: str = "cpu", cache_dir: Path | None = None,
             compute: dict | None = None, events: RunEvents | None = None) -> tuple[Path, dict]:
    """Build the ``fmt`` pre-training rows from ``corpus`` (default: the bundled training texts),
    write them and their card into a new run folder (``pretraining/``), and train ``cfg`` on them.
    Returns (run_dir, summary with the corpus statistics)."""
    if corpus is not None:
        docs = read_corpus(corpus)
        stats = {"corpus": str(corpus), "documents": len(docs), "sentences": sum(len(d) for d in docs)}
    else:
        docs, by_language = bundled_corpus(BUNDLED_DATA_DIR)
        stats = {"corpus": "bundled training texts", "by_language": by_language,
                 "documents": len(docs), "sentences": sum(len(d) for d in docs)}
    rows = (pair_rows if fmt == "pair" else choice_rows)(docs, cfg.seed)
    card = task_card(fmt, [LANGUAGE])
    stats["rows"] = len(rows)
    run_dir = new_run_dir(runs_dir, run_name or default_run_name(card["name"], LANGUAGE, cfg.method, cfg.seed))
    tasks_dir, data_dir = run_dir / "pretraining" / "tasks", run_dir / "pretraining" / "data"
    write_text(tasks_dir / f"{card['name']}.yaml", yaml.safe_dump(card, allow_unicode=True, sort_keys=False))
    write_text(data_dir / "ppt" / f"train.{fmt}.{LANGUAGE}.jsonl",
               "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_json(run_dir / "pretraining" / "corpus.json", stats)
    task = load_task(card["name"], tasks_dir)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "task": card["name"], "lang": LANGUAGE})
    _, summary = train_run(cfg, backbone, task, run_dir, runs_dir, [data_dir], data_dir, device, cache_dir, tasks_dir,
                           compute, events)
    return run_dir, {**summary, "corpus": stats}
