"""Data parallelism through ``torch.distributed``, for runs started by ``torchrun`` or ``accelerate launch``.

The backbone is frozen, so the only gradients to share are the prompt's and the verbalizer's:
after every step each process adds its partial gradients into one flat buffer and a single
``all_reduce`` sums them. Each process takes every ``world``-th row of the global batch and
scales its loss by the global batch size, so the summed gradient equals the single-process
gradient of the same global batch. Without ``WORLD_SIZE`` > 1 every function here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world size); joins the process group the launcher describes (gloo on CPU, nccl on GPU).
    Under nccl each process first takes its own GPU (``LOCAL_RANK``), so that collectives and
    object broadcasts run there rather than piling onto cuda:0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("XPROMPT_DIST_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def collective_device() -> torch.device:
    """Where tensors must be for a collective: this process's GPU under nccl (which refuses CPU
    tensors), else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(requested: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto``; under a launcher each process takes its own GPU (LOCAL_RANK)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            from .errors import XPromptError

            raise XPromptError("--device cuda: no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def sum_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Sum every process's gradients (and loss) in place with one all_reduce; returns the summed loss."""
    _, world = rank_world()
    if world == 1:
        return loss
    device = collective_device()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(device) for g in grads] + [loss.detach().reshape(1).to(device, grads[0].dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.device).clone()
        offset += n
    return flat[-1].to(loss.device)


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over the processes (``t`` itself with one process)."""
    _, world = rank_world()
    if world == 1:
        return t
    summed = t.to(collective_device(), copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(t.device)


def sum_ints(*values: int) -> list[int]:
    """Sum integers over the processes (e.g. correct predictions and rows of a split's shards)."""
    _, world = rank_world()
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def broadcast(obj):
    """Rank 0's object on every process."""
    _, world = rank_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every process's object, in rank order, on every process."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out
