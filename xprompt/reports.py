"""Reports: summaries and tables over stored results; never runs a model."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean, stdev

import numpy as np

from .lineage import ORDER as PROTOCOLS


def summarize(results: dict[str, dict], source_lang: str | None, metric: str = "accuracy",
              official: list[str] | tuple[str, ...] | None = None) -> dict:
    """Averages over one named language set. The target set is the task's ``official`` languages
    minus the source language (every scored language but the source when no official set is
    given); languages outside the official set are ``extra``: reported, never averaged. Only
    labelled languages count; an official target without a score makes the average ``partial``
    (over ``target_set``, the targets present), which is never compared with a complete one."""
    scored = {lang: r[metric] for lang, r in results.items() if r.get("labeled") and r.get(metric) is not None}
    wanted = [lang for lang in official if lang != source_lang] if official else \
        [lang for lang in scored if lang != source_lang]
    present = [lang for lang in wanted if lang in scored]
    out: dict = {"metric": metric, "languages": sorted(scored), "target_set": present, "official": bool(official),
                 "complete": bool(present) and len(present) == len(wanted),
                 "extra": {lang: v for lang, v in scored.items() if official and lang not in official}}
    if present:
        out["avg_target"] = mean(scored[lang] for lang in present)
    if source_lang in scored and present:
        out["avg_all"] = mean([scored[source_lang], *(scored[lang] for lang in present)])
        out["gap"] = scored[source_lang] - out["avg_target"]
    elif scored and not present:
        out["avg_all"] = mean(scored[lang] for lang in scored if not official or lang in official)
    return out


def set_name(summary: dict) -> str:
    """How an average names its language set: '14 official targets', or the targets it holds."""
    n = len(summary["target_set"])
    if summary["complete"]:
        return f"{n} {'official ' if summary['official'] else ''}target{'s' if n != 1 else ''}"
    return f"partial: {', '.join(summary['target_set'])}"


def language_rows(results: dict[str, dict], source_lang: str | None,
                  official: list[str] | tuple[str, ...] | None = None,
                  metrics: tuple[str, ...] = ("accuracy", "macro_f1")) -> list[list[str]]:
    """Rows of (language, n, one column per metric) followed by the summary rows, as strings; a
    language outside the official set is marked ``(extra)`` and left out of every average."""

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    rows = [[f"{lang} (extra)" if official and lang not in official else lang, str(r["n"]),
             *(pct(r.get(m)) for m in metrics)] for lang, r in results.items()]
    summaries = [summarize(results, source_lang, m, official) for m in metrics]
    first = summaries[0]
    if "avg_target" in first:
        rows.append([f"avg ({set_name(first)})", "", *(pct(s.get("avg_target")) for s in summaries)])
    if "gap" in first:
        rows.append([f"avg (with {source_lang})", "", *(pct(s.get("avg_all")) for s in summaries)])
        rows.append([f"gap ({source_lang} - targets)", "", *(pct(s.get("gap")) for s in summaries)])
    return rows


# config fields that never change a result: a sweep is every other field (the seed aside)
NOT_RESULT_FIELDS = ("seed", "grad_accum")  # grad_accum: the same gradients (tests/test_distributed.py)


def sweep_key(run: dict) -> dict:
    """What makes runs one sweep: every config field that can change a result except the seed, plus
    the dtype that actually ran, the backbone's weights, the task card's version and the data folder.
    Paths of start runs and libraries count by their folder names."""
    try:
        config = json.loads(run.get("config") or "{}")
    except json.JSONDecodeError:
        config = {}
    key = {k: v for k, v in config.items() if k not in NOT_RESULT_FIELDS}
    if key.get("init_from"):
        key["init_from"] = ",".join(Path(x).name for x in str(key["init_from"]).split(","))
    if key.get("library"):
        key["library"] = Path(key["library"]).name
    key.update({"compute_dtype": run.get("compute_dtype"), "backbone_sha256": run.get("backbone_sha256"),
                "task_version": run.get("task_version"), "data_dir": run.get("data_dir")})
    return key


def describe_sweep(key: dict) -> str:
    """The fields of a sweep that differ from the training defaults, for a row's label."""
    from .config import TrainConfig

    defaults = TrainConfig().to_dict()
    shown = []
    for name, value in sorted(key.items()):
        if name in ("task", "lang", "backbone", "method", "prompt_length", "backbone_sha256", "task_version",
                    "data_dir", "dtype"):
            continue
        if name in defaults and defaults[name] == value:
            continue
        if value is None and name not in defaults:
            continue
        shown.append(f"{name}={value}")
    return ", ".join(shown)


