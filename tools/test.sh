#!/usr/bin/env bash
# Every check, in the order a failure is cheapest to find. Installs what is missing first.
#   tools/test.sh            everything (CI runs this)
#   FSX_OPS=N tools/test.sh  a different fsx length (default 100000)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh" --test
"$here/garage.sh" install
# shellcheck source=tools/env.sh
. "$here/env.sh"
cd "$here/.."

step() { printf '\n==== %s\n' "$*"; }
step "format";  cargo fmt --check
step "build";   cargo build --release --locked --all-targets
step "clippy";  cargo clippy --release --locked --all-targets -- -D warnings
step "clippy (with failpoints)"
cargo clippy --release --locked --all-targets --features failpoints -- -D warnings
logs=$(mktemp -d)
step "garage: a loopback S3 server, self-test (signed PUT/GET/LIST/DELETE, stop, restart)"
"$here/garage.sh" selftest 2>&1 | tee "$logs/garage-selftest.log"
step "garage: start the S3 server the replication tests use"
garage_dir=$(mktemp -d)
# shellcheck disable=SC2064  # expand $here and $garage_dir now
trap "'$here/garage.sh' stop '$garage_dir' || true; rm -rf '$garage_dir'" EXIT
trap 'exit 130' INT TERM
"$here/garage.sh" start "$garage_dir"
# shellcheck source=/dev/null
. "$garage_dir/env"  # AWS_*, SNAPFS_TEST_S3_ENDPOINT, SNAPFS_TEST_S3_BUCKET, SNAPFS_TEST_GARAGE_*
step "cargo test (core, model, stress, hostile-input, mount, snapshot, kill -9 crash, power loss, ENOSPC and replication tests: dir: and Garage)"
cargo test --release --locked 2>&1 | tee "$logs/cargo-test.log"
step "cargo test: deterministic interleavings through failpoints"
cargo test --release --locked --features failpoints --test interleavings 2>&1 | tee -a "$logs/cargo-test.log"
step "cargo test: the power-loss harness catches a build whose fsync does not sync"
cargo test --release --locked --features failpoints --test powerloss -- catches 2>&1 | tee -a "$logs/cargo-test.log"
step "garage: a 3-node cluster (replication factor 3), one node killed while a checkpoint replicates; recover"
"$here/garage-cluster.sh" drill 256 2>&1 | tee "$logs/garage-cluster.log"
step "pjdfstest against a live mount"
"$here/pjdfstest.sh" 2>&1 | tee "$logs/pjdfstest.log"
step "fsx against a live mount"
"$here/fsx.sh" -N "${FSX_OPS:-100000}" 2>&1 | tee "$logs/fsx.log"
# One closing line over every suite (each suite above already failed the run if it failed).
passed=0 failed=0
while read -r p f; do passed=$((passed + p)); failed=$((failed + f)); done < <(
  sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$logs/cargo-test.log"
  grep -h -E '^[0-9]+ passed, [0-9]+ failed' "$logs/garage-selftest.log" "$logs/garage-cluster.log" "$logs/pjdfstest.log" "$logs/fsx.log" | sed 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\1 \2/')
rm -rf "$logs"
step "all checks passed"
echo "total: $passed passed, $failed failed"
