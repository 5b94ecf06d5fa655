"""The commands that read the run folders and their index: ``runs`` (the registry, one run's lineage)
and ``report`` (leaderboards, XTREME submission files)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import XPromptError
from .common import RunsDir, TasksDir, _load_task, _pct, _table, command, console, err_console


class Format(str, Enum):
    MD = "md"
    CSV = "csv"
    JSON = "json"
    HTML = "html"


@command("runs")
def runs_cmd(
    task: Annotated[Optional[str], typer.Option(help="Only runs of this task.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Only runs of this method.")] = None,
    lang: Annotated[Optional[str], typer.Option(help="Only runs trained on this language.")] = None,
    rebuild: Annotated[bool, typer.Option(help="Recreate the index from the run folders first.")] = False,
    lineage: Annotated[Optional[Path], typer.Option("--lineage", help="Show one run's lineage instead: the runs it came from (started from, adapted from, ensembled, copied), what each read (task/split/language, rows, labels or inputs only) and the protocol derived for each of its scores.")] = None,
    runs_dir: RunsDir = Path("runs"),
):
    """List the runs in the registry (an SQLite index beside the run folders), or one run's lineage."""
    from ..registry import list_runs, rebuild as rebuild_index

    if lineage is not None:
        from ..workflows.catalogue import describe_lineage

        view = describe_lineage(lineage)
        console.print(f"[bold]{view['run']}[/bold]: {view['protocol']}", highlight=False, soft_wrap=True)
        console.print("\n".join(view["tree"]), markup=False, highlight=False, soft_wrap=True)
        if view["scores"]:
            _table("its scores, protocol derived from the lineage", ["task", "split", "lang", "n", "rows left out",
                                                                    "protocol"],
                   [[r["task"], r["split"], r["lang"], r["n"], r["excluded"], r["derived"]
                     + ("" if r["stored"] in (None, r["derived"]) else f" (stored: {r['stored']}; re-evaluate)")]
                    for r in view["scores"]], right=("n", "rows left out"))
        return

    if rebuild:
        console.print(f"indexed {rebuild_index(runs_dir)} runs")
    _table(f"runs in {runs_dir}", ["run", "task", "lang", "method", "len", "shots", "seed", "protocol", "done",
                                   "held-out acc", "evaluated"],
           [[r["run_id"], r["task"], r["lang"], r["method"], r["prompt_length"], r["shots"] or "all", r["seed"],
             r["protocol"], "yes" if r["finished"] else "no", "" if r["select_accuracy"] is None else _pct(r["select_accuracy"]),
             ", ".join(sorted({f"{x['task']}/{x['split']}" for x in r["results"]}))]
            for r in list_runs(runs_dir, task=task, method=method, lang=lang)])


@command("report")
def report_cmd(
    task: Annotated[str, typer.Option(help="Task whose evaluations to rank.")] = "xnli",
    split: Annotated[str, typer.Option(help="dev or test (test files carry no labels here).")] = "dev",
    fmt: Annotated[Format, typer.Option("--format", help="md, csv, json or html (one self-contained page with charts).")] = Format.MD,
    out: Annotated[Optional[Path], typer.Option(help="Write the report here instead of printing it.")] = None,
    xtreme: Annotated[Optional[Path], typer.Option(help="Also write XTREME submission files (<dir>/<task>/test-<lang>.tsv) from the test predictions of --run, else of the zero-shot run with the best source-language held-out accuracy (runs whose lineage read target rows are passed over).")] = None,
    run: Annotated[Optional[Path], typer.Option(help="The run whose test predictions --xtreme uses (taken whatever its lineage read; its protocol is said).")] = None,
    runs_dir: RunsDir = Path("runs"),
    tasks_dir: TasksDir = None,
):
    """Leaderboard over every run: one row per configuration (every result-changing field but the
    seed) and evaluated row set, as mean +- std per language over seeds; averages over the task's
    official targets (extra languages in their own columns), with the source, the gap; ranked only
    against rows averaged over the same language set; published reference rows in a table of their
    own; a legend. With no evaluations of the task: one line saying so (on stderr too for csv, json,
    html and --out; csv is then the header, json an empty list of rows), exit 0. Reads stored
    results only; never runs a model."""
    from ..fileio import write_text
    from ..registry import list_runs
    from ..reports import leaderboard, no_rows_note, published_rows, render, submission_run, xtreme_files
    from ..store import run_protocol
    from ..tasks import DEFAULT_TASKS_DIR

    spec = _load_task(task, tasks_dir)
    runs = list_runs(runs_dir)
    rows = leaderboard(runs, spec, split)
    published_file = (tasks_dir or DEFAULT_TASKS_DIR) / "published" / "reference.yaml"
    published = published_rows(published_file, task) if published_file.is_file() else []
    note = None if rows else no_rows_note(task, split, runs_dir)
    text = render(rows, published, fmt.value, title=f"xprompt leaderboard: {task} {split}", note=note)
    if note and (out or fmt != Format.MD):  # md on stdout is the note itself; elsewhere it goes to stderr
        err_console.print(note, highlight=False, soft_wrap=True, markup=False)
    if xtreme is not None:
        if run is not None:  # named by the user: taken whatever it read, and said
            source, why = run, f"named by --run; its protocol: {run_protocol(run)}"
        else:
            chosen, why = submission_run(runs, task)
            if chosen is None:
                raise XPromptError(f"{why} under {runs_dir}; run 'xprompt eval --split test' on one, or name a run "
                                   "with --run")
            source = Path(chosen["path"])
        written = xtreme_files(source, task, xtreme)
        if not written:
            raise XPromptError(f"{source} has no test predictions of {task}; run 'xprompt eval --split test' first")
        err_console.print(f"wrote {len(written)} XTREME files under {xtreme / task} from {source.name}: {why}",
                          highlight=False)
    if out:
        write_text(out, text)
        console.print(f"wrote {out}")
    else:
        print(text, end="")
