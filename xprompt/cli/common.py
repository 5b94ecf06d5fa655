"""What every command shares: the typer apps, the consoles, the option types (help texts from
TrainConfig), the error-to-one-line decorator, backbone opening and table rendering."""

from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..config import METHODS, Device, DType, TrainConfig
from ..errors import XPromptError

ENCODED = "encoded"  # subfolder of --cache-dir holding tokenised splits (Arrow)
HELP_FLAGS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Zero-shot cross-lingual prompt tuning.",
                  context_settings=HELP_FLAGS)
library_app = typer.Typer(no_args_is_help=True, help="The library of trained prompts (the run folders): compare them.",
                          context_settings=HELP_FLAGS)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}
Method = Enum("Method", {name: name for name in METHODS}, type=str)  # --method's choices (no torch import)


def _default_cache() -> Path:
    from ..store import default_cache_dir

    return default_cache_dir()


def opt(name: str, *flags: str):
    """An option whose help is TrainConfig's for the field ``name``."""
    return typer.Option(*flags, help=TrainConfig.help(name))


RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder holding run directories.")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Data root laid out as <task>/<split>.<lang>.jsonl[.gz]; searched before the bundled copy.")]
TasksDir = Annotated[Optional[Path], typer.Option("--tasks-dir", help="Folder of task cards (default: the bundled tasks/).")]
TrustRemote = Annotated[bool, typer.Option(help="Let a hub backbone run its own Python code (off unless you ask).")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Where the converted embedded backbone and the tokenised splits are cached.")]
Revision = Annotated[Optional[str], opt("revision")]
AllowBin = Annotated[bool, opt("allow_bin_weights", "--allow-bin-weights")]
DTypeOption = Annotated[DType, opt("dtype")]
DeviceOption = Annotated[Device, typer.Option(help="cpu, cuda or auto (under torchrun each process takes GPU LOCAL_RANK).")]
DeviceMap = Annotated[Optional[str], typer.Option(help="'auto': spread a backbone too large for one device over the GPUs (accelerate's device_map); the prompt sits with the input embeddings. Not with torchrun.")]
IncludeAdapted = Annotated[bool, typer.Option("--include-adapted", help="Let adapted runs in (few-shot-target: trained on target-language rows; left out by default).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def command(name: str | None = None, group: typer.Typer | None = None):
    """Register a command (on ``group``, default the top level) whose domain errors print one red
    line and exit 1, and whose Ctrl-C prints one line and exits 130 (tracebacks with --debug)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            collecting, frozen = gc.isenabled(), gc.get_freeze_count()
            _state["freeze"] = frozen == 0  # a caller's own frozen objects stay as they are (and frozen)
            gc.disable()  # start-up (see startup_over); a command without a backbone runs so to its end
            try:
                return fn(*args, **kwargs)
            except XPromptError as e:
                if _state["debug"]:
                    raise
                err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:  # Ctrl-C outside a training step (loading, tokenising, scoring)
                if _state["debug"]:
                    raise
                err_console.print("interrupted; nothing was left half-written", highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
            finally:  # the collector as the caller had it (an in-process caller: tests, the Python API)
                if _state.pop("freeze", False) and gc.get_freeze_count():
                    gc.unfreeze()
                gc.enable() if collecting else gc.disable()

        return (group or app).command(name)(wrapper)

    return decorate


def _load_task(name: str, tasks_dir: Optional[Path]):
    from ..tasks import DEFAULT_TASKS_DIR, load_task

    return load_task(name, tasks_dir or DEFAULT_TASKS_DIR)


def _data_dirs(data_dir: Optional[Path]) -> list[Path]:
    if data_dir is None:
        return []
    if not data_dir.is_dir():
        raise XPromptError(f"--data-dir {data_dir} is not a folder")
    return [data_dir]


def _numbers(text: Optional[str], kind, flag: str) -> Optional[list]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()] if text else None
    except ValueError:
        raise typer.BadParameter(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None


def startup_over() -> None:
    """Start-up is over: collect garbage again. Imports and loading a backbone make millions of
    objects and almost no garbage, and with the collector on they took a second longer here
    (torch, datasets and transformers' BERT: 3.4 s against 2.5 s; scripts/startup.py);
    so ``command`` turns it off and the first backbone loaded turns it back on, with what start-up
    made set aside (``gc.freeze``) so that later collections need not walk it (until the command ends;
    not when the caller had frozen objects of its own, which ``command`` leaves as they were)."""
    if _state.get("freeze"):
        gc.freeze()
    gc.enable()


def _open_backbone(name: str, cache_dir: Path, device: Device | str = Device.CPU, dtype: DType = DType.AUTO,
                   trust_remote_code: bool = False, device_map: Optional[str] = None, revision: Optional[str] = None,
                   allow_bin_weights: bool = False, quiet: bool = False):
    """``backbones.open_backbone`` for a command; prints the dtype ``auto`` settled on, and why, once."""
    import datasets

    from .. import distributed
    from ..backbones import DEVICE_MAPS, open_backbone

    datasets.disable_progress_bars()  # every command that runs a model passes here

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise typer.BadParameter(f"--device-map must be {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    import time

    started = time.perf_counter()
    with err_console.status(f"loading backbone {name}"):
        bb, dtype, compute = open_backbone(name, cache_dir, Device(device).value, dtype, trust_remote_code, device_map,
                                           revision, allow_bin_weights)
    startup_over()
    if not quiet and distributed.rank_world()[0] == 0:
        err_console.print(f"loaded backbone {name} ({sum(p.numel() for p in bb.model.parameters()) / 1e6:.0f}M "
                          f"parameters, frozen) in {time.perf_counter() - started:.1f}s", highlight=False)
        err_console.print(f"compute: {dtype.value} on {compute['where']} ({compute['reason']})", highlight=False)
    return bb, dtype, compute


def _table(title: str, columns: list[str], rows: list[list], right: tuple = ()) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


@contextmanager
def _progress_bar(run_dir, cfg, world):
    """A run's header line and its progress bar (the workflow reports each step to ``_on_step``)."""
    from rich.markup import escape

    shape = f"prompt {escape(repr(cfg.prompt_text))}" if cfg.prompt_text else f"prompt x{cfg.prompt_length}"
    console.print(f"run [bold]{run_dir}[/bold]: {cfg.task}/{cfg.lang}, {cfg.method} {shape}, "
                  f"seed {cfg.seed}, {cfg.backbone}" + (f", {world} processes" if world > 1 else ""))
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        bar = progress.add_task("train", total=None, info="", visible=False)

        def step(step, total, loss, rate):
            progress.update(bar, completed=step, total=total, info=f"loss {loss:.3f} | {rate:.1f} ex/s", visible=True)

        _state["step"], _state["phase"] = step, _phase_in(progress)
        try:
            yield
        finally:
            _state.pop("step", None)
            _state.pop("phase", None)


def _phase_in(progress):
    """Phases (``xprompt.phases``) as bars of ``progress`` and, when each ends, a line with its time."""

    @contextmanager
    def phase(description, total=None):
        import time

        task = progress.add_task(description, total=total, info="")
        started = time.perf_counter()
        yield lambda rows=1: progress.advance(task, rows)
        progress.remove_task(task)
        progress.console.print(f"  {description}: {time.perf_counter() - started:.1f}s", highlight=False)

    return phase


@contextmanager
def _phases_on(console_):
    """Phases shown on ``console_`` (a command without a run's progress bar: eval, predict)."""
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console_,
                  transient=True) as progress:
        yield _phase_in(progress)


def roomy_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """glibc's allocator: blocks up to 32 MB from the heap, and freed memory kept for reuse up to
    512 MB (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would set them).
    By default each activation tensor over 128 KB is a fresh ``mmap`` whose pages fault in again at
    every batch; the threshold adapts upwards only after a large block is freed, which a run that
    read the tokenizer did by chance and one that did not (cached rows) did not: eval loops 4.0-4.3 s
    against 3.1-3.4 s for 1,000 XNLI-de pairs here. Both together or neither: either alone was slower.
    The memory kept is the price: up to 512 MB freed but not handed back (a long ``serve`` holds its
    peak). Nothing is set, and False returned, where the user set any ``MALLOC_*`` variable (theirs
    rule) or the C library has no ``mallopt`` (not glibc)."""
    import ctypes
    import os

    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))  # M_MMAP_, M_TRIM_
    except (OSError, AttributeError):
        return False


def run() -> None:
    """The CLI as its own process (``xprompt``, ``python -m xprompt``): glibc's allocator set for
    tensors (``roomy_malloc``) first, and on the way out the heap frozen, so that the interpreter
    does not collect the module graph at exit (a second of every command here)."""
    roomy_malloc()
    try:
        app()
    finally:
        gc.freeze()
