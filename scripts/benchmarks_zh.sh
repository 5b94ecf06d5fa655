#!/usr/bin/env bash
# Chinese benchmarks, cross-task transfer, few-shot protocols and the report, on the embedded
# backbone. Needs an XNLI and a PAWS-X English run (scripts/foundation.py makes them):
#   scripts/benchmarks_zh.sh RUNS_DIR XNLI_RUN PAWSX_RUN
# Every figure lands in the runs' metrics.json and in `xprompt report`.
set -euo pipefail
runs=$1; xnli=$2; pawsx=$3
x=${XPROMPT:-.venv/bin/xprompt}
steps=${STEPS:-150}
# zero-shot cross-task transfer through the declared label maps
$x eval --run "$xnli" --task ocnli --langs zh
$x eval --run "$pawsx" --task afqmc --langs zh
$x eval --run "$pawsx" --task bustm --langs zh
# Chinese tasks trained on Chinese data (FewCLUE tasks are few-shot by construction)
for task in ocnli chnsenticorp bustm csl eprstmt tnews iflytek; do
  $x train --task $task --lang zh --runs-dir "$runs" --run-name "$task-zh-s42" --max-steps $steps --eval-every 50
  $x eval --run "$runs/$task-zh-s42" --langs zh
done
# 16-shot English XNLI over five seeds, evaluated on every language (first 500 dev rows each)
$x train --task xnli --lang en --shots 16 --seeds 13,21,42,87,100 --runs-dir "$runs" --run-name xnli-16shot \
  --max-steps $steps --eval-every 50
for s in 13 21 42 87 100; do $x eval --run "$runs/xnli-16shot-s$s" --langs all --limit 500; done
# target-language few-shot adaptation of the full English prompt
$x eval --run "$xnli" --langs zh,sw --shots 16 --adapt-steps 100
for task in xnli ocnli; do $x report --runs-dir "$runs" --task $task; done
