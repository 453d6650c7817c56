#!/usr/bin/env bash
# Installs what snapfs needs on a Debian machine, skipping what is already there.
#   tools/setup.sh          build and runtime needs: fuse3, libclang-dev, a C++ toolchain
#   tools/setup.sh --test   also the test tools: fio, attr, pjdfstest, fsx
# Source tools/env.sh for the shared cargo target directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/env.sh
. "$here/env.sh"

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in fuse3 libclang-dev clang g++ make pkg-config; do
  have_pkg "$p" || need+=("$p")
done
if [ "$want_test" = 1 ]; then
  for p in fio attr acl libacl1-dev perl; do
    have_pkg "$p" || need+=("$p")
  done
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$want_test" = 1 ]; then
  for tool in pjdfstest fsx; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "setup: cargo install $tool"
      # The tools build in their own target directory so they never evict snapfs's cache.
      CARGO_TARGET_DIR="$SNAPFS_CACHE/tools-target" cargo install --locked "$tool" \
        || CARGO_TARGET_DIR="$SNAPFS_CACHE/tools-target" cargo install "$tool"
    fi
  done
fi
