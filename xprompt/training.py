"""Training: the loop only (``fit``). Model selection uses held-out source-language rows, never
target languages; the caller hands the loop a built, initialised model and a selection scorer."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from . import distributed
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import batches, slice_batch
from .errors import XPromptError
from .fileio import append_jsonl, truncate_log, write_text
from .hardware import autocast, frozen_weights_in_bf16
from .model import PromptModel
from .start import snapshot


@dataclass
class Fit:
    """What a finished loop hands back: the best tensors (by selection accuracy), where they came
    from, and how long the loop ran."""

    best: dict  # {"step", "accuracy", "tensors"}
    steps: int
    seconds: float  # the loop's wall time, its selection passes included (step 0's not)
    seen: int
    trainable_parameters: int
    last_accuracy: float | None = None  # the selection accuracy of the last step, where this loop scored it
    select_seconds: float = 0.0  # every selection pass, step 0's included
    select_passes: int = 0
    step_seconds: float | None = None  # the training steps alone: ``seconds`` less the selection passes in it

    @property
    def examples_per_s(self) -> float:
        """Training examples per second of training steps (selection passes not counted)."""
        steps = self.step_seconds if self.step_seconds is not None else self.seconds
        return self.seen / steps if steps > 0 else 0.0


class Abort(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: stop at once, save nothing (the last checkpoint stands)."""


class Stop:
    """The SIGINT / SIGTERM a loop heard. The first only asks: the loop finishes the step under way
    (and the selection pass it is due), saves its checkpoint and raises ``KeyboardInterrupt`` there.
    A second one raises ``KeyboardInterrupt`` at once: the step under way is dropped and the run
    resumes from the checkpoint before it."""

    def __init__(self):
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise Abort
        self.requested = True

    def asked(self, world: int = 1) -> bool:
        """Whether to stop at this step boundary: every process stops at the same one."""
        if world > 1:
            return distributed.sum_ints(int(self.requested))[0] > 0
        return self.requested