def bootstrap_ci(correct: list[str], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the accuracy, averaged over seeds: each resample draws the
    same rows for every seed's run (the rows are the same dev set), so seeds stay paired."""
    if not correct or any(not c for c in correct) or len({len(c) for c in correct}) != 1:
        return None
    matrix = np.array([[ch == "1" for ch in c] for c in correct], dtype=np.float64)  # (seeds, rows)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, matrix.shape[1], size=(samples, matrix.shape[1]))
    means = matrix[:, rows].mean(axis=2).mean(axis=0)  # (samples,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "chrf": "chrF", "chrf++": "chrF++", "bleu": "BLEU"}


def metric_label(row: dict) -> str:
    """A leaderboard row's metric as its cells were measured: the name, and for sacrebleu's figures
    (chrF, BLEU) each signature with the languages it scored (BLEU tokenises per language)."""
    name = METRIC_NAMES.get(row["metric"], row["metric"])
    signatures = row.get("signatures") or {}
    if not signatures:
        return name
    by_signature: dict[str, list[str]] = {}
    for lang, signature in sorted(signatures.items()):
        by_signature.setdefault(signature, []).append(lang)
    if len(by_signature) == 1:
        return f"{name} ({next(iter(by_signature))})"
    return f"{name} (" + "; ".join(f"{sig}: {', '.join(langs)}" for sig, langs in by_signature.items()) + ")"


def leaderboard(runs: list[dict], task, split: str = "dev", metric: str | None = None) -> list[dict]:
    """``task``: a TaskSpec (or a bundled task's name). One row per sweep (runs whose every result-changing config field is the same; see
    ``sweep_key``) *and* evaluation row set (the same rows of the same languages) on ``task``
    (a TaskSpec) / ``split``: per-language mean and std over seeds, and the per-seed averages over
    the task's official targets, with the source, and the gap. Rows are ranked only against rows
    averaged over the same language set: complete official sets first, then each partial set.
    ``metric`` (default: the task's) is the one figure of every row: a generation task's chrF or
    BLEU carries its sacrebleu signature per language (``signatures``); rows measured under other
    signatures are other rows, ranked apart, never averaged together."""
    if isinstance(task, str):  # a task name: its card from the bundled tasks
        from .tasks import load_task

        task = load_task(task)
    metric = metric or task.metric
    groups: dict[str, list[dict]] = {}
    for run in runs:
        results = [r for r in run["results"] if r["task"] == task.name and r["split"] == split and r.get(metric) is not None]
        if not results:
            continue
        rows_seen = {r["lang"]: r.get("rows") or f"first {r['n']}" for r in results}
        # the row's protocol: the strongest of its scores' (each derived from the lineage when scored)
        protocol = max((r.get("protocol") or run.get("protocol") or "zero-shot" for r in results), key=PROTOCOLS.index)
        # how each figure was measured (sacrebleu's signature; none for accuracy and macro-F1)
        signatures = {r["lang"]: (r.get("signature") or {}).get(metric) for r in results}
        signatures = {lang: sig for lang, sig in signatures.items() if sig}
        key = json.dumps([sweep_key(run), sorted(rows_seen.items()), protocol, sorted(signatures.items())],
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append({**run, "scores": {r["lang"]: r[metric] for r in results},
                                           "signatures": signatures,
                                           "correct": {r["lang"]: r.get("correct") for r in results},
                                           "n": {r["lang"]: r["n"] for r in results}, "rows_seen": rows_seen,
                                           "row_protocol": protocol})
    rows = []
    for members in groups.values():
        sweep = sweep_key(members[0])
        source = sweep.get("lang") if sweep.get("task") == task.name else None
        langs = sorted(members[0]["scores"])
        per_lang = {lang: _mean_std([m["scores"][lang] for m in members]) for lang in langs}
        ci = {}
        if metric == "accuracy":
            for lang in langs:
                interval = bootstrap_ci([m["correct"].get(lang) or "" for m in members])
                if interval:
                    ci[lang] = interval
        summaries = [summarize({lang: {"labeled": True, metric: m["scores"][lang]} for lang in langs}, source, metric,
                               task.official_languages) for m in members]
        first = summaries[0]
        row = {"sweep": sweep, "label": describe_sweep(sweep), "source_task": sweep.get("task"), "task": task.name,
               "lang": sweep.get("lang"), "backbone": sweep.get("backbone"), "method": sweep.get("method"),
               "prompt_length": sweep.get("prompt_length"), "shots": sweep.get("shots"),
               "protocol": members[0]["row_protocol"], "init_from": sweep.get("init_from"),
               "split": split, "metric": metric, "signatures": members[0]["signatures"],
               "seeds": sorted(m.get("seed") for m in members),
               "runs": [m["run_id"] for m in members], "languages": per_lang, "ci95": ci,
               "n": members[0]["n"], "rows": members[0]["rows_seen"], "target_set": first["target_set"],
               "complete": first["complete"], "average_over": set_name(first) if first["target_set"] else "",
               "extra": sorted(first["extra"])}
        for name in ("avg_target", "avg_all", "gap"):
            values = [s[name] for s in summaries if name in s]
            if values:
                row[name] = _mean_std(values)
        row["metric_label"] = metric_label(row)
        rows.append(row)
    # rank within a language set (and a way of measuring) only: complete official sets first, then
    # each partial set by name
    rows.sort(key=lambda r: (not r["complete"], "" if r["complete"] else r["average_over"], r["metric_label"],
                             -(r.get("avg_target") or r.get("avg_all") or (0.0, 0.0))[0]))
    return rows


def published_rows(path, task: str) -> list[dict]:
    """A task's published reference rows (``tasks/published/reference.yaml``): figures quoted from papers,
    on their ``split`` (test where the file says none) over ``languages`` languages with the source."""
    import yaml

    rows = [row for row in (yaml.safe_load(open(path, encoding="utf-8")) or []) if row.get("task") == task]
    return [{"split": "test", "metric": "accuracy", **row} for row in rows]


def comparable(published: dict, rows: list[dict]) -> list[dict]:
    """The measured rows a published figure (an average with the source) may stand beside: the same
    split and metric, a complete official language set and, where the paper names it, as many
    languages with the source. Never a partial average, never another split."""
    wanted = published.get("languages")
    return [r for r in rows if r["split"] == published.get("split", "test") and r["complete"]
            and r["metric"] == published.get("metric", "accuracy") and r.get("avg_all")
            and (wanted is None or len(r["target_set"]) + 1 == wanted)]


COLUMNS = ["run", "config", "protocol", "backbone", "method", "shots", "seeds", "rows", "split", "metric"]


def _cell(value, ci=None) -> str:
    if value is None:
        return ""
    m, s = value
    text = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s else "")
    return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """The measured rows: header, string cells (``table[i]`` is ``rows[i]``), the language columns."""
    langs = sorted({lang for r in rows for lang in r["languages"]})
    extra = {lang for r in rows for lang in r["extra"]}
    header = [*COLUMNS, *(f"{lang} (extra)" if lang in extra else lang for lang in langs),
              "average over", "avg targets", "avg with source", "gap"]

    def rows_cell(r) -> str:
        counts = sorted(set(r["n"].values()))
        return "/".join(str(c) for c in counts) + " per language"

    table = [[row_name(r), r["label"], str(r["protocol"]), str(r["backbone"]), str(r["method"]),
              str(r["shots"] or "all"), ",".join(str(s) for s in r["seeds"]), rows_cell(r), r["split"],
              r.get("metric_label") or metric_label(r),
              *(_cell(r["languages"].get(lang), r["ci95"].get(lang)) for lang in langs),
              r["average_over"], _cell(r.get("avg_target")), _cell(r.get("avg_all")), _cell(r.get("gap"))]
             for r in rows]
    return header, table, langs


def _published_table(published: list[dict], rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Published rows in a table of their own: each with its source, split, language set and the measured
    rows comparable with it (none, and why, where there are none)."""
    header = ["published", "source", "protocol", "backbone", "method", "split", "metric", "average over",
              "avg with source", "comparable measured rows"]
    table = []
    for p in published:
        p = {"split": "test", "metric": "accuracy", **p}
        over = f"{p['languages']} languages incl. the source" if p.get("languages") else "as published"
        peers = ", ".join(row_name(r) for r in comparable(p, rows)) or \
            f"none: no measured {p['split']} row over {over if p.get('languages') else 'a complete official set'}"
        table.append([f"published: {p['model']}", str(p.get("source", "")), "zero-shot (full fine-tuning)",
                      str(p["backbone"]), str(p["method"]), str(p["split"]), str(p["metric"]), over,
                      f"{p['avg_all']:.1f}", peers])
    return header, table


def row_name(row: dict) -> str:
    name = f"{row['source_task']}/{row['lang']} x{row['prompt_length']}"
    return f"{name} from {row['init_from']}" if row.get("init_from") else name


def no_rows_note(task: str, split: str, runs_dir) -> str:
    """The one line a report of no evaluations says instead of a bare header."""
    how = f"xprompt eval --task {task}" + ("" if split == "dev" else f" --split {split}")
    return f"no evaluations of task '{task}' ({split} split) in {runs_dir} yet; run `{how}` on a trained run"


def render(rows: list[dict], published: list[dict], fmt: str, title: str = "xprompt leaderboard",
           note: str | None = None) -> str:
    """The leaderboard as Markdown, CSV, JSON or one self-contained HTML page. Cells are the row's
    metric (its ``metric`` column: accuracy, or chrF/BLEU with the sacrebleu signature) times 100:
    mean ± std over seeds, then the bootstrap 95% interval of an accuracy. Markdown and HTML put
    published rows in a table of their own and end with a legend; CSV keeps one table (published
    rows last, their split and language set in their cells). With no rows, ``note`` (a line) is the
    Markdown and the HTML page's body; CSV is the header alone, JSON an empty ``rows``."""
    import csv
    import io
    import json

    from . import report_page

    if fmt == "json":
        return json.dumps({"rows": rows, "published": published}, indent=2, sort_keys=True, ensure_ascii=False)
    header, table, langs = _table(rows)
    published_part = _published_table(published, rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
        for cells in published_part[1]:  # the same columns; split and language set in their cells
            writer.writerow([cells[0], cells[1], cells[2], cells[3], cells[4], "all", "", "", cells[5], cells[6],
                             *([""] * len(langs)), f"published: {cells[7]}", "", cells[8], ""])
        return out.getvalue()
    if fmt == "html":
        return report_page.page(title, header, table, rows, langs, len(COLUMNS), published_part,
                                charts(rows), note=note if not rows and note else None)
    if not rows and note:
        return note + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    if published:
        lines += ["", "**Published reference rows** (quoted from papers, not measured here; never ranked with "
                  "the rows above)", "", "| " + " | ".join(published_part[0]) + " |",
                  "|" + "---|" * len(published_part[0])]
        lines += ["| " + " | ".join(row) + " |" for row in published_part[1]]
    return "\n".join([*lines, "", *report_page.markdown_legend()]) + "\n"


def _svg(figure) -> str:
    """A matplotlib figure as inline SVG; text is drawn as paths, so no string from data lands in markup."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def charts(rows: list[dict]) -> list[str]:
    """A per-language bar chart of the first-ranked row, its error bars the bootstrap 95% intervals (mean
    ± std over seeds where a language has none), as SVG. The run x language heatmap is the HTML table's
    colouring (``report_page.heat``): no colour scale here that paints noise."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = rows[0]
    langs = sorted(best["languages"])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(langs)), 3))
    values = [100 * best["languages"][lang][0] for lang in langs]
    below = [v - 100 * best["ci95"][lang][0] if lang in best["ci95"] else 100 * best["languages"][lang][1]
             for v, lang in zip(values, langs)]
    above = [100 * best["ci95"][lang][1] - v if lang in best["ci95"] else 100 * best["languages"][lang][1]
             for v, lang in zip(values, langs)]
    ax.bar(langs, values, yerr=[[max(b, 0) for b in below], [max(a, 0) for a in above]], color="#4c72b0")
    ax.set_ylabel(f"{METRIC_NAMES.get(best['metric'], best['metric'])} (x100)")
    ax.set_title(f"first ranked: {row_name(best)} ({best['method']}); bars: 95% interval or ± std")
    ax.set_ylim(0, 100)
    return [_svg(fig)]


