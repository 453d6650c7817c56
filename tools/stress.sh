#!/usr/bin/env bash
# The concurrent randomized stress test (tests/stress.rs) for a long run, then a summary.
#   tools/stress.sh [MINUTES] [extra cargo test args]      default 10 minutes
# Writers, truncates, renames, unlinks, snapshot create/delete/prune, pinned readers,
# restores and version GC run at once; every snapshot and every acknowledged write is
# checked, and the store's refcounts are checked against its references at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/env.sh
. "$here/env.sh"
cd "$here/.."
minutes=${1:-10}
shift $(( $# > 0 ? 1 : 0 ))
export SNAPFS_STRESS_SECS=$((minutes * 60))
echo "stress: $minutes minutes"
if cargo test --release --locked --test stress "$@" -- --nocapture 2>&1 | tee /tmp/snapfs-stress.log; then
  echo "1 passed, 0 failed"
else
  echo "0 passed, 1 failed"
  exit 1
fi
