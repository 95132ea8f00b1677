#!/usr/bin/env bash
# The HTML report as a reader sees it: a full-page screenshot with Debian's headless Chromium.
#   bash bench/screenshot_report.sh [RESULTS_DIR] [RUN] [OUT.png]
# (apt-get install -y chromium; defaults: results/, demo, /tmp/byol-runner-report.png)
set -euo pipefail
results="${1:-results}"; run="${2:-demo}"; out="${3:-/tmp/byol-runner-report.png}"
page="$(cd "$results/$run" && pwd)/results.html"
[ -f "$page" ] || { echo "no $page: run byol-runner run/report first" >&2; exit 2; }
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1440,3000 \
  --screenshot="$out" "file://$page" 2>/dev/null
echo "$out"
