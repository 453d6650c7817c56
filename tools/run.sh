#!/usr/bin/env bash
# The main job: install what is missing, build, and mount a store in the foreground,
# replicating to a local-directory backend.
#   tools/run.sh [STORE_DIR] [MOUNTPOINT] [extra snapfs mount options...]
# Defaults: ~/snapfs/store mounted on ~/snapfs/mnt, replicating to dir:~/snapfs/backup
# (SNAPFS_BACKUP=/abs/dir or SNAPFS_BACKUP=s3://bucket/prefix to change it, SNAPFS_BACKUP=none
# for no replication). Stop with Ctrl-C or `snapfs umount MNT`.
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
backup=${SNAPFS_BACKUP:-$HOME/snapfs/backup}
replicate=()
case "$backup" in
  none) ;;
  s3://*) replicate=(--replicate "$backup") ;;
  /*) replicate=(--replicate "dir:$backup") ;;
  *) echo "snapfs: SNAPFS_BACKUP must be an absolute path, s3://BUCKET[/PREFIX] or none" >&2; exit 1 ;;
esac
mkdir -p "$mnt"
echo "snapfs: mounting $store on $mnt, replicating to ${replicate[1]:-nothing} (binary: $SNAPFS_BIN)"
exec "$SNAPFS_BIN" mount "$store" "$mnt" "${replicate[@]}" "$@"
