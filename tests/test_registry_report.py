import csv
import io
import json
import statistics

import pytest

from xprompt.registry import INDEX_FILE, index_run, list_runs, rebuild
from xprompt.reports import leaderboard, render


def _fake_run(runs, name, seed, scores, task="xnli", method="deep", init_from=None, correct=None):
    """``correct``: per-row results by language ('1' right, '0' wrong); they set that language's n and accuracy."""
    run = runs / name
    run.mkdir(parents=True)
    cfg = {"task": task, "lang": "en", "backbone": "e5-small", "method": method, "prompt_length": 8,
           "shots": 16, "seed": seed, "lr": 0.03, "max_steps": 100, "init_from": init_from}
    (run / "config.json").write_text(json.dumps({"train": cfg}))
    dev = {lang: {"n": 10, "accuracy": acc, "macro_f1": acc - 0.1, "labeled": True} for lang, acc in scores.items()}
    for lang, rows in (correct or {}).items():
        dev[lang] = {"n": len(rows), "accuracy": rows.count("1") / len(rows), "macro_f1": 0.0, "labeled": True,
                     "correct": rows}
    (run / "metrics.json").write_text(json.dumps({"train": {"select_accuracy": 0.5}, "eval": {task: {"dev": dev}}}))
    index_run(runs, run)
    return run


def test_registry_indexes_and_rebuilds_from_folders(tmp_path):
    _fake_run(tmp_path, "a", 13, {"en": 0.8, "de": 0.6})
    _fake_run(tmp_path, "b", 21, {"en": 0.7, "de": 0.5}, method="soft")
    before = list_runs(tmp_path)
    assert [r["run_id"] for r in before] == ["a", "b"]
    assert {(r["lang"], r["accuracy"]) for r in before[0]["results"]} == {("en", 0.8), ("de", 0.6)}
    assert [r["run_id"] for r in list_runs(tmp_path, method="soft")] == ["b"]
    (tmp_path / INDEX_FILE).unlink()
    assert list_runs(tmp_path) == before  # rebuilt from the run folders on demand
    assert rebuild(tmp_path) == 2


def test_sweep_mean_and_std_over_seeds(tmp_path):
    scores = [{"en": 0.8, "de": 0.6, "zh": 0.5}, {"en": 0.7, "de": 0.4, "zh": 0.5}, {"en": 0.9, "de": 0.5, "zh": 0.6}]
    for i, s in enumerate(scores):
        _fake_run(tmp_path, f"r{i}", [13, 21, 42][i], s)
    _fake_run(tmp_path, "other", 13, {"en": 0.1, "de": 0.1, "zh": 0.1}, method="soft")
    rows = leaderboard(list_runs(tmp_path), "xnli")
    assert [r["method"] for r in rows] == ["deep", "soft"]  # best average over targets first
    deep = rows[0]
    assert deep["seeds"] == [13, 21, 42]
    m, s = deep["languages"]["de"]
    assert m == pytest.approx(0.5) and s == pytest.approx(statistics.stdev([0.6, 0.4, 0.5]))
    per_seed_targets = [(x["de"] + x["zh"]) / 2 for x in scores]
    assert deep["avg_target"][0] == pytest.approx(statistics.mean(per_seed_targets))
    assert deep["avg_target"][1] == pytest.approx(statistics.stdev(per_seed_targets))
    gaps = [x["en"] - (x["de"] + x["zh"]) / 2 for x in scores]
    assert deep["gap"][0] == pytest.approx(statistics.mean(gaps))


def test_runs_from_another_start_are_another_sweep(tmp_path):
    _fake_run(tmp_path, "plain", 13, {"en": 0.5, "de": 0.4})
    _fake_run(tmp_path, "warm13", 13, {"en": 0.7, "de": 0.6}, init_from="/x/runs/ocnli-zh-s42")
    _fake_run(tmp_path, "warm21", 21, {"en": 0.8, "de": 0.6}, init_from="/x/runs/ocnli-zh-s42")
    rows = leaderboard(list_runs(tmp_path), "xnli")
    assert [(r["init_from"], r["seeds"]) for r in rows] == [("ocnli-zh-s42", [13, 21]), (None, [13])]
    md = render(rows, [], "md")
    assert "xnli/en x8 from ocnli-zh-s42" in md


