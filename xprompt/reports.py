"""Reports: summaries and tables over stored results; never runs a model."""

from __future__ import annotations

from statistics import mean, stdev


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
            sweeps.setdefault(tuple(run.get(k) for k in SWEEP_KEYS), []).append({**run, "scores": scores})
    rows = []
    for key, members in sweeps.items():
        info = dict(zip(SWEEP_KEYS, key))
        source = info["lang"] if info["task"] == task else None
        langs = sorted(set.intersection(*(set(m["scores"]) for m in members)))
        per_lang = {lang: _mean_std([m["scores"][lang] for m in members]) for lang in langs}
        summaries = [summarize({lang: {"labeled": True, metric: m["scores"][lang]} for lang in langs}, source, metric)
                     for m in members]
        row = {**info, "source_task": info["task"], "task": task, "split": split, "metric": metric,
               "seeds": sorted(m.get("seed") for m in members), "runs": [m["run_id"] for m in members],
               "languages": per_lang}
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


def render(rows: list[dict], published: list[dict], fmt: str) -> str:
    """The leaderboard as Markdown, CSV or JSON (percentages, mean +- std over seeds)."""
    import csv
    import io
    import json

    if fmt == "json":
        return json.dumps({"rows": rows, "published": published}, indent=2, sort_keys=True, ensure_ascii=False)
    langs = sorted({lang for r in rows for lang in r["languages"]})
    header = ["run", "backbone", "method", "shots", "seeds", *langs, "avg targets", "avg all", "gap"]

    def cell(value) -> str:
        if value is None:
            return ""
        m, s = value
        return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s else "")

    table = []
    for r in rows:
        name = f"{r['source_task']}/{r['lang']} x{r['prompt_length']}"
        table.append([name, str(r["backbone"]), str(r["method"]), str(r["shots"] or "all"),
                      ",".join(str(s) for s in r["seeds"]), *(cell(r["languages"].get(lang)) for lang in langs),
                      cell(r.get("avg_target")), cell(r.get("avg_all")), cell(r.get("gap"))])
    for p in published:
        table.append([f"published: {p['model']}", p["backbone"], p["method"], "all", "",
                      *([""] * len(langs)), "", f"{p['avg_all']:.1f}", ""])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
        return out.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines) + "\n"
