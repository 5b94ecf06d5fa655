"""Reports: summaries and tables over stored results; never runs a model."""

from __future__ import annotations

from statistics import mean


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