@contextlib.contextmanager
def deferred_signals():
    """While the loop runs, SIGINT and SIGTERM only ask it to stop (``Stop``); the handlers before
    come back after it (signals can be handled in the main thread only: elsewhere nothing changes)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def fit(model: PromptModel, train_rows, select_accuracy, cfg: TrainConfig, run_dir: Path, device,
        pad_id: int, on_step=None, transform=None) -> Fit:
    """Train ``model`` on ``train_rows`` (encoded) for ``cfg.max_steps`` steps (or ``cfg.epochs``),
    scoring ``select_accuracy()`` every ``cfg.eval_every`` steps and keeping the best tensors.
    Writes ``log.jsonl`` and a ``checkpoint/`` (at every selection and on Ctrl-C / SIGTERM) into
    ``run_dir``; a run that has a checkpoint resumes from it: data order, optimizer, schedule, random
    state and selection record continue exactly where they stopped. A signal during a step or a
    selection pass lets it finish, then the checkpoint of that step is saved and ``KeyboardInterrupt``
    raised (``Stop``); a ``KeyboardInterrupt`` raised inside a step drops that step (the checkpoint
    before it stands), one raised inside a selection pass saves the step with its selection owed.
    ``transform(batch, step)``, if given, rewrites each batch before its step (a seeded augmentation:
    the same for a resumed run).

    Under ``torchrun`` / ``accelerate launch`` every process runs this loop: each computes the
    gradients of its share of every global batch, one all_reduce sums them (the prompt's only),
    and only rank 0 writes."""
    rank, world = distributed.rank_world()
    main = rank == 0
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    log_path = Path(run_dir) / "log.jsonl"
    if main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = (lambda record: append_jsonl(log_path, record)) if main else (lambda record: None)

    with deferred_signals() as stop:
        done = _loop(model, train_rows, select_accuracy, cfg, Path(run_dir), device, pad_id, on_step, transform,
                     optimizer, scheduler, params, total, log, log_path, main, rank, world, stop)
    if stop.requested and world == 1:  # heard after the last boundary: the last step's checkpoint is saved, stop the caller
        raise KeyboardInterrupt
    return done


def _loop(model, train_rows, select_accuracy, cfg, run_dir, device, pad_id, on_step, transform, optimizer, scheduler,
          params, total, log, log_path, main, rank, world, stop) -> Fit:
    """``fit``'s loop, with ``stop`` (``deferred_signals``) asked at every step boundary."""
    restored = load_checkpoint(run_dir, model, optimizer, scheduler)
    if restored:
        progress, best = restored
        if main:
            truncate_log(log_path, progress["step"])  # steps after the checkpoint are run again
        log({"step": progress["step"], "resumed": True})
    else:
        if main:
            log_path.unlink(missing_ok=True)  # a run restarted before its first checkpoint starts afresh
        progress = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "seconds": 0.0}
        clock = time.perf_counter()
        best = {"step": 0, "accuracy": select_accuracy(), "tensors": snapshot(model)}
        progress.update(select_seconds=time.perf_counter() - clock, select_passes=1, loop_select_seconds=0.0)
        log({"step": 0, "select_accuracy": best["accuracy"]})
    step, epoch, seen = progress["step"], progress["epoch"], progress["seen"]
    started = time.perf_counter() - progress["seconds"]
    # selection time, kept apart so that examples/s counts training steps only (older checkpoints: none)
    timing = {k: progress.get(k, 0) for k in ("select_seconds", "select_passes", "loop_select_seconds")}
    window_loss, window_n = progress.get("window_loss", 0.0), progress.get("window_n", 0)
    last_accuracy = None
    position = progress["batch"]
    # Where the loop stands, for an interruption: "clean" (the last step and its selection are done),
    # "step" (a step is under way: it is discarded, the previous checkpoint stands), "owed" (the step
    # is done, the selection it is due is not: the checkpoint says so and a resumed run selects first)
    # and "saved" (the checkpoint of an interruption is written).
    phase = "owed" if progress.get("selection_owed") else "clean"

    def save_progress() -> None:
        progress.update(step=step, epoch=epoch, batch=position, seen=seen, seconds=time.perf_counter() - started,
                        window_loss=window_loss, window_n=window_n, selection_owed=phase == "owed", **timing)
        if main:
            save_checkpoint(run_dir, model, optimizer, scheduler, progress, best)

    def select() -> None:
        nonlocal best, last_accuracy, phase
        clock = time.perf_counter()
        acc = last_accuracy = select_accuracy()
        took = time.perf_counter() - clock
        timing.update(select_seconds=timing["select_seconds"] + took, select_passes=timing["select_passes"] + 1,
                      loop_select_seconds=timing["loop_select_seconds"] + took)
        log({"step": step, "select_accuracy": acc})
        if acc > best["accuracy"]:
            best = {"step": step, "accuracy": acc, "tensors": snapshot(model)}
        phase = "clean"
        save_progress()

    def boundary() -> None:
        """Between steps: a SIGINT/SIGTERM that came during the last step stops the loop here."""
        nonlocal phase
        if stop.asked(world):
            save_progress()
            phase = "saved"
            raise KeyboardInterrupt

    try:
        with frozen_weights_in_bf16(model, cfg.dtype, device.type):  # once for the loop, not per step
            if phase == "owed":  # interrupted during the selection of this step: it comes first
                if main:
                    _drop_selection_line(log_path, step)
                select()
            boundary()
            while step < total:
                skip = progress["batch"] if epoch == progress["epoch"] else 0
                epoch_batches = batches(train_rows, cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed, epoch=epoch)
                for index, batch in enumerate(epoch_batches, 1):
                    if index <= skip:
                        continue
                    phase = "step"
                    model.train()
                    if transform is not None:
                        batch = transform(batch, step)
                    loss = accumulate_gradients(model, batch, cfg, device, rank, world)
                    loss = distributed.sum_gradients(params, loss)
                    if not torch.isfinite(loss):
                        raise XPromptError(
                            f"loss became {loss.item()} at step {step + 1}; lower --lr (now {cfg.lr}) "
                            f"or use --dtype fp32 (now {cfg.dtype.value})"
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_value = loss.item()
                    step, seen, position = step + 1, seen + len(batch["labels"]), index
                    window_loss, window_n = window_loss + loss_value, window_n + 1
                    due = step % cfg.eval_every == 0 or step == total
                    phase = "owed" if due else "clean"  # the step is done (all of it, or nothing, above)
                    rate = seen / max(1e-9, time.perf_counter() - started - timing["loop_select_seconds"])
                    if step % 20 == 0 or step == total:
                        log({"step": step, "loss": round(window_loss / window_n, 5),
                             "lr": scheduler.get_last_lr()[0], "examples_per_s": round(rate, 2)})
                        window_loss, window_n = 0.0, 0
                    if due:
                        select()
                    if on_step:
                        on_step(step, total, loss_value, rate)
                    boundary()
                    if step >= total:
                        break
                else:
                    epoch += 1
                    continue
                break
    except Abort:
        raise
    except KeyboardInterrupt:
        if phase in ("clean", "owed"):  # a completed step (its selection maybe owed); a step under way is dropped
            save_progress()
        raise
    seconds = time.perf_counter() - started
    return Fit(best=best, steps=total, seconds=seconds, seen=seen,
               trainable_parameters=sum(p.numel() for p in params),
               last_accuracy=last_accuracy if step >= total else None, select_seconds=timing["select_seconds"],
               select_passes=timing["select_passes"], step_seconds=seconds - timing["loop_select_seconds"])


def _drop_selection_line(log_path: Path, step: int) -> None:
    """The log without a ``select_accuracy`` record of ``step`` (an owed selection writes it again)."""
    if not log_path.is_file():
        return
    lines = log_path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not ('"select_accuracy"' in line and json.loads(line).get("step") == step)]
    if len(kept) != len(lines):
        write_text(log_path, "".join(line + "\n" for line in kept))


def accumulate_gradients(model: PromptModel, batch: dict, cfg: TrainConfig, device, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Backward pass over this process's rows of a global batch (every ``world``-th row), in
    ``cfg.grad_accum`` micro-batches. Each micro-batch's summed loss is divided by the global
    batch size, so the gradients add up to the gradient of the global batch's mean loss whatever
    the number of processes and micro-batches. Returns this process's share of that loss."""
    size = len(batch["labels"])
    rows = torch.arange(rank, size, world)
    total = torch.zeros((), device=device)
    for part in torch.tensor_split(rows, min(cfg.grad_accum, max(1, len(rows)))):
        if len(part) == 0:
            continue
        piece = {k: v.to(device) for k, v in slice_batch(batch, part).items()}
        with autocast(cfg.dtype, device.type):
            loss = model.loss(piece) / size
        loss.backward()
        total += loss.detach()
    model.verbalizer.end_step(distributed.sum_tensor if world > 1 else None)  # once per global batch
    return total
