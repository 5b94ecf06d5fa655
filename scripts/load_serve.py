"""A bounded load test of ``xprompt serve`` on 127.0.0.1 (issue 33, item 6).

Starts ``xprompt serve`` on a free loopback port with three or more runs (by default three short runs
on the embedded ``e5-small``, trained here once: XNLI deep, PAWS-X deep, XNLI soft), or connects to a
server already running on 127.0.0.1 (``--url``). Requests carry real XNLI / PAWS-X dev rows (the bundled
``tasks/data``) in several languages, each request one run and one language, a random 1..``--rows`` rows.

1. one request at a time (``--baseline`` requests): the unbatched throughput and latency;
2. ``--clients`` concurrent clients x ``--requests`` requests each, mixing every run and language.

Both phases stop by themselves at ``--time-limit`` seconds (what was not sent is counted, never hung
on). Checked: every request answered exactly once (its row ids come back once, in order, and the
server's batcher counted as many requests), and every label is the one ``xprompt.load(run).predict``
gives for the same rows in this process. Reported: throughput of both phases, p50/p99 latency, the
server's peak RSS (VmHWM), its batches (how many mixed several prompts), the CPU (torch's capability,
avx512_bf16 / amx_tile in /proc/cpuinfo) and the load average the machine had.

    python scripts/load_serve.py --clients 8 --requests 25 --out docs/serving.json
    python scripts/load_serve.py --run runs/A,runs/B,runs/C --langs en,de,zh
    python scripts/load_serve.py --url http://127.0.0.1:8000 --server-pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = [("xnli-deep", ["--task", "xnli", "--method", "deep"]), ("pawsx-deep", ["--task", "pawsx", "--method", "deep"]),
                ("xnli-soft", ["--task", "xnli", "--method", "soft", "--seed", "7"])]


def xprompt_command(*args) -> list[str]:
    return [sys.executable, "-m", "xprompt", *map(str, args)]


def train_default_runs(runs_dir: Path, steps: int) -> list[Path]:
    """Three short runs on e5-small (kept: a second load test reuses them)."""
    for name, options in DEFAULT_RUNS:
        if not (runs_dir / name / "prompt").is_dir():
            subprocess.run(xprompt_command("train", *options, "--runs-dir", runs_dir, "--run-name", name, "--max-steps", steps,
                                   "--eval-every", steps, "--select-size", 32, "--batch-size", 8), check=True, cwd=ROOT)
    return [runs_dir / name for name, _ in DEFAULT_RUNS]


def dev_rows(task: str, fields: list[str], lang: str, n: int) -> list[dict]:
    """The first ``n`` dev rows of a task's bundled data in ``lang`` (none where the file is absent)."""
    from xprompt.tasks import load_task

    relative = load_task(task).splits["dev"].path_for(lang)
    for path in (ROOT / "tasks" / "data" / relative, ROOT / "tasks" / "data" / (relative + ".gz")):
        if path.is_file():
            with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
                rows = [json.loads(line) for line in f if line.strip()][:n]
            return [{name: str(row[name]) for name in fields} for row in rows]
    return []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mib(pid: int | None) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


def cpu_kind() -> dict:
    import torch

    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "").split()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return {"model": model, "torch_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_tile": "amx_tile" in flags, "load_average": os.getloadavg()}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def phase(url: str, plan: list[list[dict]], limit: float) -> dict:
    """Each inner list of ``plan`` is one client's requests, sent one after another; all clients at
    once. Returns every answer by request id, the latencies, what was left unsent, wall seconds."""
    import httpx

    answers: dict[str, list] = {}
    latencies, failures, unsent = [], [], 0
    start = time.perf_counter()
    deadline = start + limit

    async def client(requests: list[dict], http) -> None:
        nonlocal unsent
        for k, request in enumerate(requests):
            if time.perf_counter() > deadline:
                unsent += len(requests) - k
                return
            sent = time.perf_counter()
            try:
                answer = await http.post(f"{url}/predict", json=request["body"],
                                         timeout=max(1.0, deadline - sent))
            except httpx.HTTPError as e:
                failures.append(f"{request['id']}: {type(e).__name__}")
                continue
            latencies.append(time.perf_counter() - sent)
            if answer.status_code != 200:
                failures.append(f"{request['id']}: {answer.status_code} {answer.text[:200]}")
                continue
            answers.setdefault(request["id"], []).append(answer.json())

    limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=len(plan))
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(requests, http) for requests in plan))
    return {"answers": answers, "latencies": latencies, "failures": failures, "unsent": unsent,
            "seconds": time.perf_counter() - start}


