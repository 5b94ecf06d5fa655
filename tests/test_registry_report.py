import csv
import io
import json
import statistics

import pytest

from xprompt.registry import INDEX_FILE, index_run, list_runs, rebuild
from xprompt.reports import leaderboard, render


def _fake_run(runs, name, seed, scores, task="xnli", method="deep", init_from=None):
    run = runs / name
    run.mkdir(parents=True)
    cfg = {"task": task, "lang": "en", "backbone": "e5-small", "method": method, "prompt_length": 8,
           "shots": 16, "seed": seed, "lr": 0.03, "max_steps": 100, "init_from": init_from}
    (run / "config.json").write_text(json.dumps({"train": cfg}))
    dev = {lang: {"n": 10, "accuracy": acc, "macro_f1": acc - 0.1, "labeled": True} for lang, acc in scores.items()}
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
    assert md[0].startswith("| run |") and "70.0 ± 14.1" in md[2] and md[3].startswith("| published: XLM-R base")
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
    page = render(leaderboard(list_runs(tmp_path), "xnli"), [], "html", title="t <b>")

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
    assert "script" not in parser.tags and "b" not in parser.tags
    assert "<script>alert('x')</script>" in "".join(parser.text)  # shown as text, escaped in the markup
    assert parser.tags.count("svg") == 2 and "table" in parser.tags
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
