# Sourced by every script: one cargo target directory that outlives clones, because
# RocksDB's C++ build takes 20-30 minutes on a 2-core machine.
SNAPFS_CACHE=${SNAPFS_CACHE:-$HOME/.cache/snapfs}
export CARGO_TARGET_DIR=${SNAPFS_TARGET_DIR:-$SNAPFS_CACHE/target}
export PATH="$HOME/.cargo/bin:$PATH"
SNAPFS_BIN="$CARGO_TARGET_DIR/release/snapfs"
export SNAPFS_CACHE SNAPFS_BIN
