"""``xprompt serve``: trained prompts as an HTTP JSON service (the app and batcher live in
``workflows.serving``; this only parses options, loads the runs and starts uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import Device, DType
from .common import CacheDir, DeviceOption, DTypeOption, TasksDir, _default_cache, _open_backbone, command, err_console

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@command("serve")
def serve_cmd(
    run: Annotated[str, typer.Option("--run", help="Run folders to serve, comma-separated (any tasks, any backbones); a request names a run by its folder name or by the path given here.")],
    host: Annotated[str, typer.Option(help="Address to listen on: loopback by default; another address makes the service reachable from other machines (no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: a free one, shown at start).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: the most rows scored together (requests for different runs merge into one batch; a request is never split).")] = 64,
    max_wait_ms: Annotated[float, typer.Option(help="Dynamic batching: how long the oldest queued request waits for others before its batch is scored.")] = 10.0,
    max_rows: Annotated[int, typer.Option(help="The most rows one request may send (more: 413).")] = 256,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per forward pass within a batch (default: 32 on a CPU, 64 on a GPU).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch CPU threads for scoring (default: torch's, one per core).")] = None,
    scorer: Annotated[str, typer.Option(help="mixed (the default: rows of every served run on one backbone share each pass, each row with its own prompt) or by-run (each run's rows in passes of their own: the reference).")] = "mixed",
    log_level: Annotated[str, typer.Option(help=f"uvicorn's log level: {', '.join(LOG_LEVELS)}.")] = "info",
    dtype: DTypeOption = DType.AUTO,
    device: DeviceOption = Device.CPU,
    tasks_dir: TasksDir = None,
    cache_dir: CacheDir = _default_cache(),
):
    """Serve trained prompts over HTTP: POST /predict {"run", "rows", "lang"} -> {"predictions": [{"id",
    "label", "probabilities"}]} in the rows' order, GET /runs (the prompts and their cards), GET /health.
    Concurrent requests, for any of the runs, are scored together in batches."""
    numbers = {"--max-batch": max_batch, "--max-rows": max_rows, "--batch-size": batch_size or 1, "--threads": threads or 1}
    small = [flag for flag, value in numbers.items() if value < 1]
    if scorer not in ("mixed", "by-run"):
        raise typer.BadParameter(f"--scorer takes mixed or by-run, got {scorer!r}")
    if small or max_wait_ms < 0 or not 0 <= port <= 65535 or log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"{small[0]} must be at least 1" if small else "--max-wait-ms must be 0 or more"
                                 if max_wait_ms < 0 else f"--port must be 0-65535, got {port}" if not 0 <= port <= 65535
                                 else f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    from ..workflows.serving import check_runs, is_loopback

    runs = [Path(x.strip()) for x in run.split(",") if x.strip()]
    check_runs(runs)  # every folder holds a prompt, no two share a name: answered before torch is imported
    if not is_loopback(host):
        err_console.print(f"warning: listening on {host}: other machines can reach this service, and it has no "
                          "authentication", highlight=False)
    import torch

    from ..workflows.serving import load_served, make_app, serve

    if threads:
        torch.set_num_threads(threads)
    served = load_served(runs, lambda name, revision, allow_bin: _open_backbone(
        name, cache_dir, device, dtype, revision=revision, allow_bin_weights=allow_bin), tasks_dir, device.value,
        batch_size)
    err_console.print(f"serving {', '.join(f'{s.name} ({s.predictor.task.name})' for s in served)} on "
                      f"{host}:{port or 'a free port'} (batches of up to {max_batch} rows, {max_wait_ms:g} ms wait; "
                      f"{torch.get_num_threads()} torch threads)", highlight=False, soft_wrap=True)
    from ..workflows.serving import score_by_run, score_mixed

    score = score_mixed if scorer == "mixed" else score_by_run
    serve(make_app(served, max_batch, max_wait_ms, max_rows, score=score), host, port, log_level)
