"""The dynamic batcher of ``xprompt serve``: one worker that merges queued requests, for any of the
served prompts, into batches of at most ``max_batch`` rows (or what arrived within ``max_wait`` of the
oldest) and scores each batch in one thread through a scorer: ``(run, rows)`` groups in, per group the
per-row results out. A batch that fails is retried request by request, so only the bad one fails."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import XPromptError

Groups = list[tuple[Any, list[dict]]]  # (a served run, its rows)


class RequestError(Exception):
    """A bad request: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass
class _Job:
    run: Any  # serving.ServedRun: its .name keys the groups
    rows: list[dict]
    future: asyncio.Future
    arrived: float


@dataclass
class Batcher:
    """One worker that takes queued requests in arrival order, whole, until ``max_batch`` rows are
    queued or the oldest has waited ``max_wait`` seconds, and scores them together in one thread (the
    event loop keeps answering meanwhile). A request larger than ``max_batch`` makes a batch alone."""

    score: Callable[[Groups], list[list[dict]]]
    max_batch: int = 64
    max_wait: float = 0.01
    stats: dict = field(default_factory=lambda: {"requests": 0, "rows": 0, "batches": 0, "mixed_batches": 0,
                                                 "most_runs_in_a_batch": 0, "largest_batch": 0, "rejected": 0,
                                                 "failed": 0})
    _pending: deque = field(default_factory=deque)
    _queued: int = 0

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="xprompt-score")
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RequestError(503, "the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, run: Any, rows: list[dict]) -> list[dict]:
        loop = asyncio.get_running_loop()
        job = _Job(run, rows, loop.create_future(), loop.time())
        self._pending.append(job)
        self._queued += len(rows)
        self._wake.set()
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._pending[0].arrived + self.max_wait
            while self._queued < self.max_batch and deadline > loop.time():
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except (asyncio.TimeoutError, TimeoutError):
                    break
            await self._score(self._take())

    def _take(self) -> list[_Job]:
        batch = [self._pending.popleft()]
        size = len(batch[0].rows)
        while self._pending and size + len(self._pending[0].rows) <= self.max_batch:
            batch.append(self._pending.popleft())
            size += len(batch[-1].rows)
        self._queued -= size
        return batch

    async def _score(self, batch: list[_Job]) -> None:
        groups: dict[str, tuple[Any, list[dict]]] = {}
        spans = []  # per job: its run's group and the slice of that group's rows it owns
        for job in batch:
            rows = groups.setdefault(job.run.name, (job.run, []))[1]
            spans.append((job.run.name, len(rows), len(rows) + len(job.rows)))
            rows.extend(job.rows)
        names = list(groups)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.score, [groups[name] for name in names])
        except asyncio.CancelledError:  # shutting down mid-batch: answer, then stop
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(RequestError(503, "the server is shutting down"))
            raise
        except Exception as e:  # noqa: BLE001 - isolate the request that failed, answer the others
            if len(batch) > 1:
                for job in batch:
                    await self._score([job])
                return
            self.stats["failed"] += 1
            error = RequestError(422, str(e)) if isinstance(e, XPromptError) else \
                RequestError(500, f"scoring failed: {type(e).__name__}: {e}")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        by_name = dict(zip(names, results))
        for job, (name, start, end) in zip(batch, spans):
            if not job.future.done():  # a client that went away leaves a cancelled future
                job.future.set_result(by_name[name][start:end])
        size = sum(len(job.rows) for job in batch)
        self.stats.update(requests=self.stats["requests"] + len(batch), rows=self.stats["rows"] + size,
                          batches=self.stats["batches"] + 1,
                          mixed_batches=self.stats["mixed_batches"] + (len(names) > 1),
                          most_runs_in_a_batch=max(self.stats["most_runs_in_a_batch"], len(names)),
                          largest_batch=max(self.stats["largest_batch"], size))
