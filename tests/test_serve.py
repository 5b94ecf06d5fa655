"""``xprompt serve`` (issue 33, item 5): a real HTTP client against a server started here on a free
loopback port. Predictions are ``predict``'s (labels, probabilities within 1e-5, the rows' order),
concurrent requests for different prompts are scored in one batch, and every bad request gets its 4xx
with a one-line reason while the server goes on serving."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

from conftest import ROOT, TEST_DATA
from xprompt.cli import app

runner = CliRunner()
MAX_ROWS = 20


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir):
    """A and N on XNLI (N scores native templates), P on PAWS-X: three prompts on one tiny backbone."""
    runs = tmp_path_factory.mktemp("serve") / "runs"
    for name, task, seed, extra in (("A", "xnli", 1, ()), ("N", "xnli", 2, ("--template", "native")),
                                    ("P", "pawsx", 3, ())):
        out = invoke("train", "--task", task, "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs,
                     "--max-steps", 2, "--eval-every", 2, "--prompt-length", 2, "--batch-size", 8, "--dtype", "fp32",
                     "--run-name", name, "--seed", seed, "--lr", 0.3, "--select-size", 16, *extra)
        assert out.exit_code == 0, out.output
    return runs


def xnli_rows(lang, n=6):
    return [{"id": f"{lang}-{r['id']}", "premise": r["premise"], "hypothesis": r["hypothesis"], "lang": lang}
            for r in jsonl(TEST_DATA / "xnli" / f"dev.{lang}.jsonl")[:n]]


def pawsx_rows(lang, n=6):
    return [{"id": r["id"], "sentence1": r["sentence1"], "sentence2": r["sentence2"], "lang": lang}
            for r in jsonl(TEST_DATA / "pawsx" / f"dev.{lang}.jsonl")[:n]]


@pytest.fixture(scope="module")
def expected(runs):
    """What ``predict`` (the Python API, each run loaded on its own) gives for the rows sent below."""
    import xprompt

    def of(run, rows):
        return xprompt.load(runs / run, dtype="fp32").predict(rows)

    mixed = xnli_rows("de", 4) + xnli_rows("zh", 4) + xnli_rows("en", 4)
    return {"mixed": mixed, "A": of("A", mixed), "N": of("N", mixed), "P": of("P", pawsx_rows("de") + pawsx_rows("en"))}


def scorer_failing_on(text):
    """The default scorer, except that a batch holding a row whose premise is ``text`` fails."""
    from xprompt.workflows import serving

    def score(groups):
        if any(row.get("premise") == text for _, rows in groups for row in rows):
            raise RuntimeError("boom")
        return serving.score_by_run(groups)

    return score


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    from xprompt.backbones import open_backbone
    from xprompt.workflows.serving import load_served, make_app, running

    cache = tmp_path_factory.mktemp("cache")
    served = load_served([runs / "A", runs / "N", runs / "P"], lambda name, revision, allow_bin: open_backbone(
        name, cache, "cpu", "fp32", revision=revision, allow_bin_weights=allow_bin))
    assert len({id(s.predictor.backbone) for s in served}) == 1  # one backbone, opened once, shared
    web = make_app(served, max_batch=64, max_wait_ms=300, max_rows=MAX_ROWS, score=scorer_failing_on("boom"))
    with running(web) as url:
        assert url.startswith("http://127.0.0.1:")
        yield url


def post(url, body, **kwargs):
    return httpx.post(f"{url}/predict", json=body, timeout=60, **kwargs)


def same(answer, expected, ids):
    assert [p["id"] for p in answer["predictions"]] == ids
    assert [p["label"] for p in answer["predictions"]] == [e["label"] for e in expected]
    for got, want in zip(answer["predictions"], expected):
        assert set(got["probabilities"]) == set(want["probabilities"])
        assert all(abs(got["probabilities"][k] - want["probabilities"][k]) < 1e-5 for k in want["probabilities"])


def test_predictions_are_predict_s_in_the_rows_order(server, expected):
    rows = expected["mixed"]  # de, zh and en rows in one request, each naming its language
    answer = post(server, {"run": "A", "rows": rows})
    assert answer.status_code == 200, answer.text
    assert answer.json()["run"] == "A"
    same(answer.json(), expected["A"], [r["id"] for r in rows])
    bare = [{k: v for k, v in r.items() if k not in ("id", "lang")} for r in pawsx_rows("de")]  # no id: positions
    answer = post(server, {"run": "P", "rows": bare, "lang": "de"})
    same(answer.json(), expected["P"][:6], list(range(6)))


def test_concurrent_requests_for_different_prompts_share_a_batch(server, expected, runs):
    before = httpx.get(f"{server}/health").json()["batcher"]
    paws = pawsx_rows("de") + pawsx_rows("en")
    mixed = expected["mixed"]
    asks = [("A", mixed, expected["A"]), ("N", mixed, expected["N"]), ("P", paws, expected["P"]),
            (str(runs / "A"), mixed[:5], expected["A"][:5]), ("P", paws[6:], expected["P"][6:])]  # a run by its path
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: post(server, {"run": ask[0], "rows": ask[1]}), asks))
    for answer, (_, rows, want) in zip(answers, asks):
        assert answer.status_code == 200, answer.text
        same(answer.json(), want, [r["id"] for r in rows])
    after = httpx.get(f"{server}/health").json()["batcher"]
    assert after["requests"] - before["requests"] == len(asks)
    assert after["mixed_batches"] > before["mixed_batches"] and after["most_runs_in_a_batch"] >= 2
    assert after["batches"] - before["batches"] < len(asks)  # merged, not one batch per request


def test_runs_and_health(server, runs):
    listed = httpx.get(f"{server}/runs").json()["runs"]
    assert [r["name"] for r in listed] == ["A", "N", "P"]
    assert listed[2]["task"] == "pawsx" and listed[2]["fields"] == ["sentence1", "sentence2"]
    assert listed[1]["template_style"] == "native" and "de" in listed[1]["languages"]
    assert listed[0]["card"]["labels"] == listed[0]["labels"] and listed[0]["path"] == str(runs / "A")
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["runs"] == ["A", "N", "P"] and health["batcher"]["max_rows"] == MAX_ROWS


ROW = {"premise": "Er kam nach Hause.", "hypothesis": "Er war unterwegs.", "lang": "de"}
BAD = [
    ({"run": "nope", "rows": [ROW]}, 404, "unknown run 'nope'; this server serves A, N, P"),
    (b'{"run": "A", "rows": [', 400, "malformed JSON"),
    ({"run": "A", "rows": []}, 422, "rows is empty"),
    ({"run": "A", "rows": [ROW] * (MAX_ROWS + 1)}, 413, f"at most {MAX_ROWS}"),
    ({"rows": [ROW]}, 422, "missing field 'run'"),
    ({"run": "A"}, 422, "missing field 'rows'"),
    ({"run": "A", "rows": [ROW, {"premise": "x"}]}, 422, "rows[1]: field 'hypothesis' is missing"),
    ({"run": "A", "rows": [{**ROW, "hypothesis": 3}]}, 422, "rows[0]: field 'hypothesis' is not text (int)"),
    ({"run": "A", "rows": [{**ROW, "premise": " "}]}, 422, "rows[0]: field 'premise' is empty"),
    ({"run": "A", "rows": ["one text"]}, 422, "rows[0] is a text, but xnli reads premise, hypothesis"),
    ({"run": "A", "rows": [7]}, 422, "rows[0] must be an object"),
    ({"run": "A", "rows": "x"}, 422, "field 'rows'"),
    ({"run": "A", "row": [ROW], "rows": [ROW]}, 422, "unknown field 'row'"),
    ({"run": 3, "rows": [ROW]}, 422, "field 'run'"),
    ({"run": "A", "rows": [{**ROW, "id": [1]}]}, 422, "rows[0]: 'id' must be"),
    ({"run": "N", "rows": [{**ROW, "lang": "xx"}]}, 422, "'lang' 'xx' is not one of its languages"),
    ([ROW], 422, "the body must be a JSON object"),
    (None, 422, "the request needs a JSON body"),
    (b'{"run": "A", "rows": ["' + b"x" * (2 << 20) + b'"]}', 413, "the request body is over"),
    ({"run": "A", "rows": [{**ROW, "premise": "boom"}]}, 500, "scoring failed: RuntimeError: boom"),
]


@pytest.mark.parametrize("body, status, reason", BAD, ids=[f"{b[1]}-{b[2][:30]}" for b in BAD])
def test_a_bad_request_gets_a_one_line_reason_and_the_server_goes_on(server, expected, body, status, reason):
    if isinstance(body, bytes) or body is None:
        answer = httpx.post(f"{server}/predict", content=body or b"", timeout=60,
                            headers={"content-type": "application/json"})
    else:
        answer = post(server, body)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert list(error) == ["error"] and "\n" not in error["error"] and reason in error["error"], error
    good = post(server, {"run": "A", "rows": expected["mixed"][:3]})
    assert good.status_code == 200 and len(good.json()["predictions"]) == 3


def test_wrong_endpoints_methods_and_streamed_bodies_answer_in_one_line(server, expected):
    missing = httpx.get(f"{server}/nothing")
    assert missing.status_code == 404 and "use POST /predict" in missing.json()["error"]
    wrong = httpx.get(f"{server}/predict")
    assert wrong.status_code == 405 and list(wrong.json()) == ["error"]

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"run": "A", "rows": ["'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"]}'

    streamed = httpx.post(f"{server}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "the request body is over" in streamed.json()["error"]
    assert post(server, {"run": "A", "rows": expected["mixed"][:2]}).status_code == 200


def test_a_failing_request_does_not_fail_the_ones_batched_with_it(server, expected):
    rows = expected["mixed"][:3]
    asks = [{"run": "A", "rows": rows}, {"run": "A", "rows": [{**ROW, "premise": "boom"}]},
            {"run": "N", "rows": rows}]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda body: post(server, body), asks))
    assert [a.status_code for a in answers] == [200, 500, 200]
    same(answers[0].json(), expected["A"][:3], [r["id"] for r in rows])
    same(answers[2].json(), expected["N"][:3], [r["id"] for r in rows])


def test_the_serve_command_runs_a_service_until_interrupted(runs, tiny_bert_dir, tmp_path):
    import socket

    with socket.socket() as probe:  # a free loopback port for the child
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "xprompt", "serve", "--run", f"{runs / 'A'},{runs / 'P'}", "--port",
                              str(port), "--dtype", "fp32", "--max-wait-ms", "5", "--cache-dir", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        answer = post(url, {"run": "P", "rows": pawsx_rows("en", 2)})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
        assert post(url, {"run": "N", "rows": [ROW]}).status_code == 404  # not served here
    finally:
        child.send_signal(signal.SIGINT)
        output = child.communicate(timeout=60)[0]
    assert child.returncode == 0, output
    assert "serving A (xnli), P (pawsx) on 127.0.0.1:" in " ".join(output.split()) and "Traceback" not in output


def test_serve_refuses_bad_runs_and_options_in_one_line(runs, tmp_path):
    missing = invoke("serve", "--run", tmp_path / "nothing")
    assert missing.exit_code == 1 and "holds no trained prompt" in missing.output
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "A"
    twin.symlink_to(runs / "A")
    twice = invoke("serve", "--run", f"{runs / 'A'},{twin}")
    assert twice.exit_code == 1 and "share the folder name 'A'" in " ".join(twice.output.split())
    assert invoke("serve", "--run", runs / "A", "--max-batch", 0).exit_code == 2
    assert invoke("serve", "--run", runs / "A", "--port", 70000).exit_code == 2


def test_the_batcher_takes_whole_requests_in_arrival_order_up_to_max_batch():
    import asyncio
    from types import SimpleNamespace

    from xprompt.workflows.batching import Batcher

    seen = []

    def score(groups):
        seen.append([(run.name, len(rows)) for run, rows in groups])
        return [[f"{run.name}{row}" for row in rows] for run, rows in groups]

    a, b = SimpleNamespace(name="A"), SimpleNamespace(name="B")

    async def main():
        batcher = Batcher(score, max_batch=5, max_wait=0.05)
        batcher.start()
        asks = [(a, [0, 1]), (b, [2]), (a, [3, 4]), (b, [5, 6]), (a, list(range(7, 14)))]
        answers = await asyncio.gather(*(batcher.submit(run, rows) for run, rows in asks))
        await batcher.stop()
        return answers, batcher.stats

    answers, stats = asyncio.run(main())
    assert seen == [[("A", 4), ("B", 1)], [("B", 2)], [("A", 7)]]  # same-run requests merged; never split
    assert answers[:4] == [["A0", "A1"], ["B2"], ["A3", "A4"], ["B5", "B6"]] and answers[4][-1] == "A13"
    assert stats["batches"] == 3 and stats["mixed_batches"] == 1 and stats["largest_batch"] == 7


def test_predict_mixed_scores_every_run_s_rows_in_shared_passes(runs, expected, monkeypatch):
    """The server's scorer: three runs' rows (two tasks, an agnostic and a native template, three languages)
    in mixed batches give each run's own ``predict`` (labels, probabilities within 1e-5); the label-vector
    run with the agnostic template shares passes with the others across languages."""
    import xprompt
    from xprompt.mixed import MixedModel
    from xprompt.workflows.predict import predict_mixed

    loaded = {name: xprompt.load(runs / name, dtype="fp32") for name in ("A", "N", "P")}
    loaded["N"].backbone = loaded["P"].backbone = loaded["A"].backbone  # the server opens a backbone once
    for name in ("N", "P"):
        loaded[name].models[0].backbone = loaded["A"].models[0].backbone
    members = []
    real = MixedModel.scores
    monkeypatch.setattr(MixedModel, "scores", lambda self, batch, member: members.append(
        sorted(set(member.tolist()))) or real(self, batch, member))
    rows = {"A": expected["mixed"], "N": expected["mixed"], "P": pawsx_rows("de") + pawsx_rows("en")}
    got = predict_mixed([(loaded[name], rows[name]) for name in ("A", "N", "P")])
    for name, answer in zip(("A", "N", "P"), got):
        for mine, theirs in zip(answer, expected[name]):
            assert mine["label"] == theirs["label"]
            assert all(abs(mine["probabilities"][k] - v) < 1e-5 for k, v in theirs["probabilities"].items())
    assert any(len(present) >= 2 for present in members)  # rows of several runs in one pass
