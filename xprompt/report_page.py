"""How a leaderboard shows itself to a reader: the legend (what every cell and column means, said
from what ``reports`` computes), the error bars drawn from the intervals it already holds, a
heatmap scale that leaves noise uncoloured, and the one self-contained HTML page. Knows rows as
``reports.leaderboard`` builds them; imports nothing from xprompt."""

from __future__ import annotations

from html import escape
from math import sqrt

BAR_WIDTH = 120  # px for the fixed 0-100 axis of every error bar: 1.2 px per point
HEAT_RANGE = 20.0  # points below the column's best at which the shade is full
NEUTRAL = "#eeeeee"  # within noise of the column's best
UNKNOWN = ""  # no noise estimate: not coloured
LIGHT, FULL = (255, 237, 222), (241, 105, 19)  # one hue (orange), lightest to deepest

LEGEND = [
    ("x ± s [lo, hi]", "x: the row's metric ×100 on that language's evaluated rows, mean over the row's seeds. "
     "± s: the sample standard deviation over seeds (left out with one seed, or seeds that agree exactly). "
     "[lo, hi]: a percentile bootstrap 95% interval of the seed-mean accuracy: 1000 resamples of the evaluated "
     "rows with replacement, the same rows drawn for every seed (paired), the 2.5th and 97.5th percentiles. It "
     "measures row-sampling noise only, seeds held fixed; shown for accuracy where every seed stored per-row "
     "results on the same rows (chrF/BLEU and runs without per-row results have none)."),
    ("avg targets, avg with source, gap", "per seed: the mean over the 'average over' languages, the same with "
     "the source language, and source minus targets; then mean ± std over seeds (no interval)."),
    ("average over", "the language set of the averages: the task's official targets minus the source, or "
     "'partial: …' naming the targets present when some are missing. Rows are ranked (best avg targets "
     "first) only among rows with the same language set and metric: complete official sets first, then each "
     "partial set; a partial average is never compared with a complete one. '(extra)' languages are outside "
     "the official set: shown, never averaged."),
    ("rows", "evaluated rows per language; another row set (e.g. --limit 300 beside the full dev set) is "
     "another row of the table, never averaged with this one."),
    ("seeds", "the training seeds the row averages; a row is one configuration (config: the fields that "
     "differ from the defaults) on one row set."),
    ("split", "the split scored: every measured row is on the report's split; published rows say theirs."),
    ("protocol", "derived from the run's lineage, the strongest of the row's scores: zero-shot (no "
     "target-language labels and no benchmark inputs read anywhere in the lineage), transductive (the scored "
     "split's inputs were pseudo-labelled), few-shot-target (trained or selected on labelled target-language "
     "rows)."),
    ("published", "figures quoted from papers (their source named), full fine-tuning, on their own split and "
     "language set: in their own table, never ranked with measured rows; 'comparable' names the measured rows "
     "on the same split, metric and complete language set, if any."),
]

HTML_LEGEND = [
    ("error bar", f"in a language cell: the 95% interval on a fixed 0–100 axis ({BAR_WIDTH} px), the tick at x; "
     "in an average cell (grey): x ± s over seeds, where there is more than one seed."),
    ("cell colour", "how far a language cell falls below its column's best, coloured only beyond noise: grey: "
     "within noise of the best (the difference is at most √(h₁² + h₂²), h being each cell's 95% half-width: "
     "its bootstrap interval's, else for accuracy 1.96·√(p(1−p)/n)); orange, deeper with the difference, up "
     f"to {HEAT_RANGE:.0f} points or more; white: no noise estimate (chrF/BLEU without an interval), not coloured."),
]


def markdown_legend() -> list[str]:
    return ["**Legend**", ""] + [f"- `{term}`: {text}" if term.startswith("x ") else f"- **{term}**: {text}"
                                 for term, text in LEGEND]


def half_width(row: dict, lang: str) -> float | None:
    """A cell's 95% half-width (0-1 scale): its bootstrap interval's; else, for an accuracy, the normal
    approximation over its rows; else None (no noise estimate)."""
    if lang in row.get("ci95", {}):
        low, high = row["ci95"][lang]
        return (high - low) / 2
    n = (row.get("n") or {}).get(lang)
    if row.get("metric") == "accuracy" and n:
        p = row["languages"][lang][0]
        return 1.96 * sqrt(p * (1 - p) / n)
    return None


def heat(rows: list[dict], langs: list[str]) -> dict[tuple[int, str], str]:
    """(row index, language) -> background colour: NEUTRAL within noise of the column's best, a shade of
    one hue growing with the difference beyond it (full at HEAT_RANGE points), UNKNOWN without an estimate."""
    colours = {}
    for lang in langs:
        present = [i for i, r in enumerate(rows) if lang in r["languages"]]
        if not present:
            continue
        best = max(present, key=lambda i: rows[i]["languages"][lang][0])
        top, top_noise = rows[best]["languages"][lang][0], half_width(rows[best], lang)
        for i in present:
            gap = top - rows[i]["languages"][lang][0]
            noise = half_width(rows[i], lang)
            if gap <= 0:
                colours[i, lang] = NEUTRAL
            elif noise is None or top_noise is None:
                colours[i, lang] = UNKNOWN
            elif gap <= sqrt(noise ** 2 + top_noise ** 2):
                colours[i, lang] = NEUTRAL
            else:
                colours[i, lang] = shade(100 * gap)
    return colours


