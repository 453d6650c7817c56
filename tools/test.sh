#!/usr/bin/env bash
# Every check, in the order a failure is cheapest to find. Installs what is missing first.
#   tools/test.sh            everything (CI runs this)
#   FSX_OPS=N tools/test.sh  a different fsx length (default 100000)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh" --test
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
step "cargo test (core, model, stress, hostile-input, mount, snapshot and kill -9 crash tests)"
cargo test --release --locked 2>&1 | tee "$logs/cargo-test.log"
step "cargo test: deterministic interleavings through failpoints"
cargo test --release --locked --features failpoints --test interleavings 2>&1 | tee -a "$logs/cargo-test.log"
step "pjdfstest against a live mount"
"$here/pjdfstest.sh" 2>&1 | tee "$logs/pjdfstest.log"
step "fsx against a live mount"
"$here/fsx.sh" -N "${FSX_OPS:-100000}" 2>&1 | tee "$logs/fsx.log"
# One closing line over every suite (each suite above already failed the run if it failed).
passed=0 failed=0
while read -r p f; do passed=$((passed + p)); failed=$((failed + f)); done < <(
  sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$logs/cargo-test.log"
  grep -h -E '^[0-9]+ passed, [0-9]+ failed' "$logs/pjdfstest.log" "$logs/fsx.log" | sed 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\1 \2/')
rm -rf "$logs"
step "all checks passed"
echo "total: $passed passed, $failed failed"