def make_requests(runs: list[dict], pools: dict, count: int, most_rows: int, rng: random.Random, tag: str,
                  offset: int = 0) -> list[dict]:
    """``count`` requests cycling over the runs from the ``offset``-th (clients start on different runs),
    each in a random language of its pool, 1..most_rows rows (row ids name the request, so a crossed or
    doubled answer shows)."""
    out = []
    for i in range(count):
        run = runs[(i + offset) % len(runs)]["name"]
        lang = rng.choice(sorted(pools[run]))
        picks = rng.sample(range(len(pools[run][lang])), rng.randint(1, min(most_rows, len(pools[run][lang]))))
        rid = f"{tag}{i}"
        rows = [{**pools[run][lang][j], "id": f"{rid}/{j}"} for j in picks]
        out.append({"id": rid, "run": run, "lang": lang, "picks": picks, "body": {"run": run, "rows": rows, "lang": lang}})
    return out


def check(requests: list[dict], result: dict, expected: dict) -> dict:
    """Exactly once and predict's labels, over the answered requests."""
    doubled = [rid for rid, got in result["answers"].items() if len(got) != 1]
    crossed, mismatched, worst = [], 0, 0.0
    for request in requests:
        got = result["answers"].get(request["id"])
        if not got:
            continue
        predictions = got[0]["predictions"]
        if [p["id"] for p in predictions] != [row["id"] for row in request["body"]["rows"]]:
            crossed.append(request["id"])
            continue
        for j, p in zip(request["picks"], predictions):
            want = expected[request["run"]][request["lang"]][j]
            mismatched += p["label"] != want["label"]
            worst = max(worst, *(abs(p["probabilities"][k] - v) for k, v in want["probabilities"].items()))
    answered = sum(1 for r in requests if r["id"] in result["answers"])
    return {"requests": len(requests), "answered": answered, "answered_twice": len(doubled), "crossed": len(crossed),
            "failed": len(result["failures"]), "unsent": result["unsent"], "label_mismatches": mismatched,
            "max_probability_difference": round(worst, 6), "failures": result["failures"][:5]}