def shade(points: float) -> str:
    t = min(points / HEAT_RANGE, 1.0)
    return "#" + "".join(f"{round(a + t * (b - a)):02x}" for a, b in zip(LIGHT, FULL))


def error_bar(mean: float, low: float, high: float, kind: str = "ci") -> str:
    """An inline SVG bar on the fixed 0-100 axis: [low, high] (0-1 scale) as a band, a tick at the mean."""
    scale = BAR_WIDTH / 100

    def x(value: float) -> float:
        return min(max(100 * value, 0.0), 100.0) * scale

    left, right, tick = x(low), x(high), x(mean)
    fill = "#4c72b0" if kind == "ci" else "#999999"
    label = f"{'95% interval' if kind == 'ci' else 'mean ± std over seeds'} {100 * low:.1f} to {100 * high:.1f}"
    return (f'<svg class="bar {kind}" width="{BAR_WIDTH}" height="8" viewBox="0 0 {BAR_WIDTH} 8" role="img" '
            f'aria-label="{escape(label)}"><rect x="0" y="3.5" width="{BAR_WIDTH}" height="1" fill="#dddddd"/>'
            f'<rect class="band" x="{left:.2f}" y="1" width="{right - left:.2f}" height="6" fill="{fill}" '
            f'fill-opacity="0.45"/><rect x="{tick - 0.5:.2f}" y="0" width="1" height="8" fill="#000000"/></svg>')


def _scale_html() -> str:
    swatches = [(NEUTRAL, "within noise of the best")] + \
        [(shade(p), f"{p:.0f}{'+' if p == HEAT_RANGE else ''} points below") for p in (5, 10, HEAT_RANGE)] + \
        [("#ffffff", "no noise estimate")]
    return "<p class=\"scale\">" + "".join(
        f'<span class="swatch" style="background:{colour}"></span>{escape(text)} ' for colour, text in swatches) + "</p>"


def page(title: str, header: list[str], table: list[list[str]], rows: list[dict], langs: list[str],
         first_lang: int, published: tuple[list[str], list[list[str]]] | None, figures: list[str],
         note: str | None = None) -> str:
    """One self-contained page: every string from data goes through ``html.escape``; no scripts. Language
    cells (columns ``first_lang`` onwards, one per ``langs``) of measured rows (``table[i]`` is ``rows[i]``)
    carry a colour from ``heat`` and an error bar; average cells a seed bar."""
    colours = heat(rows, langs)
    averages = {header.index(name): key for name, key in (("avg targets", "avg_target"),
                                                          ("avg with source", "avg_all"), ("gap", "gap"))}

    def td(i: int, j: int, text: str) -> str:
        row, extra, style = rows[i], "", ""
        lang = langs[j - first_lang] if first_lang <= j < first_lang + len(langs) else None
        if lang in row["languages"]:
            style = colours.get((i, lang), "")
            if lang in row["ci95"]:
                extra = error_bar(row["languages"][lang][0], *row["ci95"][lang])
        elif averages.get(j) in ("avg_target", "avg_all") and row.get(averages[j]) and row[averages[j]][1] > 0:
            m, s = row[averages[j]]
            extra = error_bar(m, m - s, m + s, kind="std")
        attr = f' style="background:{style}"' if style else ""
        return f"<td{attr}>{escape(text)}{'<br>' + extra if extra else ''}</td>"

    def html_table(head: list[str], body: list[list[str]], measured: bool) -> str:
        cells = "".join(f"<th>{escape(h)}</th>" for h in head)
        lines = "".join("<tr>" + "".join(td(i, j, c) if measured else f"<td>{escape(c)}</td>"
                                         for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(body))
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{lines}</tbody></table>"

    legend = "".join(f"<dt>{escape(term)}</dt><dd>{escape(text)}</dd>" for term, text in LEGEND + HTML_LEGEND)
    if note is not None:
        body = f"<p class=\"note\">{escape(note)}</p>"
    else:
        body = html_table(header, table, True) + _scale_html()
        if published and published[1]:
            body += ("<h2>Published reference rows</h2><p>Quoted from papers (full fine-tuning), not measured "
                     "here; never ranked with the rows above.</p>" + html_table(*published, False))
        body += "".join(f"<figure>{svg}</figure>" for svg in figures)
        body += f"<h2>Legend</h2><dl>{legend}</dl>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}"
        "td:first-child{text-align:left}figure{margin:1.5em 0}svg.bar{display:block;margin-top:2px}"
        ".swatch{display:inline-block;width:14px;height:14px;border:1px solid #999;margin:0 4px 0 10px;"
        "vertical-align:middle}dt{font-weight:bold;margin-top:.5em}dd{margin-left:1.5em;max-width:60em}"
        "</style></head><body>"
        f"<h1>{escape(title)}</h1>{body}</body></html>\n"
    )
