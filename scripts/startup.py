"""What a command spends before its first batch and after its last, measured in fresh processes.

    python scripts/startup.py --repeats 5 --out docs/startup.json

Each figure is the median over ``--repeats`` alternated fresh processes (medians, since the machine is
shared), printed with the CPU kind:
- ``imports``: torch, datasets, transformers' BERT and its fast tokenizer class imported, with the
  garbage collector on (Python's default) and off (what ``xprompt``'s commands do until their backbone
  is open: ``cli.common.startup_over``);
- ``exit``: the time from the last statement of such a process to its end, with and without
  ``gc.freeze()`` first (what ``xprompt`` does on its way out: ``cli.common.run``);
- ``tokenizer``: reading the embedded backbone's ``tokenizer.json`` (what ``LazyTokenizer`` spares an
  evaluation whose rows are cached);
- ``answers``: ``xprompt --help`` and ``xprompt eval --task nosuchtask`` whole (issue 34: under 1 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """
import gc, sys, time
start = time.perf_counter()
if sys.argv[1] == "off":
    gc.disable()
import torch, datasets
from transformers.models.bert import modeling_bert
from transformers import PreTrainedTokenizerFast
print(time.perf_counter() - start)
if sys.argv[2] == "freeze":
    gc.freeze()
print(time.time(), flush=True)
"""

TOKENIZER = """
import time
from pathlib import Path
from transformers import PreTrainedTokenizerFast  # imported first: the figure is the file's reading
from xprompt.backbones.embedded import embedded_folder, load_tokenizer
from xprompt.store import default_cache_dir
folder = embedded_folder(default_cache_dir())
start = time.perf_counter()
load_tokenizer(folder)
print(time.perf_counter() - start)
"""


def python(code: str, *args: str) -> tuple[list[str], float]:
    """Run ``code`` in a fresh interpreter; (its output lines, the wall time of the whole process)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.split(), time.perf_counter() - start


def measure(repeats: int) -> dict:
    samples: dict[str, list[float]] = {}

    def add(name, value):
        samples.setdefault(name, []).append(value)

    for _ in range(repeats):
        for collector in ("on", "off"):
            for leaving in ("collect", "freeze"):
                (imported, last), _ = python(IMPORTS, collector, leaving)
                add(f"imports, collector {collector}", float(imported))
                add(f"exit, {'gc.freeze() first' if leaving == 'freeze' else 'plain'} (collector {collector})",
                    time.time() - float(last))
        add("tokenizer.json read", float(python(TOKENIZER)[0][0]))
        for name, argv in (("xprompt --help", ["--help"]), ("xprompt eval --task nosuchtask", ["eval", "--task", "nosuchtask"])):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "xprompt", *argv], capture_output=True, cwd=ROOT)
            add(name, time.perf_counter() - start)
    return {name: {"median_s": round(median(v), 3), "samples_s": [round(x, 3) for x in v]} for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from xprompt.hardware import describe

    cpu = describe("cpu")
    figures = measure(args.repeats)
    print(f"CPU: {json.dumps(cpu)}; medians of {args.repeats} fresh processes")
    for name, value in figures.items():
        print(f"  {name:55s} {value['median_s']:.2f} s")
    if args.out:
        args.out.write_text(json.dumps({"command": "python scripts/startup.py " + " ".join(sys.argv[1:]), "cpu": cpu,
                                        "repeats": args.repeats, "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
