"""Training: the loop only (``fit``). Model selection uses held-out source-language rows, never
target languages; the caller hands the loop a built, initialised model and a selection scorer."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import batches, slice_batch
from .evaluation import selection_rows
from .errors import XPromptError
from .fileio import append_jsonl, truncate_log, write_text
from .hardware import autocast, frozen_weights_in_bf16
from .model import PromptModel
from .start import restore, snapshot


@dataclass
class Fit:
    """What a finished loop hands back: the best tensors (by selection accuracy), where from, how long it ran."""

    best: dict  # {"step", "accuracy", "tensors"}
    steps: int
    seconds: float  # the loop's wall time, its selection passes included (step 0's not)
    seen: int
    trainable_parameters: int
    last_accuracy: float | None = None  # the selection accuracy of the last step, where this loop scored it
    average: dict | None = None  # with --average-checkpoints: the steps averaged and the best single checkpoint
    restarts: list | None = None  # the safety net's restarts: when, why, the rates before and after
    select_seconds: float = 0.0  # every selection pass, step 0's included
    select_passes: int = 0
    step_seconds: float | None = None  # the training steps alone: ``seconds`` less the selection passes in it


class Restart(Exception):
    """The safety net fired: the English held-out accuracy had not left the majority-class level.
    ``record`` is what the run records; ``restarts`` the earlier ones, ``initial`` the start's tensors."""

    def __init__(self, record: dict, restarts: list, initial: dict):
        super().__init__(record["why"])
        self.record, self.restarts, self.initial = record, restarts, initial


