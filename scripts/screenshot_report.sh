#!/usr/bin/env bash
# Render the HTML leaderboard and open it in headless Chromium (Debian's `chromium` package),
# saving a screenshot: proof that the page loads and draws.  Usage:
#   scripts/screenshot_report.sh [RUNS_DIR] [TASK] [OUT_PREFIX]
set -euo pipefail
runs=${1:-runs}; task=${2:-xnli}; out=${3:-runs/report-$task}
xprompt=${XPROMPT:-.venv/bin/xprompt}
command -v chromium >/dev/null || { echo "chromium is not installed: apt-get install chromium" >&2; exit 1; }
"$xprompt" report --runs-dir "$runs" --task "$task" --format html --out "$out.html"
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=1400,1100 \
  --screenshot="$out.png" "file://$(realpath "$out.html")" 2>/dev/null
rm -rf "$profile"
test -s "$out.png" && echo "screenshot: $out.png"
