"""Build a source prompt library on the embedded backbone: one prompt per source task we hold
data for, trained through the CLI a user runs and registered in the runs folder's index.

    python scripts/build_library.py --runs-dir runs/library --max-steps 200

Sources: the MNLI pool (XNLI's English train), PAWS-Wiki (PAWS-X's English train), OCNLI,
ChnSentiCorp and the FewCLUE tasks (AFQMC has no training split here). A finished source is skipped, an interrupted one
resumed, so the script can be run again after a stop. Every run is named ``<task>-<lang>-lib``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

# AFQMC ships no training split here (dev only), so it is a transfer target, not a source
SOURCES = ["xnli:en", "pawsx:en", "ocnli:zh", "chnsenticorp:zh", "bustm:zh", "csl:zh", "eprstmt:zh", "tnews:zh",
           "iflytek:zh"]
XPROMPT = [sys.executable, "-m", "xprompt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/library"))
    parser.add_argument("--sources", default=",".join(SOURCES), help="task:lang pairs, comma-separated")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    args, extra = parser.parse_known_args()  # anything else goes to `xprompt train` (e.g. --method soft)
    for source in args.sources.split(","):
        task, lang = source.split(":")
        run = args.runs_dir / f"{task}-{lang}-lib"
        if (run / "prompt" / "prompt.safetensors").is_file():
            print(f"{run}: already in the library", flush=True)
            continue
        if (run / "checkpoint" / "state.json").is_file():
            cmd = ["train", "--resume", str(run)]
        else:
            cmd = ["train", "--task", task, "--lang", lang, "--runs-dir", str(args.runs_dir), "--run-name", run.name,
                   "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every), "--seed", str(args.seed),
                   *extra]
        print("+ xprompt " + shlex.join(cmd), flush=True)
        started = time.perf_counter()
        if subprocess.run([*XPROMPT, *cmd]).returncode != 0:
            sys.exit(f"training {source} failed (see above); fix it and run this script again to continue")
        print(f"  ({time.perf_counter() - started:.0f}s)", flush=True)
    subprocess.run([*XPROMPT, "library", "list", "--runs-dir", str(args.runs_dir)], check=True)


if __name__ == "__main__":
    main()
