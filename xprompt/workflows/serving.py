"""Serving trained prompts over HTTP (``xprompt serve``): a FastAPI app on uvicorn with ``POST /predict``,
``GET /runs`` and ``GET /health``, and a dynamic batcher that merges concurrent requests, for any of the
served prompts, into one batch (at most ``max_batch`` rows, or what arrived within ``max_wait``).

Every served run keeps its own ``Predictor`` on one shared backbone (a backbone is opened once however
many runs read it). The batcher's one worker thread scores a batch through ``SCORE``: a list of
``(run, rows)`` groups in, per group the per-row results out (the seam a mixed-prompt model plugs into).
Bad requests get a 4xx and ``{"error": "<one line>"}``; the batcher never sees them."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..checks import refuse_tuned
from ..errors import XPromptError
from ..store import load_card
from .batching import Batcher, Groups, RequestError

ROW_BYTES = 16 * 1024  # the request body may hold about this much JSON per allowed row (min 1 MiB)


class PredictRequest(BaseModel):
    """``POST /predict``'s body."""

    model_config = ConfigDict(extra="forbid")
    run: str = Field(description="A served run: its folder name (GET /runs lists them) or the path it was served as.")
    rows: list[Any] = Field(description="Objects with the task's fields (and optionally 'id', 'lang'), or texts "
                                        "for a task of one field.")
    lang: Optional[str] = Field(None, description="The rows' language where a row names none.")


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes (declared or streamed) ends in a 413 from the
    app's own handler (one JSON line), raised when the route reads the body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        seen = int(declared) if declared.isdigit() else 0

        async def limited():
            nonlocal seen
            if seen > self.limit:
                raise BodyTooLarge()
            message = await receive()
            if not declared:
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


@dataclass
class ServedRun:
    """One served prompt: its name (the run folder's), its folder, card and ``Predictor`` (one run)."""

    name: str
    path: Path
    card: dict
    predictor: Any

    @property
    def fields(self) -> list[str]:
        return list(self.predictor.task.fields)

    def describe(self) -> dict:
        task = self.predictor.task
        return {"name": self.name, "path": str(self.path), "task": task.name, "fields": self.fields,
                "labels": self.predictor.labels, "languages": list(task.language_codes),
                "template_style": self.card.get("template_style", "agnostic"), "card": self.card}


# ---- loading -------------------------------------------------------------------------------------

def check_runs(runs: list[Path]) -> list[dict]:
    """The runs' cards (no torch imported): every folder holds a prompt, no two share a name."""
    if not runs:
        raise XPromptError("--run names no run; give one or more run folders, comma-separated")
    cards = [load_card(run) for run in runs]
    names = [Path(run).name for run in runs]
    refuse_tuned(dict(zip(names, cards)), "serve (its batches mix the runs' rows on one backbone)")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise XPromptError(f"two served runs share the folder name {twice[0]!r}; requests name runs by it, so "
                           "serve one of them (or a renamed copy)")
    return cards


def load_served(runs: list[Path], open_backbone: Callable, tasks_dir: Path | None = None, device: str = "cpu",
                batch_size: int | None = None) -> list[ServedRun]:
    """Each run's ``Predictor``; ``open_backbone(name, revision, allow_bin)`` -> (backbone, dtype, compute)
    is called once per distinct backbone, which the runs reading it share."""
    from .predict import Predictor

    runs = [Path(run) for run in runs]
    cards = check_runs(runs)
    opened: dict[tuple, tuple] = {}
    served = []
    for run, card in zip(runs, cards):
        key = (card["backbone"], card.get("backbone_revision"), bool(card.get("backbone_bin_weights")))
        if key not in opened:
            opened[key] = open_backbone(*key)
        backbone, dtype, _ = opened[key]
        predictor = Predictor.load([run], backbone, tasks_dir, dtype, device, batch_size)
        served.append(ServedRun(run.name, run, card, predictor))
    return served


# ---- the seam: scoring a batch -------------------------------------------------------------------

def score_by_run(groups: Groups) -> list[list[dict]]:
    """Score a batch: per ``(run, rows)`` group, each row's ``{"label", "probabilities"}``, in order.
    This one runs each group through its run's own model (one backbone pass per run and language); a
    mixed-prompt model that scores every group's rows in one pass is a drop-in replacement."""
    return [served.predictor.predict(rows) for served, rows in groups]


def score_mixed(groups: Groups) -> list[list[dict]]:
    """Score a batch in mixed-prompt batches: every group's rows through one pass per backbone (and
    language, where a run scores label words), each row with its own run's prompt (``predict_mixed``)."""
    from .predict import predict_mixed

    return predict_mixed([(served.predictor, rows) for served, rows in groups])


SCORE: Callable[[Groups], list[list[dict]]] = score_mixed  # the scorer the batcher calls (score_by_run: one run at a time)


# ---- requests ------------------------------------------------------------------------------------

