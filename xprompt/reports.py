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
    import yaml

    return [row for row in (yaml.safe_load(open(path, encoding="utf-8")) or []) if row.get("task") == task]


def _table(rows: list[dict], published: list[dict]) -> tuple[list[str], list[list[str]]]:
    langs = sorted({lang for r in rows for lang in r["languages"]})
    extra = {lang for r in rows for lang in r["extra"]}
    header = ["run", "config", "protocol", "backbone", "method", "shots", "seeds", "rows", "metric",
              *(f"{lang} (extra)" if lang in extra else lang for lang in langs),
              "average over", "avg targets", "avg with source", "gap"]

    def cell(value, ci=None) -> str:
        if value is None:
            return ""
        m, s = value
        text = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s else "")
        return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    def rows_cell(r) -> str:
        counts = sorted(set(r["n"].values()))
        return "/".join(str(c) for c in counts) + " per language"

    table = []
    for r in rows:
        table.append([row_name(r), r["label"], str(r["protocol"]), str(r["backbone"]), str(r["method"]),
                      str(r["shots"] or "all"), ",".join(str(s) for s in r["seeds"]), rows_cell(r),
                      r.get("metric_label") or metric_label(r),
                      *(cell(r["languages"].get(lang), r["ci95"].get(lang)) for lang in langs),
                      r["average_over"], cell(r.get("avg_target")), cell(r.get("avg_all")), cell(r.get("gap"))])
    for p in published:
        over = f"published: {p['languages']} languages incl. the source" if p.get("languages") else "published"
        table.append([f"published: {p['model']}", str(p.get("source", "")), "zero-shot (full fine-tuning)",
                      str(p["backbone"]), str(p["method"]), "all", "", "test", str(p.get("metric", "accuracy")),
                      *([""] * len(langs)), over, "",
                      f"{p['avg_all']:.1f}", ""])
    return header, table


def row_name(row: dict) -> str:
    name = f"{row['source_task']}/{row['lang']} x{row['prompt_length']}"
    return f"{name} from {row['init_from']}" if row.get("init_from") else name


def render(rows: list[dict], published: list[dict], fmt: str, title: str = "xprompt leaderboard") -> str:
    """The leaderboard as Markdown, CSV, JSON or one self-contained HTML page. Cells are the row's
    metric (its ``metric`` column: accuracy, or chrF/BLEU with the sacrebleu signature) times 100:
    mean ± std over seeds, then the bootstrap 95% interval of an accuracy."""
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
    ax.set_ylabel(f"{METRIC_NAMES.get(best['metric'], best['metric'])} (x100)")
    ax.set_title(f"best: {row_name(best)} ({best['method']})")
    ax.set_ylim(0, 100)
    bar = _svg(fig)
    matrix = np.array([[100 * r["languages"][lang][0] if lang in r["languages"] else np.nan for lang in langs]
                       for r in rows])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(langs)), max(2, 0.4 * len(rows) + 1)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(rows)), [f"{row_name(r)} {r['method']}" for r in rows])
    fig.colorbar(image, ax=ax, label=f"{METRIC_NAMES.get(best['metric'], best['metric'])} (x100)")
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
        f"<h1>{escape(title)}</h1><p>Cells: the row's metric (accuracy in %, or chrF/BLEU as sacrebleu scores "
        "with their signatures), mean ± std over seeds, [bootstrap 95% interval of an accuracy]. "
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