def test_render_formats_parse(tmp_path):
    _fake_run(tmp_path, "a", 13, {"en": 0.8, "de": 0.6})
    _fake_run(tmp_path, "b", 21, {"en": 0.6, "de": 0.4})
    rows = leaderboard(list_runs(tmp_path), "xnli")
    published = [{"model": "XLM-R base", "backbone": "xlm-roberta-base", "method": "full fine-tuning", "avg_all": 76.2}]
    md = render(rows, published, "md").splitlines()
    assert md[0].startswith("| run |") and "70.0 ± 14.1" in md[2] and md[3] == ""  # measured rows only
    section = md.index("**Published reference rows** (quoted from papers, not measured here; never ranked with "
                       "the rows above)")
    assert md[section + 4].startswith("| published: XLM-R base")
    table = list(csv.reader(io.StringIO(render(rows, published, "csv"))))
    de = table[0].index("de")
    assert table[0][de:de + 2] == ["de", "en"] and table[1][de] == "50.0 ± 14.1" and table[2][-2] == "76.2"
    data = json.loads(render(rows, published, "json"))
    assert data["rows"][0]["seeds"] == [13, 21] and data["published"][0]["avg_all"] == 76.2


def test_report_and_runs_commands(tmp_path):
    from typer.testing import CliRunner

    from xprompt.cli import app

    _fake_run(tmp_path, "a", 13, {"en": 0.8, "de": 0.6})
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--runs-dir", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[1][0] == "xnli/en x8" and any(r[0].startswith("published: XLM-R base") for r in rows)
    result = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path), "--rebuild"])
    assert result.exit_code == 0 and "indexed 1 runs" in result.output


def test_bootstrap_interval_on_a_known_case():
    from xprompt.reports import bootstrap_ci

    low, high = bootstrap_ci(["1" * 700 + "0" * 300], samples=2000)
    assert low < 0.7 < high
    half_width = 1.96 * (0.7 * 0.3 / 1000) ** 0.5  # normal approximation: about 0.028
    assert abs((high - low) / 2 - half_width) < 0.006
    assert bootstrap_ci(["1111", "1111"]) == (1.0, 1.0)
    assert bootstrap_ci(["11", "101"]) is None  # runs on different rows cannot be paired


def test_html_report_escapes_data_and_has_no_script(tmp_path):
    from html.parser import HTMLParser

    run = _fake_run(tmp_path, "a", 13, {"en": 0.8, "de": 0.6})
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["backbone"] = "<script>alert('x')</script>"
    (run / "config.json").write_text(json.dumps(cfg))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["eval"]["xnli"]["dev"]["de"]["correct"] = "1" * 6 + "0" * 4
    (run / "metrics.json").write_text(json.dumps(metrics))
    rebuild(tmp_path)
    published = [{"model": "<b>m</b>", "backbone": "b", "method": "<script>x</script>", "avg_all": 1.0,
                  "source": "<i>s</i>"}]
    page = render(leaderboard(list_runs(tmp_path), "xnli"), published, "html", title="t <b>")

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    parser = Collect()
    parser.feed(page)
    assert "script" not in parser.tags and "b" not in parser.tags and "i" not in parser.tags
    assert "published: <b>m</b>" in parser.text and "<i>s</i>" in parser.text  # published rows: text too
    assert "<script>alert('x')</script>" in "".join(parser.text)  # shown as text, escaped in the markup
    assert parser.tags.count("figure") == 1 and "table" in parser.tags
    assert parser.tags.count("svg") == 2  # the chart and the error bar of the one cell with an interval
    assert "60.0 [" in "".join(parser.text)  # the bootstrap interval of the cell with per-row results


def test_xtreme_submission_files(tmp_path):
    from xprompt.reports import xtreme_files

    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    (run / "predictions" / "xnli.test.de.tsv").write_text("id\tprediction\n0\tneutral\n1\tentailment\n")
    (run / "predictions" / "xnli.dev.de.tsv").write_text("id\tprediction\n0\tneutral\n")
    written = xtreme_files(run, "xnli", tmp_path / "out")
    assert [p.name for p in written] == ["test-de.tsv"]
    assert (tmp_path / "out" / "xnli" / "test-de.tsv").read_text() == "neutral\nentailment\n"


def _damage(runs, how: str) -> None:
    """Garbage bytes over the whole index, or over every page after the first (the header still
    reads: SQLite finds the damage only when a query reaches those pages)."""
    import sqlite3

    path = runs / INDEX_FILE
    if how == "garbage":
        path.write_bytes(b"\x13garbage, not a database\x00" * 400)
        return
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))


