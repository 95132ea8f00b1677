#!/usr/bin/env bash
# Test time, before and after a change, in the same minutes: each test file (or test id) is run at
# REV (a git worktree in a temp dir) and at the working tree, one after the other, file by file, so
# the machine's drift falls on both alike. Prints "target<TAB>side<TAB>seconds<TAB>rc" lines.
#   bash bench/suite_ab.sh REV tests/test_worker.py tests/test_report.py ...
set -uo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/suite_ab.sh REV TEST...}; shift
here=$(pwd)
data=${BYOL_SHARED_DATA:-$(cd .. && pwd)/shared/data}
old=$(mktemp -d /tmp/byol-ab-XXXX)
git worktree add -q --detach "$old" "$rev" || exit 2
trap 'git worktree remove --force "$old"' EXIT
for target in "$@"; do
  for side in before after; do
    dir=$here; [ "$side" = before ] && dir=$old
    start=$(date +%s.%N)
    (cd "$dir" && BYOL_SHARED_DATA=$data PYTHONPATH=$dir "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider \
      -p no:warnings "$target" >/dev/null 2>&1)
    rc=$?
    printf "%s\t%s\t%.1f s\trc=%s\n" "$target" "$side" "$(echo "$(date +%s.%N) - $start" | bc)" "$rc"
  done
done
