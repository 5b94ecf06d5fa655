"""The checkpoint average of a finished run, as a run of its own (issue 31: checkpoint averaging on targets).

A run trained with ``--average-checkpoints N --average-keep best`` keeps its best checkpoint and only scores
the mean of its last N selection points on the English held-out rows; its ``checkpoint/`` still holds the
tensors of those points. This script writes a sibling run folder whose prompt is their element-wise mean,
computed as training computes it (``--average-keep average`` would have kept exactly these tensors), so that
``xprompt eval`` can score the average on the dev sets beside the best checkpoint: a report, not a choice
(the default changes only on English held-out rows; scripts/selection_crossfit.py).

    python scripts/average_of_run.py /work/runs_sel/pawsx-sel-s42 /work/runs_avg/pawsx-sel-s42
    xprompt eval --run pawsx-sel-s42 --runs-dir /work/runs_avg --task pawsx --langs all
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def average_tensors(run: Path) -> tuple[dict, list[int]]:
    """The mean of the checkpoint's ``recent`` tensors (float mean, cast back to each tensor's dtype, as
    ``training.averaged`` does) and the steps averaged."""
    import torch
    from safetensors.torch import load_file

    from xprompt.errors import XPromptError
    from xprompt.fileio import read_json

    state = run / "checkpoint" / "state.json"
    if not state.is_file():
        raise XPromptError(f"{state} missing: the run kept no checkpoint to average")
    meta = read_json(state)
    steps = meta.get("recent_steps") or []
    if not steps:
        raise XPromptError(f"{state}: no selection points kept; train with --average-checkpoints N")
    tensors = load_file(str(run / "checkpoint" / meta["tensors"]))
    names = {k.split(".", 2)[2] for k in tensors if k.startswith("recent.0.")}
    mean = {name: torch.stack([tensors[f"recent.{i}.{name}"].float() for i in range(len(steps))]).mean(0)
            .to(tensors[f"recent.0.{name}"].dtype) for name in names}
    return mean, steps


def main(argv=None) -> None:
    from xprompt.errors import XPromptError
    from xprompt.fileio import read_json, write_json
    from xprompt.store import load_prompt, save_prompt

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run trained with --average-checkpoints N")
    parser.add_argument("out", type=Path, help="the new run folder (its name is the run's name for xprompt eval)")
    args = parser.parse_args(argv)
    try:
        saved, card = load_prompt(args.run)
        mean, steps = average_tensors(args.run)
        missing = sorted(set(saved) - set(mean))
        if missing:
            raise XPromptError(f"{args.run}: the checkpoint's kept points lack {', '.join(missing[:3])}")
        if args.out.exists():
            raise XPromptError(f"{args.out} exists; choose a new folder")
        # the run's own scores (metrics' eval, predictions) are the best checkpoint's: they stay behind
        shutil.copytree(args.run, args.out, ignore=shutil.ignore_patterns("checkpoint", "prompt", "predictions"))
        card = {**card, "checkpoint_average": {"steps": steps, "from": str(args.run)}}
        save_prompt(args.out, {name: mean[name] for name in saved}, card)
        metrics = read_json(args.out / "metrics.json")
        metrics.pop("eval", None)
        metrics["train"]["kept"] = f"mean of steps {steps} (scripts/average_of_run.py)"
        write_json(args.out / "metrics.json", metrics)
    except XPromptError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: the mean of steps {steps} of {args.run}")


if __name__ == "__main__":
    main()
