"""The compute dtype the hardware runs natively: ``--dtype auto`` picks bf16 only where it is fast.

On CPUs without AVX512_BF16 or AMX, bf16 matrix products are emulated: measured on an AVX2-only
AMD EPYC, a 512x384x1536 matmul ran at 43.9 GFLOP/s in fp32 and 1.2 in bf16. On those machines
``auto`` means fp32. The reason is recorded with every run (``config.json`` ``compute``).
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch

from .config import DType

# torch's own CPU capability levels below which no bf16 unit is used (ATEN_CPU_CAPABILITY can
# lower the level a process runs at, e.g. to imitate an AVX2 machine)
_NO_BF16_LEVELS = ("DEFAULT", "NO AVX", "AVX", "AVX2")


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()``: DEFAULT, AVX2, AVX512, SVE256 ..."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matrix products natively, and what that answer rests on."""
    level = cpu_capability()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        units = [name.upper() for name in ("avx512_bf16", "amx_tile") if _cpu_flag(name)]
        if not units:
            return False, f"CPU without AVX512_BF16 or AMX (torch capability {level}): bf16 would be emulated"
        if level in _NO_BF16_LEVELS:
            return False, f"CPU has {'+'.join(units)} but torch runs at capability {level}: bf16 would be emulated"
        return True, f"CPU with native bf16 ({'+'.join(units)}; torch capability {level})"
    try:  # Arm and others: oneDNN's own test for bf16 hardware
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    what = "native bf16" if native else "no native bf16"
    return native, f"{machine} CPU with {what} (oneDNN; torch capability {level})"


def resolve_dtype(requested: DType | str, device: str | torch.device = "cpu") -> tuple[DType, str]:
    """``auto`` -> bf16 where ``device`` runs it natively (CUDA GPUs that support bf16, CPUs with
    AVX512_BF16 or AMX), else fp32; an explicit dtype is kept. Returns (dtype, reason)."""
    requested = DType(requested)
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if requested is not DType.AUTO:
        return requested, f"{requested.value} as asked (--dtype {requested.value})"
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DType.BF16, f"GPU {torch.cuda.get_device_name()} supports bf16"
        return DType.FP32, "GPU without bf16 support"
    native, reason = cpu_bf16()
    return (DType.BF16 if native else DType.FP32), reason


def eval_batch_size(device: str | torch.device = "cpu") -> int:
    """Rows per forward pass when nothing is trained: 32 on a CPU, 64 on an accelerator. On a CPU a
    batch of XNLI-length rows (about 1,300 tokens) keeps the matrix products and attention scores in
    cache; with the fused layers (``fused``) 32 beat 16 and 64 (in one process, 900 XNLI dev pairs,
    2 threads, native-bf16 AVX512_BF16 EPYC: bf16 150/163/162 pairs/s at 16/32/64, fp32 89/93/91)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return 32 if kind == "cpu" else 64


def describe(device: str | torch.device = "cpu") -> dict:
    """What a run records about the machine it computed on."""
    native, reason = cpu_bf16()
    info = {"cpu_capability": cpu_capability(), "cpu_bf16_native": native, "cpu_bf16_reason": reason,
            "machine": platform.machine()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def autocast(dtype: DType | str, device: str = "cpu"):
    """bf16 autocast on ``device`` for ``bf16`` (and for ``auto`` where bf16 is native), else nothing."""
    if resolve_dtype(dtype, device)[0] is DType.BF16:
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_weights_in_bf16(model: torch.nn.Module, dtype: DType | str, device: str = "cpu"):
    """Under CPU bf16 autocast, hold the frozen ``nn.Linear`` weights and biases in bf16 for the
    duration: autocast casts every fp32 weight to bf16 at every call (it caches casts only for
    weights that require grad), which was a tenth of an evaluation. The products are bit for bit
    the same; weights shared with an embedding table stay (a lookup is not autocast), and so does
    everything on a GPU, where weights load in the compute dtype already. Restored on exit."""
    if device != "cpu" or resolve_dtype(dtype, device)[0] is not DType.BF16:
        yield
        return
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    held = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in (module.weight, module.bias):
                if p is not None and not p.requires_grad and p.dtype == torch.float32 and id(p) not in tables:
                    held.append((p, p.data))
                    p.data = p.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for p, data in held:
            p.data = data


@contextlib.contextmanager
def compute(model: torch.nn.Module, dtype: DType | str, device: str = "cpu", int8: bool = False):
    """Forward passes in the compute dtype: ``autocast`` plus frozen weights held in bf16 on CPU,
    and (gradients off, on CPU) BERT-family layers on the fused inference forward (``fused``).
    ``int8`` (opt-in, nothing trained: ``eval --int8``, ``predict --int8``) computes the frozen
    layers' matrix products on int8 weights and everything else in fp32 (``dtype`` is then ignored)."""
    from .fused import fused_layers

    if int8:
        dtype = DType.FP32
    # float32 packs for oneDNN at capability AVX512 and AVX2, where its kernels beat MKL's sgemm at
    # an encoder layer's shapes (native-bf16 EPYC: 2.19x at AVX512, 1.14x at imitated AVX2 with MKL held
    # to AVX2 too; scripts/pack_rule.py, docs/pack_rule.json); elsewhere F.linear
    pack_float32 = cpu_capability().startswith(("AVX512", "AVX2"))
    with (frozen_weights_in_bf16(model, dtype, device), autocast(dtype, device),
          fused_layers(model, device, pack_float32, int8)):
        yield