ROLLBACK = "rolled_back_to"  # a restart record with this key is a roll-back to that step (a collapse after learning)
RESTART_MARGIN = 0.02  # within 2 points of the majority class: not learning
MAX_RESTARTS = 2
RESTART_LR_FACTOR = 1 / 3


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
        pad_id: int, on_step=None, transform=None, majority: float | None = None) -> Fit:
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

    The safety net (``cfg.restart_check``, with ``majority``: the majority class's share of the held-out
    rows): at the first selection point past that share of the steps, a held-out accuracy within
    ``RESTART_MARGIN`` of ``majority`` restarts the loop from the start's tensors with a fresh optimizer
    at a third of the rate (at most ``MAX_RESTARTS`` times). The failed attempt's log is kept as
    ``log.restart-N.jsonl``; the restarts go into the log, the checkpoint and the result. A run that had
    left that level and falls back to it at a later selection point (a collapse after learning) rolls back
    instead: its best tensors, cleared optimizer moments, a third of the rate from there on (at most
    ``MAX_RESTARTS`` times; recorded beside the restarts with ``rolled_back_to``).

    Under ``torchrun`` / ``accelerate launch`` every process runs this loop: each computes the
    gradients of its share of every global batch, one all_reduce sums them (the prompt's only),
    and only rank 0 writes."""
    rank, world = distributed.rank_world()
    main = rank == 0
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    params = model.trainable_parameters()
    log_path = Path(run_dir) / "log.jsonl"
    if main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = (lambda record: append_jsonl(log_path, record)) if main else (lambda record: None)
    check = None
    if cfg.restart_check > 0 and majority is not None:
        check = (max(1, math.ceil(cfg.restart_check * total)), majority + RESTART_MARGIN)
    lr, restarts, initial = cfg.lr, [], None
    from transformers import get_linear_schedule_with_warmup  # here, not at the top: its module imports PEFT

    with deferred_signals() as stop:
        while True:
            optimizer = adamw(model, lr, cfg.weight_decay)
            scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
            try:
                done = _loop(model, train_rows, select_accuracy, cfg, Path(run_dir), device, pad_id, on_step, transform,
                             optimizer, scheduler, params, total, log, log_path, main, rank, world, stop,
                             check, restarts, initial, lr)
                break
            except Restart as restart:
                restarts, initial, lr = [*restart.restarts, restart.record], restart.initial, restart.record["new_lr"]
                model.prompt.load_state_tensors(initial, "the run's start")
                model.verbalizer.load_tensors(initial, "the run's start")
                if model.tuning is not None:  # a tuned backbone goes back to its start too
                    model.tuning.reset()
                if main:  # the failed attempt's log is kept beside; the new one starts with the restart
                    log_path.replace(log_path.with_name(f"log.restart-{len(restarts)}.jsonl"))
                    shutil.rmtree(Path(run_dir) / "checkpoint", ignore_errors=True)
                log({"step": 0, "restart": restart.record})
    if stop.requested and world == 1:  # heard after the last boundary: the last step's checkpoint is saved, stop the caller
        raise KeyboardInterrupt
    return done


def adamw(model: PromptModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The run's AdamW. A run that tunes backbone weights takes torch's fused kernel (one pass over the
    parameters instead of a dozen: measured 16x less optimizer time for e5-small's 117M parameters on one
    thread of an AVX512_BF16 EPYC; the same update up to rounding); a prompt run keeps the single-tensor kernel, so the default's
    figures stay bit-identical."""
    fused = model.tuning is not None or None
    return torch.optim.AdamW(model.param_groups(lr), lr=lr, weight_decay=weight_decay, fused=fused)


def _loop(model, train_rows, select_accuracy, cfg, run_dir, device, pad_id, on_step, transform, optimizer, scheduler,
          params, total, log, log_path, main, rank, world, stop, check, restarts, initial, lr) -> Fit:
    """``fit``'s loop, with ``stop`` (``deferred_signals``) asked at every step boundary and the
    safety net's ``check`` (step, accuracy floor) at the first selection point past its step."""
    restored = load_checkpoint(run_dir, model, optimizer, scheduler)
    recent: list = []  # (step, tensors) of the last cfg.average_checkpoints selection points
    if restored:
        progress, best = restored
        recent = progress.pop("recent", [])
        initial = progress.pop("initial", None) or initial
        if main:
            truncate_log(log_path, progress["step"])  # steps after the checkpoint are run again
        log({"step": progress["step"], "resumed": True})
    else:
        if main and not restarts:
            log_path.unlink(missing_ok=True)  # a run restarted before its first checkpoint starts afresh
        progress = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "seconds": 0.0, "restarts": restarts, "lr": lr}
        initial = {k: v.clone() for k, v in {**model.prompt.state_tensors(), **model.verbalizer.tensors()}.items()}
        clock = time.perf_counter()
        best = {"step": 0, "accuracy": select_accuracy(), "tensors": snapshot(model)}
        progress.update(select_seconds=time.perf_counter() - clock, select_passes=1, loop_select_seconds=0.0)
        log({"step": 0, "select_accuracy": best["accuracy"], **selection_rows(select_accuracy)})
    step, epoch, seen = progress["step"], progress["epoch"], progress["seen"]
    started = time.perf_counter() - progress["seconds"]
    # selection time, kept apart so that examples/s counts training steps only (older checkpoints: none)
    timing = {k: progress.get(k, 0) for k in ("select_seconds", "select_passes", "loop_select_seconds")}
    window_loss, window_n = progress.get("window_loss", 0.0), progress.get("window_n", 0)
    grad_norms: list = []  # this log window's gradient norms (a diagnostic only)
    last_accuracy = None
    restarts, lr, checked = progress.get("restarts", []), progress.get("lr", lr), progress.get("checked", False)
    position = progress["batch"]
    # Where the loop stands, for an interruption: "clean" (the last step and its selection are done),
    # "step" (a step is under way: it is discarded, the previous checkpoint stands), "owed" (the step
    # is done, the selection it is due is not: the checkpoint says so and a resumed run selects first)
    # and "saved" (the checkpoint of an interruption is written).
    phase = "owed" if progress.get("selection_owed") else "clean"

    def save_progress() -> None:
        progress.update(step=step, epoch=epoch, batch=position, seen=seen, seconds=time.perf_counter() - started,
                        window_loss=window_loss, window_n=window_n, selection_owed=phase == "owed", checked=checked,
                        restarts=restarts, lr=lr, **timing)
        if main:
            save_checkpoint(run_dir, model, optimizer, scheduler, progress, best, recent, initial)

    def select() -> None:
        nonlocal best, last_accuracy, phase, recent, checked, restarts, lr
        clock = time.perf_counter()
        acc = last_accuracy = select_accuracy()
        took = time.perf_counter() - clock
        timing.update(select_seconds=timing["select_seconds"] + took, select_passes=timing["select_passes"] + 1,
                      loop_select_seconds=timing["loop_select_seconds"] + took)
        log({"step": step, "select_accuracy": acc, **selection_rows(select_accuracy)})
        collapsed = check is not None and step >= check[0] and acc <= check[1]
        learned = best["step"] > 0 and best["accuracy"] > check[1] if check is not None else False
        if collapsed and learned and sum(ROLLBACK in r for r in restarts) < MAX_RESTARTS:
            # training had lifted it above the majority class and it fell back (a collapse): to its best tensors
            why = (f"English held-out accuracy {acc:.3f} at step {step} fell back to within {RESTART_MARGIN:.2f} of "
                   f"the majority class ({check[1] - RESTART_MARGIN:.3f}) after {best['accuracy']:.3f} at step {best['step']}")
            record = {"step": step, ROLLBACK: best["step"], "select_accuracy": acc, "lr": lr,
                      "new_lr": lr * RESTART_LR_FACTOR, "why": why}
            roll_back(model, optimizer, scheduler, best["tensors"], RESTART_LR_FACTOR)
            restarts, lr, recent, checked = [*restarts, record], record["new_lr"], [], True
            log({"step": step, "rollback": record})
        elif (check is not None and not checked and step >= check[0]
              and sum(ROLLBACK not in r for r in restarts) < MAX_RESTARTS):
            checked = True
            if acc <= check[1]:
                why = (f"English held-out accuracy {acc:.3f} at step {step} is within {RESTART_MARGIN:.2f} of the "
                       f"majority class ({check[1] - RESTART_MARGIN:.3f})")
                raise Restart({"step": step, "why": why, "select_accuracy": acc, "lr": lr,
                               "new_lr": lr * RESTART_LR_FACTOR}, restarts, initial)
        if acc > best["accuracy"]:
            best = {"step": step, "accuracy": acc, "tensors": snapshot(model)}
        if cfg.average_checkpoints > 0:
            recent = [*recent, (step, snapshot(model))][-cfg.average_checkpoints:]
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
                    grad_norms.append(clipped(params, cfg.max_grad_norm))
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
                             "lr": scheduler.get_last_lr()[0], "examples_per_s": round(rate, 2),
                             **trajectory(model, grad_norms)})
                        window_loss, window_n, grad_norms = 0.0, 0, []
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
    average = None
    if recent and step >= total:
        best, average = averaged(model, recent, best, select_accuracy, log, step, keep=cfg.average_keep)
    return Fit(best=best, steps=total, seconds=seconds, seen=seen, trainable_parameters=sum(p.numel() for p in params),
               last_accuracy=last_accuracy if step >= total else None, average=average, restarts=restarts or None,
               select_seconds=timing["select_seconds"], select_passes=timing["select_passes"],
               step_seconds=seconds - timing["loop_select_seconds"])