def summary(requests: list[dict], result: dict) -> dict:
    answered = [r for r in requests if r["id"] in result["answers"]]
    rows = sum(len(r["body"]["rows"]) for r in answered)
    lat = result["latencies"]
    return {"seconds": round(result["seconds"], 2), "requests_per_s": round(len(answered) / result["seconds"], 2),
            "rows_per_s": round(rows / result["seconds"], 2), "rows": rows,
            "latency_ms": {"p50": round(1000 * percentile(lat, 0.5), 1) if lat else None,
                           "p99": round(1000 * percentile(lat, 0.99), 1) if lat else None,
                           "mean": round(1000 * sum(lat) / len(lat), 1) if lat else None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="Comma-separated run folders (3+); default: train three short e5-small runs.")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "load-serve", help="Where the default runs go.")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--url", help="A server already running on 127.0.0.1 (default: start one).")
    parser.add_argument("--server-pid", type=int, help="With --url: its process, for the peak RSS.")
    parser.add_argument("--langs", default="en,de,zh,fr,es", help="Languages to mix (each run uses those its dev data has).")
    parser.add_argument("--pool", type=int, default=24, help="Dev rows per run and language to draw from.")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="Requests per client.")
    parser.add_argument("--baseline", type=int, default=40, help="Requests sent one at a time first.")
    parser.add_argument("--rows", type=int, default=8, help="The most rows per request (each: 1..this).")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--scorer", default="mixed", help="the server's --scorer: mixed or by-run")
    parser.add_argument("--threads", type=int, help="The server's torch threads (default: its own).")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds per phase; then it stops.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="Write the figures as JSON here.")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    import httpx

    child, pid, url = None, args.server_pid, args.url
    if url and httpx.URL(url).host not in ("127.0.0.1", "localhost"):
        parser.error("--url must be on 127.0.0.1: this load test stays on this machine")
    if not url:
        runs = [Path(r) for r in args.run.split(",")] if args.run else train_default_runs(args.runs_dir, args.train_steps)
        port = free_port()
        command = xprompt_command("serve", "--run", ",".join(map(str, runs)), "--port", port, "--max-batch", args.max_batch,
                          "--max-wait-ms", args.max_wait_ms, "--scorer", args.scorer, "--dtype", args.dtype, "--log-level", "warning",
                          *(["--threads", args.threads] if args.threads else []))
        child = subprocess.Popen(command, cwd=ROOT)
        pid, url = child.pid, f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or (child and child.poll() is not None):
                raise SystemExit(f"the server at {url} did not come up")
            time.sleep(0.5)
        served = httpx.get(f"{url}/runs").json()["runs"]
        langs = [x.strip() for x in args.langs.split(",") if x.strip()]
        pools = {r["name"]: {lang: rows for lang in langs if (rows := dev_rows(r["task"], r["fields"], lang, args.pool))}
                 for r in served}
        used_langs = sorted({lang for by_lang in pools.values() for lang in by_lang})
        if len(served) < 3 or len(used_langs) < 3:
            raise SystemExit(f"the load test mixes 3+ prompts and 3+ languages; got {len(served)} runs, languages "
                             f"{used_langs}")
        rss_idle = peak_rss_mib(pid)
        before = httpx.get(f"{url}/health").json()["batcher"]
        sequential = make_requests(served, pools, args.baseline, args.rows, rng, "s")
        one = asyncio.run(phase(url, [sequential], args.time_limit))
        concurrent = [make_requests(served, pools, args.requests, args.rows, rng, f"c{c}-", c) for c in range(args.clients)]
        many = asyncio.run(phase(url, concurrent, args.time_limit))
        after = httpx.get(f"{url}/health").json()["batcher"]
        rss_peak = peak_rss_mib(pid)
    finally:
        if child is not None:
            child.send_signal(signal.SIGINT)
            child.wait(60)

    import xprompt  # predict's labels for every pooled row, after the load (not competing with it)

    expected = {}
    for r in served:
        model = xprompt.load(r["path"], dtype=args.dtype)
        expected[r["name"]] = {lang: model.predict([{**row, "lang": lang} for row in rows])
                               for lang, rows in pools[r["name"]].items()}
        del model
    flat = [request for client in concurrent for request in client]
    checks = {"one_at_a_time": check(sequential, one, expected), "concurrent": check(flat, many, expected)}
    answered = checks["one_at_a_time"]["answered"] + checks["concurrent"]["answered"]
    server_requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    report = {
        "command": " ".join(["python", "scripts/load_serve.py", *sys.argv[1:]]),
        "runs": [{"name": r["name"], "task": r["task"], "languages": sorted(pools[r["name"]])} for r in served],
        "languages": used_langs, "clients": args.clients, "requests_per_client": args.requests,
        "rows_per_request": f"1..{args.rows}", "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "dtype": args.dtype,
        "one_at_a_time": summary(sequential, one), "concurrent": summary(flat, many),
        "checks": {**checks, "server_counted_requests": server_requests, "client_answers": answered,
                   "exactly_once": server_requests == answered and all(
                       c["answered_twice"] == 0 and c["crossed"] == 0 for c in checks.values())},
        "batches": {"count": batches, "mixed": after["mixed_batches"] - before["mixed_batches"],
                    "mean_rows": round((after["rows"] - before["rows"]) / max(batches, 1), 1),
                    "largest": after["largest_batch"], "most_runs_in_one": after["most_runs_in_a_batch"]},
        "server_rss_mib": {"after_start": rss_idle and round(rss_idle), "peak": rss_peak and round(rss_peak)},
        "cpu": cpu_kind(),
    }
    report["speedup_rows_per_s"] = round(report["concurrent"]["rows_per_s"] / max(report["one_at_a_time"]["rows_per_s"], 1e-9), 2)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    ok = report["checks"]["exactly_once"] and not any(c["label_mismatches"] or c["failed"] or c["unsent"]
                                                        for c in checks.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
