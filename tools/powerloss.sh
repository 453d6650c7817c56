#!/usr/bin/env bash
# Power-loss simulation (tests/powerloss.rs) with many cycles:
#   tools/powerloss.sh [CYCLES]     default 1000
# The store lives on a lazy FUSE layer that drops every write not fsynced (tests/lazyfs);
# each cycle kills the daemon, loses power, runs `snapfs check --verify-data` and verifies
# every fsynced file and every durable snapshot. SNAPFS_TEST_SEED=N replays a run.
# Prints "N passed, N failed" (one power loss is one check) and exits non-zero on a failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/env.sh
. "$here/env.sh"
cycles=${1:-1000}
cd "$here/.."
log=$(mktemp)
SNAPFS_POWERLOSS_CYCLES=$cycles cargo test --release --locked --test powerloss -- \
  --nocapture power_loss_loses_nothing 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
done_cycles=$(grep -c '^power loss [0-9]*:' "$log")
rm -f "$log"
if [ "$rc" = 0 ]; then
  echo "$done_cycles passed, 0 failed"
else
  echo "$done_cycles passed, 1 failed"
  exit 1
fi
