#!/usr/bin/env bash
# The main job: install what is missing, build, and mount a store in the foreground.
#   tools/run.sh [STORE_DIR] [MOUNTPOINT] [extra snapfs mount options...]
# Defaults: ~/snapfs/store mounted on ~/snapfs/mnt. Stop with Ctrl-C or `snapfs umount MNT`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh"
# shellcheck source=tools/env.sh
. "$here/env.sh"
cd "$here/.."
cargo build --release --locked
store=${1:-$HOME/snapfs/store}
mnt=${2:-$HOME/snapfs/mnt}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$mnt"
echo "snapfs: mounting $store on $mnt (binary: $SNAPFS_BIN)"
exec "$SNAPFS_BIN" mount "$store" "$mnt" "$@"