@pytest.mark.parametrize("how", ["garbage", "malformed"])
@pytest.mark.parametrize("entry", ["runs-command", "list_runs", "index_run", "forget_run", "_current"])
def test_an_unreadable_index_is_rebuilt_from_the_folders(tmp_path, capsys, entry, how):
    """The index is a cache: a corrupt one is rebuilt from the run folders with a one-line notice,
    at every way into it, and the call goes on."""
    import sqlite3

    from typer.testing import CliRunner

    from xprompt.cli import app
    from xprompt.registry import _current, forget_run

    for i in range(12):  # enough rows for pages beyond the first
        _fake_run(tmp_path, f"run{i:02d}", i, {"en": 0.8, "de": 0.6, "zh": 0.5})
    _damage(tmp_path, how)
    names = [f"run{i:02d}" for i in range(12)]
    if entry == "runs-command":
        result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output and result.exception is None
        assert all(name in result.stdout for name in names)
        notice = [line for line in result.stderr.splitlines() if line.strip()]
    else:
        if entry == "list_runs":
            assert [r["run_id"] for r in list_runs(tmp_path)] == names
        elif entry == "index_run":
            index_run(tmp_path, tmp_path / "run03")
        elif entry == "forget_run":
            import shutil

            shutil.rmtree(tmp_path / "run05")  # the folder goes, then its rows
            forget_run(tmp_path, "run05")
            names.remove("run05")
        else:
            # garbage: no version to read, so not current (its callers rebuild it); damaged pages
            # past the header: current, and the caller's own query meets the damage and rebuilds
            assert _current(tmp_path) is (how == "malformed")
            said = capsys.readouterr().err
            assert ("was unreadable" in said) is (how == "garbage") and "Traceback" not in said
            index_run(tmp_path, tmp_path / "run00")  # _current's caller: says so (again) and rebuilds
        notice = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(notice) == 1 and "was unreadable" in notice[0] and "rebuilding it from the run folders" in notice[0]
    with sqlite3.connect(tmp_path / INDEX_FILE) as db:  # a sound index again, holding every folder's run
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    runs = list_runs(tmp_path)
    assert [r["run_id"] for r in runs] == names and all(len(r["results"]) == 3 for r in runs)
    assert capsys.readouterr().err == ""  # the rebuilt index reads without a notice


# ---------------------------------------------------------------- what a reader sees: legend, bars, colour

def _rows_with_intervals(tmp_path, de_a: str, de_b: str):
    _fake_run(tmp_path, "a", 13, {"en": 0.8}, correct={"de": de_a})
    _fake_run(tmp_path, "b", 13, {"en": 0.8}, method="soft", correct={"de": de_b})
    return leaderboard(list_runs(tmp_path), "xnli")


def test_the_legend_says_what_a_cell_is_in_markdown_and_html(tmp_path):
    from xprompt.report_page import LEGEND

    rows = _rows_with_intervals(tmp_path, "1" * 30 + "0" * 20, "1" * 29 + "0" * 21)
    md = render(rows, [], "md")
    assert "**Legend**" in md and "- `x ± s [lo, hi]`: x: the row's metric ×100" in md
    assert "percentile bootstrap 95% interval" in md and "1000 resamples" in md and "paired" in md
    for term in ("avg targets, avg with source, gap", "average over", "rows", "seeds", "split", "protocol",
                 "published"):
        assert f"- **{term}**: " in md
    assert {term for term, _ in LEGEND} >= {"x ± s [lo, hi]", "protocol", "published"}
    page = render(rows, [], "html")
    assert "<h2>Legend</h2>" in page and "<dt>x ± s [lo, hi]</dt>" in page and "<dt>cell colour</dt>" in page
    assert page.count('class="swatch"') == 5  # the colour scale: neutral, 5, 10, 20+ points, no estimate


def test_error_bars_are_as_wide_as_the_intervals(tmp_path):
    import re

    from xprompt.report_page import BAR_WIDTH, error_bar

    def band(svg: str) -> tuple[float, float]:
        x, width = re.search(r'class="band" x="([0-9.]+)" y="1" width="([0-9.]+)"', svg).groups()
        return float(x), float(width)

    assert band(error_bar(0.5, 0.4, 0.6)) == (0.4 * BAR_WIDTH, pytest.approx(0.2 * BAR_WIDTH))
    assert band(error_bar(0.5, 0.45, 0.55))[1] == pytest.approx(0.1 * BAR_WIDTH)  # half the interval: half the bar
    rows = _rows_with_intervals(tmp_path, "1" * 35 + "0" * 15, "1" * 700 + "0" * 300)
    page = render(rows, [], "html")
    widths = sorted(band(svg)[1] for svg in re.findall(r'<svg class="bar ci".*?</svg>', page))
    intervals = sorted((r["ci95"]["de"][1] - r["ci95"]["de"][0]) * BAR_WIDTH for r in rows)
    assert widths == [pytest.approx(w, abs=0.01) for w in intervals]
    assert widths[1] > 3 * widths[0]  # 50 rows: a wide bar; 1000 rows: a narrow one


