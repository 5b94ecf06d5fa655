"""xprompt: zero-shot cross-lingual transfer of prompt tuning.

The Python API (each name imports torch only when called)::

    import xprompt
    model = xprompt.load("runs/my-run")                      # or several runs: an ensemble
    model.predict(["Ein toller Film!", "很差"])                # [{"label": ..., "probabilities": {...}}, ...]
    model.predict([{"premise": "...", "hypothesis": "...", "lang": "de"}])
    xprompt.evaluate("runs/my-run", langs=["de", "zh"])      # {"results": {lang: {...}}, "summary": {...}}
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load", "evaluate"]


def _backbone(card: dict, device: str, dtype: str, cache_dir):
    from pathlib import Path

    from .backbones import open_backbone
    from .store import default_cache_dir

    return open_backbone(card["backbone"], Path(cache_dir) if cache_dir else default_cache_dir(), device, dtype,
                         False, None, card.get("backbone_revision"), bool(card.get("backbone_bin_weights")))


def load(run, device: str = "cpu", dtype: str = "auto", tasks_dir=None, cache_dir=None, batch_size: int | None = None):
    """A ``Predictor`` for a run folder (or a list of them: their ensemble) on its own backbone.
    ``predict(rows)`` takes texts (single-field tasks) or dicts of the task's fields (with ``lang`` where
    the run reads native label words) and returns, per row, the label and per-label probabilities."""
    from pathlib import Path

    from .store import load_card
    from .workflows.predict import Predictor

    runs = [Path(r) for r in ([run] if isinstance(run, (str, Path)) else run)]
    backbone, resolved, _ = _backbone(load_card(runs[0]), device, dtype, cache_dir)
    return Predictor.load(runs, backbone, tasks_dir, resolved, device, batch_size)


def evaluate(run, langs, task: str | None = None, split: str = "dev", data_dir=None, limit: int | None = None,
             device: str = "cpu", dtype: str = "auto", tasks_dir=None, cache_dir=None) -> dict:
    """Score a run's prompt, unchanged, on ``langs`` of a task split (the run's own task by default), as
    ``xprompt eval`` does (predictions and metrics saved in the run). Returns results and summary."""
    from pathlib import Path

    from .store import default_cache_dir
    from .tasks import DEFAULT_TASKS_DIR, load_task
    from .workflows.evaluations import evaluate_run

    predictor = load(run, device, dtype, tasks_dir, cache_dir)
    spec = load_task(task, Path(tasks_dir or DEFAULT_TASKS_DIR)) if task else predictor.task
    spec.check_languages(list(langs), split)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    done = evaluate_run(predictor.run_dirs[0], predictor.models[0], predictor.card, predictor.backbone, spec,
                        list(langs), split, [Path(data_dir)] if data_dir else [], limit, predictor.batch_size,
                        predictor.dtype, cache / "encoded")
    return {"run": str(done.run_dir), "results": done.results, "summary": done.summary}
