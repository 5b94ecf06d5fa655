#!/usr/bin/env bash
# GPU check (one CUDA GPU): the embedded backbone, and the hub-layout mT5 and XLM-R fixtures, trained
# and evaluated on cuda in the auto dtype (bf16 on GPUs that support it); a torchrun run with one
# NCCL process (which runs every collective: gradients, the centred verbalizer's batch means,
# selection counts, object broadcasts); and the same short run on the CPU in fp32, whose
# predictions the GPU's are compared with. Nothing here needs the network.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: a fresh temporary folder
#   STEPS=100 ROWS=300 bash scripts/gpu_check.sh  # training steps, dev rows per language
#
# Needs: a CUDA torch, and xprompt importable with its dependencies (pip install -e . or PYTHONPATH=.).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
STEPS=${STEPS:-100}
ROWS=${ROWS:-300}
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
XP() { "$PY" -m xprompt "$@"; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import torch
from xprompt.hardware import resolve_dtype, describe
assert torch.cuda.is_available(), "no CUDA device visible"
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())
print("auto dtype on cuda:", *resolve_dtype("auto", "cuda"))
print("auto dtype on cpu: ", *resolve_dtype("auto", "cpu"), describe("cpu"))
EOF

COMMON=(--task xnli --max-steps "$STEPS" --eval-every "$STEPS" --seed 42)
LANGS=en,de,zh,ar,sw

echo "== embedded e5-small: cuda (auto dtype) vs cpu (fp32)"
XP train "${COMMON[@]}" --device cuda --runs-dir "$OUT/runs" --run-name e5-cuda
XP eval --run "$OUT/runs/e5-cuda" --langs "$LANGS" --limit "$ROWS" --device cuda --json > "$OUT/e5-cuda.json"
XP train "${COMMON[@]}" --device cpu --dtype fp32 --runs-dir "$OUT/runs" --run-name e5-cpu
XP eval --run "$OUT/runs/e5-cpu" --langs "$LANGS" --limit "$ROWS" --device cpu --dtype fp32 --json > "$OUT/e5-cpu.json"
cp -r "$OUT/runs/e5-cpu/predictions" "$OUT/e5-cpu-predictions"
# the CPU-trained prompt evaluated on the GPU: the same prompt, the GPU's arithmetic only
XP eval --run "$OUT/runs/e5-cpu" --langs "$LANGS" --limit "$ROWS" --device cuda --json > "$OUT/e5-cpu-on-cuda.json"

echo "== torchrun, 1 process, NCCL"
torchrun --standalone --nproc_per_node 1 -m xprompt train "${COMMON[@]}" --device cuda --runs-dir "$OUT/runs" \
    --run-name e5-torchrun
torchrun --standalone --nproc_per_node 1 -m xprompt eval --run-dir "$OUT/runs/e5-torchrun" --langs "$LANGS" \
    --limit "$ROWS" --device cuda --json > "$OUT/e5-torchrun.json"

echo "== hub-layout mT5 and XLM-R (tiny random weights) on cuda"
"$PY" - "$OUT/fixtures" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from conftest import _spm_size, _tiny_mt5, _tiny_xlmr_mlm
from hub_layout import save_mt5, save_xlmr, write_mt5_sentencepiece, write_xlmr_sentencepiece
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
spm = write_mt5_sentencepiece(out / "spiece.model")
save_mt5(_tiny_mt5(_spm_size(spm)), out / "mt5", spm)
save_xlmr(_tiny_xlmr_mlm(), out / "xlmr", write_xlmr_sentencepiece(out / "sentencepiece.bpe.model"))
print("fixtures in", out)
EOF
for bb in mt5 xlmr; do
  for method in deep prefix unified; do
    XP train --backbone "$OUT/fixtures/$bb" --method "$method" --max-steps 20 --eval-every 10 --prompt-length 4 \
        --device cuda --runs-dir "$OUT/runs" --run-name "$bb-$method"
    XP eval --run "$OUT/runs/$bb-$method" --langs en,zh --limit 100 --device cuda --json > "$OUT/$bb-$method.json"
  done
done

echo "== summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    return json.loads((out / f"{name}.json").read_text())["results"]
def preds(run, lang):
    lines = (out / "runs" / run / "predictions" / f"xnli.dev.{lang}.tsv").read_text().splitlines()[1:]
    return [line.split("\t")[1] for line in lines]
for name in ("e5-cuda", "e5-cpu", "e5-cpu-on-cuda", "e5-torchrun"):
    r = load(name)
    print(f"{name:16s}", " ".join(f"{lang} {100 * v['accuracy']:.1f} ({v['dtype']}, {v['pairs_per_s']:.0f}/s)" for lang, v in r.items()))
cfg = json.loads((out / "runs" / "e5-cuda" / "config.json").read_text())
print("cuda run compute:", cfg["compute"])
def agree(a, b):
    return f"{100 * sum(x == y for x, y in zip(a, b)) / len(a):.1f}%"
langs = list(load("e5-cuda"))
print("torchrun (NCCL) vs single-process cuda predictions agree:",
      {lang: agree(preds("e5-cuda", lang), preds("e5-torchrun", lang)) for lang in langs})
def cpu_preds(lang):
    return [l.split("\t")[1] for l in (out / "e5-cpu-predictions" / f"xnli.dev.{lang}.tsv").read_text().splitlines()[1:]]
print("CPU-trained prompt, CPU fp32 vs GPU predictions agree:",
      {lang: agree(cpu_preds(lang), preds("e5-cpu", lang)) for lang in langs})
for bb in ("mt5", "xlmr"):
    for method in ("deep", "prefix", "unified"):
        r = load(f"{bb}-{method}")
        print(f"{bb}-{method}:", {lang: v["n"] for lang, v in r.items()}, "ok")
EOF
echo "outputs in $OUT"
