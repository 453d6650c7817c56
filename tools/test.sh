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
step "cargo test (core, mount and kill -9 crash tests)"
cargo test --release --locked
step "pjdfstest against a live mount"
"$here/pjdfstest.sh"
step "fsx against a live mount"
"$here/fsx.sh" -N "${FSX_OPS:-100000}"
step "all checks passed"