def check_rows(served: ServedRun, rows: list, lang: str | None) -> tuple[list, list[dict]]:
    """The rows' ids (a row's own ``id``, else its position) and the rows as ``Predictor.predict`` takes
    them, or a ``RequestError`` naming the first bad row and field."""
    fields, task = served.fields, served.predictor.task
    ids, clean = [], []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if len(fields) != 1:
                raise RequestError(422, f"rows[{i}] is a text, but {task.name} reads {', '.join(fields)}: send each "
                                        "row as an object of them")
            row = {fields[0]: row}
        if not isinstance(row, dict):
            raise RequestError(422, f"rows[{i}] must be an object with {', '.join(fields)} (or a text), got "
                                    f"{type(row).__name__}")
        for name in fields:
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                problem = "missing" if value is None else "empty" if isinstance(value, str) else \
                    f"not text ({type(value).__name__})"
                raise RequestError(422, f"rows[{i}]: field '{name}' is {problem}")
        row_lang, row_id = row.get("lang") or lang or "", row.get("id", i)
        if not isinstance(row_lang, str):
            raise RequestError(422, f"rows[{i}]: 'lang' must be a language code, got {type(row_lang).__name__}")
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise RequestError(422, f"rows[{i}]: 'id' must be a string or an integer")
        ids.append(row_id)
        clean.append({**{name: row[name] for name in fields}, "lang": row_lang})
    if served.card.get("template_style") == "native":
        unknown = sorted({row["lang"] for row in clean} - set(task.languages))
        if unknown:
            raise RequestError(422, f"run {served.name} scores {task.name}'s native templates and label words: "
                                    f"'lang' {unknown[0]!r} is not one of its languages ({', '.join(task.language_codes)})")
    return ids, clean


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _validation_reason(errors: list[dict]) -> tuple[int, str]:
    """FastAPI's list of validation errors as one status and one line naming the field."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, loc = first.get("type"), [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    if kind == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse')} (at character {where})"
    if kind == "missing":
        return 422, f"missing field '{where}'" if where else "the request needs a JSON body: {\"run\": ..., \"rows\": [...]}"
    if kind == "extra_forbidden":
        return 422, f"unknown field '{where}'; the body takes run, rows and lang"
    if not where:
        return 422, "the body must be a JSON object {\"run\": ..., \"rows\": [...]} sent as application/json"
    return 422, f"field '{where}': {first.get('msg', 'invalid')}"


# ---- the app -------------------------------------------------------------------------------------

def make_app(served: list[ServedRun], max_batch: int = 64, max_wait_ms: float = 10.0, max_rows: int = 256,
             score: Callable[[Groups], list[list[dict]]] | None = None) -> FastAPI:
    """The HTTP app serving ``served``: ``POST /predict``, ``GET /runs``, ``GET /health``."""
    from .. import __version__

    runs: dict[str, ServedRun] = {}
    for one in served:
        runs[one.name] = runs[str(one.path)] = one
    batcher = Batcher(score or SCORE, max_batch, max_wait_ms / 1000)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    limit = max(1 << 20, max_rows * ROW_BYTES)
    app = FastAPI(title="xprompt", version=__version__, lifespan=lifespan,
                  description="Trained prompts of xprompt, served: POST /predict, GET /runs, GET /health.")
    app.add_middleware(BodyLimit, limit=limit)
    app.state.batcher = batcher

    def refuse(status: int, reason: str) -> JSONResponse:
        batcher.stats["rejected"] += 1 if status < 500 else 0
        return JSONResponse({"error": _one_line(reason)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return refuse(*_validation_reason(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        reason = {404: f"no such endpoint {request.url.path}; use POST /predict, GET /runs, GET /health",
                  405: f"{request.method} is not allowed on {request.url.path}",
                  413: f"the request body is over {limit} bytes (--max-rows {max_rows})"}.get(exc.status_code)
        return refuse(exc.status_code, reason or str(exc.detail))

    @app.exception_handler(RequestError)
    async def bad_request(request, exc: RequestError):
        return refuse(exc.status, str(exc))

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict:
        """Label rows with one served prompt: per row, in order, its id, label and label probabilities."""
        one = runs.get(body.run)
        if one is None:
            raise RequestError(404, f"unknown run {body.run!r}; this server serves "
                                    f"{', '.join(s.name for s in served)} (GET /runs)")
        if not body.rows:
            raise RequestError(422, "rows is empty: send at least one row")
        if len(body.rows) > max_rows:
            raise RequestError(413, f"{len(body.rows)} rows in one request; this server takes at most {max_rows} "
                                    "(--max-rows): split them")
        ids, rows = check_rows(one, body.rows, body.lang)
        results = await batcher.submit(one, rows)
        return {"run": one.name, "predictions": [{"id": i, **r} for i, r in zip(ids, results)]}

    @app.get("/runs")
    async def list_runs() -> dict:
        """The served prompts and their cards."""
        return {"runs": [one.describe() for one in served]}

    @app.get("/health")
    async def health() -> dict:
        """Liveness, the served runs and the batcher's counters."""
        return {"status": "ok", "runs": [one.name for one in served], "uptime_s": round(time.time() - started, 1),
                "batcher": {**batcher.stats, "queued_rows": batcher._queued, "max_batch": max_batch,
                            "max_wait_ms": max_wait_ms, "max_rows": max_rows}}

    return app


# ---- running it ----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` on uvicorn until interrupted (Ctrl-C or SIGTERM: in-flight requests are answered)."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C it caught
        pass


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """``app`` on uvicorn in a background thread (port 0: a free one), yielding its base URL, stopped on
    exit. For tests and notebooks; ``serve`` is the command's."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise XPromptError("the server did not start")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