def averaged(model: PromptModel, recent: list, best: dict, select_accuracy, log, step: int,
             keep: str = "average") -> tuple[dict, dict]:
    """Checkpoint averaging (Schmidt et al. 2023): the element-wise mean of the tensors kept at the
    last selection points, scored on the same held-out source rows. With ``keep="average"`` it becomes
    the loop's result; with ``keep="best"`` it is only scored and recorded (a measurement beside an
    unchanged run). The best single checkpoint's step and accuracy are returned beside it."""
    mean = {name: torch.stack([kept[name].float() for _, kept in recent]).mean(0).to(tensor.dtype)
            for name, tensor in recent[-1][1].items()}
    restore(model, mean)
    accuracy = select_accuracy()
    log({"step": step, "average_of_steps": [s for s, _ in recent], "select_accuracy_average": accuracy,
         **selection_rows(select_accuracy, "select_rows_average")})
    note = {"steps": [s for s, _ in recent], "select_accuracy": round(accuracy, 4), "kept": keep,
            "best_single": {"step": best["step"], "select_accuracy": round(best["accuracy"], 4)}}
    if keep == "best":
        restore(model, best["tensors"])
        return best, note
    return {"step": step, "accuracy": accuracy, "tensors": snapshot(model)}, note


def roll_back(model: PromptModel, optimizer, scheduler, tensors: dict, factor: float) -> None:
    """The safety net's answer to a collapse after learning: the best tensors back (the saved ones: a
    reparameterised prompt, ptuning's encoder or a prefix projection, gets the best step's vectors with its
    network restarted, as a loaded prompt does), the optimizer's moments cleared and the schedule's rate
    (now and to come) times ``factor``. All of it lives in the optimizer's
    and scheduler's state, so a checkpoint written after it resumes it exactly."""
    restore(model, tensors)
    optimizer.state.clear()
    scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor


def clipped(params, max_norm: float) -> float:
    """The gradients' total L2 norm before clipping; with ``max_norm`` > 0 they are scaled down to it
    where they exceed it (``torch.nn.utils.clip_grad_norm_``; a norm below it leaves them untouched)."""
    grads = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return _norm([p.grad for p in grads])


def _norm(tensors) -> float:
    """The L2 norm of several tensors taken together (0 for none)."""
    norms = [t.detach().float().norm() for t in tensors if t is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def trajectory(model: PromptModel, grad_norms: list) -> dict:
    """What a step record carries to diagnose a collapsing run (issue 31): the window's mean and
    largest gradient norm, the prompt's norm, the label vectors' norm and, for a centered verbalizer,
    its centre's norm and the label vectors' mean distance from it."""
    verbal = model.verbalizer.tensors()
    out = {"grad_norm": round(sum(grad_norms) / len(grad_norms), 5) if grad_norms else None,
           "grad_norm_max": round(max(grad_norms), 5) if grad_norms else None,
           "prompt_norm": round(_norm(model.prompt.state_tensors().values()), 4),
           "label_norm": round(_norm([v for k, v in verbal.items() if not k.endswith("center")]), 4)}
    center = verbal.get("verbalizer.center")
    weight = verbal.get("verbalizer.weight")
    if center is not None and weight is not None:
        out["center_norm"] = round(float(center.float().norm()), 4)
        out["label_spread"] = round(float((weight.float() - center.float()).norm(dim=-1).mean()), 4)
    return out


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
