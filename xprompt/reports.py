"""Reports: summaries and tables over stored results; never runs a model."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean, stdev

import numpy as np


def summarize(results: dict[str, dict], source_lang: str | None, metric: str = "accuracy") -> dict:
    """Average over target languages, average with the source language, and the transfer gap
    (source minus target average), over the languages that carry labels."""
    scored = {lang: r[metric] for lang, r in results.items() if r.get("labeled") and metric in r}
    targets = [v for lang, v in scored.items() if lang != source_lang]
    out: dict = {"metric": metric, "languages": sorted(scored)}
    if targets:
        out["avg_target"] = mean(targets)
    if scored:
        out["avg_all"] = mean(scored.values())
    if source_lang in scored and targets:
        out["gap"] = scored[source_lang] - mean(targets)
    return out


def language_rows(results: dict[str, dict], source_lang: str | None) -> list[list[str]]:
    """Rows of (language, n, accuracy, macro-F1) followed by the summary rows, as strings."""

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    rows = [
        [lang, str(r["n"]), pct(r.get("accuracy")), pct(r.get("macro_f1"))]
        for lang, r in results.items()
    ]
    acc = summarize(results, source_lang, "accuracy")
    f1 = summarize(results, source_lang, "macro_f1")
    n_targets = len([lang for lang in acc["languages"] if lang != source_lang])
    if "avg_target" in acc:
        rows.append([f"avg (targets, {n_targets})", "", pct(acc["avg_target"]), pct(f1.get("avg_target"))])
    if "avg_all" in acc and n_targets and source_lang in acc["languages"]:
        rows.append([f"avg (with {source_lang})", "", pct(acc["avg_all"]), pct(f1.get("avg_all"))])
    if "gap" in acc:
        rows.append([f"gap ({source_lang} - targets)", "", pct(acc["gap"]), pct(f1.get("gap"))])
    return rows


SWEEP_KEYS = ("task", "lang", "backbone", "method", "prompt_length", "shots", "lr", "max_steps")


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


def leaderboard(runs: list[dict], task: str, split: str = "dev", metric: str = "accuracy") -> list[dict]:
    """One row per sweep (runs that differ only in seed) evaluated on ``task``/``split``: per-language
    mean and std over seeds, and the per-seed average over targets, with the source, and the gap."""
    sweeps: dict[tuple, list[dict]] = {}
    for run in runs:
        scores = {r["lang"]: r[metric] for r in run["results"]
                  if r["task"] == task and r["split"] == split and r.get(metric) is not None}
        if scores:
            correct = {r["lang"]: r.get("correct") for r in run["results"] if r["task"] == task and r["split"] == split}
            sweeps.setdefault((*(run.get(k) for k in SWEEP_KEYS), _init_from(run)), []).append(
                {**run, "scores": scores, "correct": correct})
    rows = []
    for key, members in sweeps.items():
        info = {**dict(zip(SWEEP_KEYS, key)), "init_from": key[-1]}
        source = info["lang"] if info["task"] == task else None
        langs = sorted(set.intersection(*(set(m["scores"]) for m in members)))
        per_lang = {lang: _mean_std([m["scores"][lang] for m in members]) for lang in langs}
        ci = {}
        if metric == "accuracy":
            for lang in langs:
                interval = bootstrap_ci([m["correct"].get(lang) or "" for m in members])
                if interval:
                    ci[lang] = interval
        summaries = [summarize({lang: {"labeled": True, metric: m["scores"][lang]} for lang in langs}, source, metric)
                     for m in members]
        row = {**info, "source_task": info["task"], "task": task, "split": split, "metric": metric,
               "seeds": sorted(m.get("seed") for m in members), "runs": [m["run_id"] for m in members],
               "languages": per_lang, "ci95": ci}
        for name in ("avg_target", "avg_all", "gap"):
            values = [s[name] for s in summaries if name in s]
            if values:
                row[name] = _mean_std(values)
        rows.append(row)
    rows.sort(key=lambda r: -(r.get("avg_target") or r.get("avg_all") or (0.0, 0.0))[0])
    return rows


def published_rows(path, task: str) -> list[dict]:
    import yaml

    return [row for row in (yaml.safe_load(open(path, encoding="utf-8")) or []) if row.get("task") == task]


def _table(rows: list[dict], published: list[dict]) -> tuple[list[str], list[list[str]]]:
    langs = sorted({lang for r in rows for lang in r["languages"]})
    header = ["run", "backbone", "method", "shots", "seeds", *langs, "avg targets", "avg all", "gap"]

    def cell(value, ci=None) -> str:
        if value is None:
            return ""
        m, s = value
        text = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s else "")
        return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    table = []
    for r in rows:
        table.append([row_name(r), str(r["backbone"]), str(r["method"]), str(r["shots"] or "all"),
                      ",".join(str(s) for s in r["seeds"]),
                      *(cell(r["languages"].get(lang), r["ci95"].get(lang)) for lang in langs),
                      cell(r.get("avg_target")), cell(r.get("avg_all")), cell(r.get("gap"))])
    for p in published:
        table.append([f"published: {p['model']}", str(p["backbone"]), str(p["method"]), "all", "",
                      *([""] * len(langs)), "", f"{p['avg_all']:.1f}", ""])
    return header, table


def _init_from(run: dict) -> str | None:
    """The names of the runs a run started from (runs from other starts are other sweeps)."""
    try:
        value = json.loads(run.get("config") or "{}").get("init_from")
    except json.JSONDecodeError:
        return None
    return ",".join(Path(x).name for x in value.split(",")) if value else None


def row_name(row: dict) -> str:
    name = f"{row['source_task']}/{row['lang']} x{row['prompt_length']}"
    return f"{name} from {row['init_from']}" if row.get("init_from") else name


def render(rows: list[dict], published: list[dict], fmt: str, title: str = "xprompt leaderboard") -> str:
    """The leaderboard as Markdown, CSV, JSON or one self-contained HTML page. Cells are percentages:
    mean ± std over seeds, then the bootstrap 95% interval of the accuracy."""
    import csv
    import io
    import json

    if fmt == "json":
        return json.dumps({"rows": rows, "published": published}, indent=2, sort_keys=True, ensure_ascii=False)
    header, table = _table(rows, published)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
        return out.getvalue()
    if fmt == "html":
        return render_html(rows, header, table, title)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines) + "\n"


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
    """A per-language bar chart of the best row and a run x language heatmap, as SVG strings."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted({lang for r in rows for lang in r["languages"]})
    best = rows[0]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(langs)), 3))
    values = [100 * best["languages"][lang][0] if lang in best["languages"] else 0 for lang in langs]
    errors = [100 * best["languages"][lang][1] if lang in best["languages"] else 0 for lang in langs]
    ax.bar(langs, values, yerr=errors, color="#4c72b0")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"best: {row_name(best)} ({best['method']})")
    ax.set_ylim(0, 100)
    bar = _svg(fig)
    matrix = np.array([[100 * r["languages"][lang][0] if lang in r["languages"] else np.nan for lang in langs]
                       for r in rows])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(langs)), max(2, 0.4 * len(rows) + 1)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(rows)), [f"{row_name(r)} {r['method']}" for r in rows])
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return [bar, _svg(fig)]


def render_html(rows: list[dict], header: list[str], table: list[list[str]], title: str) -> str:
    """One self-contained page: every string from data goes through ``html.escape``; no scripts."""
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table)
    figures = "".join(f"<figure>{svg}</figure>" for svg in charts(rows))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
        "figure{margin:1.5em 0}</style></head><body>"
        f"<h1>{escape(title)}</h1><p>Cells: accuracy in %, mean ± std over seeds, [bootstrap 95% interval]. "
        "Rows marked published are quoted from papers (full fine-tuning), not measured here.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{figures}</body></html>\n"
    )


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