def xtreme_files(run_dir, task: str, out_dir) -> list:
    """XTREME-style submission files: ``<out>/<task>/test-<lang>.tsv``, one predicted label per line
    in the test file's order, from a run's ``predictions/<task>.test.<lang>.tsv``."""
    from pathlib import Path

    written = []
    for path in sorted(Path(run_dir, "predictions").glob(f"{task}.test.*.tsv")):
        lang = path.name[len(task) + len(".test."):-len(".tsv")]
        labels = [line.split("\t")[1] for line in path.read_text(encoding="utf-8").splitlines()[1:]]
        target = Path(out_dir) / task / f"test-{lang}.tsv"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(label + "\n" for label in labels), encoding="utf-8")
        written.append(target)
    return written


def submission_run(runs: list[dict], task: str) -> tuple[dict | None, str]:
    """The run whose test predictions an XTREME submission takes when none is named: among finished
    runs with test predictions of ``task`` whose lineage read no target rows (zero-shot: no adaptation,
    no pseudo-labelled benchmark inputs anywhere in it), the one with the best source-language held-out
    accuracy (its selection rows; then its source-language dev accuracy). Never a target-language
    figure. Returns (the run's index row or None, why)."""
    with_test = [r for r in runs if r["finished"] and any(x["task"] == task and x["split"] == "test"
                                                          for x in r["results"])]
    eligible = [r for r in with_test if r.get("protocol") == "zero-shot" and r.get("task") == task]
    passed = len(with_test) - len(eligible)
    skipped = f"; {passed} other run(s) with test predictions passed over (their lineage read target rows, or " \
              f"they trained on another task)" if passed else ""
    if not eligible:
        return None, f"no zero-shot run of {task} with test predictions{skipped}"

    def source_dev(run):
        return next((x["accuracy"] for x in run["results"] if x["task"] == task and x["split"] == "dev"
                     and x["lang"] == run.get("lang") and x["accuracy"] is not None), -1.0)

    best = max(eligible, key=lambda r: (r.get("select_accuracy") or -1.0, source_dev(r), r["run_id"]))
    held = best.get("select_accuracy")
    why = (f"the best {best.get('lang')} held-out accuracy ({100 * held:.1f}) of {len(eligible)} zero-shot run(s) "
           f"with test predictions{skipped}") if held is not None else \
        f"the only zero-shot run(s) with test predictions{skipped}"
    return best, why
