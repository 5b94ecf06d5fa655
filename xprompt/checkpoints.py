"""Checkpoints: everything a resumed run needs to continue bit for bit (trainable tensors, the best
tensors so far, AdamW moments, the schedule, the data position and the random number generators'
states), written atomically."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import XPromptError
from .fileio import atomic_write, read_json, write_json
from .model import PromptModel


CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(run_dir: Path, model: PromptModel, optimizer, scheduler, progress: dict, best: dict,
                    recent: list | None = None, initial: dict | None = None) -> None:
    """Everything a resumed run needs, atomically: trainable tensors, the best tensors so far, the
    last selection points' tensors (``recent``: (step, tensors) pairs, for checkpoint averaging), the
    start's (``initial``, for a restart),
    AdamW moments and torch's generators (safetensors), and step, data position, scheduler, best
    score and Python's and numpy's generators (JSON)."""
    tensors = {f"model.{k}": v.clone() for k, v in {**model.prompt.state_tensors(), **model.verbalizer.tensors(),
                                                   **model.backbone_tensors()}.items()}  # (a tuned backbone's too)
    tensors.update({f"best.{k}": v for k, v in best["tensors"].items()})
    tensors.update({f"recent.{i}.{k}": v for i, (_, kept) in enumerate(recent or []) for k, v in kept.items()})
    tensors.update({f"initial.{k}": v for k, v in (initial or {}).items()})
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value.detach().clone().reshape(value.shape)
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    folder = Path(run_dir) / CHECKPOINT_DIR
    # The tensors go to a file named by the step and state.json, written last, points at it:
    # a crash at any moment leaves a consistent pair (the previous one or the new one).
    name = f"state-{progress['step']:08d}.safetensors"
    atomic_write(folder / name, lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / "state.json", {
        **progress,
        "tensors": name,
        "best_step": best["step"],
        "best_accuracy": best["accuracy"],
        "scheduler": scheduler.state_dict(),
        "param_groups": opt["param_groups"],
        "rng": rng_meta,
        "recent_steps": [step for step, _ in recent or []],
    })
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, model: PromptModel, optimizer, scheduler) -> tuple[dict, dict] | None:
    """Restore a checkpoint into model, optimizer and scheduler; None when the run has none. The
    returned progress holds ``recent``: the (step, tensors) pairs kept for checkpoint averaging."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "state.json").is_file():
        return None
    meta = read_json(folder / "state.json")
    path = folder / str(meta.get("tensors", ""))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise XPromptError(f"{path}: unreadable checkpoint ({e}); delete {folder} to start over") from None
    where = str(folder)
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    model.prompt.load_state_tensors(pick("model."), where)
    model.verbalizer.load_tensors(pick("model."), where)
    model.load_backbone_tensors(pick("model."), where)
    state: dict[int, dict] = {}
    for key, value in pick("optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    best = {"step": meta["best_step"], "accuracy": meta["best_accuracy"], "tensors": pick("best.")}
    meta["recent"] = [(step, pick(f"recent.{i}.")) for i, step in enumerate(meta.pop("recent_steps", []))]
    meta["initial"] = pick("initial.") or None
    if "rng" in meta:  # (a checkpoint written before the generators were kept: they stay as they are)
        set_rng_state(pick("rng."), meta["rng"])
    return meta, best


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The global random number generators: torch's (CPU, and every CUDA device once CUDA is up) as
    tensors ``rng.*``; Python's and numpy's as JSON. Training draws none of them today (no dropout
    anywhere, seeded generators of its own): kept so that anything that does resumes exactly."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": {"version": version, "state": list(words), "gauss": gauss},
                     "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                               "cached_gaussian": float(cached)}}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put back what ``rng_state`` kept (CUDA's where this process has as many devices)."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    python = meta["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = meta["numpy"]
    np.random.set_state((numpy["kind"], np.array(numpy["keys"], dtype=np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