def test_noise_gets_the_neutral_colour_and_a_real_gap_a_shade(tmp_path):
    from xprompt.report_page import NEUTRAL, heat, shade

    rows = _rows_with_intervals(tmp_path, "1" * 30 + "0" * 20, "1" * 27 + "0" * 23)  # 60.0 vs 54.0 on 50 rows
    colours = heat(rows, ["de", "en"])
    assert colours[0, "de"] == NEUTRAL and colours[1, "de"] == NEUTRAL  # 6 points on 50 rows is noise
    page = render(rows, [], "html")
    assert page.count(f"<td style=\"background:{NEUTRAL}\">") == 4  # de and en of both rows: nothing painted apart
    wide = [dict(r, n={"de": 1000}, ci95={"de": (m - 0.03, m + 0.03)}) for r in rows
            for m in [r["languages"]["de"][0]]]
    colours = heat(wide, ["de"])  # the same 6 points, measured on 1000 rows: beyond noise
    assert colours[0, "de"] == NEUTRAL and colours[1, "de"] == shade(6.0) != NEUTRAL
    assert shade(40.0) == shade(20.0) and shade(5.0) != shade(10.0)  # a fixed range, one hue
    chrf = [dict(r, metric="chrf", ci95={}) for r in rows]
    assert heat(chrf, ["de"])[1, "de"] == ""  # no noise estimate: not coloured


def test_published_rows_are_labelled_and_never_ranked_with_a_partial_average(tmp_path):
    from xprompt.reports import comparable

    _fake_run(tmp_path, "a", 13, {"en": 0.8, "de": 0.6})  # a partial dev average (xnli has 15 languages)
    rows = leaderboard(list_runs(tmp_path), "xnli")
    published = [{"model": "XLM-R base", "backbone": "xlm-roberta-base", "method": "full fine-tuning",
                  "avg_all": 76.2, "languages": 15, "source": "Conneau et al. 2020", "split": "test"}]
    md = render(rows, published, "md").splitlines()
    measured = md[:md.index("")]
    assert len(measured) == 3 and not any("published" in line or "76.2" in line for line in measured)
    line = next(x for x in md if x.startswith("| published: XLM-R base"))
    assert "| Conneau et al. 2020 |" in line and "| test |" in line
    assert line.endswith("| 76.2 | none: no measured test row over 15 languages incl. the source |")
    assert comparable(published[0], rows) == []
    page = render(rows, published, "html")
    assert page.index("<h2>Published reference rows</h2>") > page.index("</table>")  # a table of its own
    # a complete test-split row over the same 15 languages is comparable, and named
    complete = dict(rows[0], split="test", complete=True, target_set=["x"] * 14)
    assert comparable(published[0], [complete]) == [complete]
    assert comparable(dict(published[0], split="dev"), [complete]) == []


@pytest.mark.parametrize("fmt", ["md", "csv", "json", "html"])
def test_a_task_without_evaluations_says_so_in_one_line(tmp_path, fmt):
    from typer.testing import CliRunner

    from xprompt.cli import app

    _fake_run(tmp_path, "a", 13, {"en": 0.8, "de": 0.6})  # xnli only: nothing on pawsx
    result = CliRunner().invoke(app, ["report", "--runs-dir", str(tmp_path), "--task", "pawsx", "--format", fmt])
    assert result.exit_code == 0, result.output
    note = (f"no evaluations of task 'pawsx' (dev split) in {tmp_path} yet; run `xprompt eval --task pawsx` "
            "on a trained run")
    if fmt == "md":
        assert result.stdout == note + "\n" and result.stderr == ""
        return
    assert note in " ".join(result.stderr.split())  # the terminal may wrap it
    if fmt == "csv":
        assert list(csv.reader(io.StringIO(result.stdout)))[0][0] == "run"
        assert not any(r and r[0] == "xnli/en x8" for r in csv.reader(io.StringIO(result.stdout)))
    elif fmt == "json":
        assert json.loads(result.stdout)["rows"] == []
    else:
        from html import escape

        assert f'<p class="note">{escape(note)}</p>' in result.stdout and "<table>" not in result.stdout
