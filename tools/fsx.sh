#!/usr/bin/env bash
# Run fsx (File System eXerciser, the Rust fsx-rs from crates.io:
# `cargo install --locked fsx`) against one file.
#
# Usage:
#   tools/fsx.sh [-N OPS] [-S SEED] [FILE_DIR]
#
#   -N OPS     number of operations (default 100000)
#   -S SEED    RNG seed (default 1234567, fixed so runs are reproducible;
#              the seed is always printed; rerun with it to reproduce)
#   FILE_DIR   directory to put the test file in (created if missing), e.g.
#              a directory on ext4 for a baseline.  Without it, a fresh snapfs
#              store and mount point are made under a temp dir, `snapfs mount`
#              is started in the background and the test file lives in it.
#
# Operations exercised: pread/pwrite, mmap reads, mmap writes (+msync),
# msync(MS_INVALIDATE), ftruncate (shrink and extend), fsync, fdatasync,
# close/reopen, posix_fallocate (mode 0; glibc falls back to writing zeroes
# if the file system answers EOPNOTSUPP), punch_hole
# (fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE), which snapfs
# implements; it has no fallback, so a file system without it needs
# FSX_DISABLE=punch_hole), sendfile, posix_fadvise and copy_file_range (the
# kernel falls back to a splice copy if a FUSE file system lacks it).
# Disabled: nothing.  fsx-rs has no zero-range, collapse-range or
# insert-range operations (the fallocate modes snapfs rejects), so there is
# nothing to turn off for them.
#
# Output: seed, timing, log path; on failure the head (miscompare details)
# and tail (last operations) of fsx's output.  The very last line is
# "1 passed, 0 failed" or "0 passed, 1 failed"; exit status is non-zero on
# failure.  If /dev/fuse is absent (snapfs mode only) it prints
# "SKIPPED: /dev/fuse absent" and exits 0.
#
# Environment:
#   FSX_BIN       fsx binary (default: from PATH or ~/.cargo/bin)
#   FSX_FLEN      maximum file size in bytes (default 262144, fsx's default)
#   FSX_DISABLE   extra operations to disable, e.g. "copy_file_range sendfile"
#                 (names are the [weights] keys of fsx.toml)
#   FSX_CONFIG    use this fsx.toml instead of the generated one
#   FSX_TIMEOUT   seconds before fsx is killed (default 3600)
#   SNAPFS_*      see tools/lib-mount.sh (binary, mount options, timeouts)
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib-mount.sh source-path=SCRIPTDIR
. "$HERE/lib-mount.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

ops=100000
seed=1234567
while getopts ":N:S:h" opt; do
    case $opt in
    N) ops=$OPTARG ;;
    S) seed=$OPTARG ;;
    h)
        usage
        exit 0
        ;;
    :)
        echo "error: -$OPTARG needs an argument" >&2
        exit 2
        ;;
    *)
        echo "error: unknown option -$OPTARG" >&2
        usage >&2
        exit 2
        ;;
    esac
done
shift $((OPTIND - 1))
if (($# > 1)); then
    echo "error: at most one FILE_DIR" >&2
    exit 2
fi
target=${1:-}
[[ $ops =~ ^[1-9][0-9]*$ ]] || {
    echo "error: -N wants a positive integer" >&2
    exit 2
}
[[ $seed =~ ^[0-9]+$ ]] || {
    echo "error: -S wants a non-negative integer" >&2
    exit 2
}

if [[ -z $target ]]; then
    require_fuse || exit 0
fi

run_timeout=${FSX_TIMEOUT:-3600}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapfs-fsx.XXXXXX")
LOG=$WORK/fsx.log
CONFIG=$WORK/fsx.toml
STORE=$WORK/store
MNT=$WORK/mnt
DAEMON_LOG=$WORK/snapfs.log

summary_printed=0
RUNNER_PID=

# shellcheck disable=SC2317  # invoked via trap
on_exit() {
    local rc=$?
    if [[ -n ${restore_map_count:-} ]]; then
        echo "$restore_map_count" >/proc/sys/vm/max_map_count || true
    fi
    trap - EXIT INT TERM
    if [[ -n ${RUNNER_PID:-} ]]; then
        # Interrupted mid-run: stop the test tool (timeout forwards TERM).
        kill -TERM "$RUNNER_PID" 2>/dev/null || true
        wait "$RUNNER_PID" 2>/dev/null || true
    fi
    if [[ -n ${SNAPFS_PID:-} ]] || snapfs_mount_fstype "$MNT" >/dev/null 2>&1; then
        snapfs_stop "$MNT" || true
    fi
    if ((summary_printed == 0)); then
        ((rc != 0)) || rc=1
        echo "fsx did not complete (exit status $rc); logs in $WORK" >&2
        echo "0 passed, 1 failed"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

finish() { # finish PASSED(0|1)
    summary_printed=1
    if (($1)); then
        echo "1 passed, 0 failed"
        exit 0
    fi
    echo "0 passed, 1 failed"
    exit 1
}

setup_fail() {
    echo "error: $*" >&2
    echo "FAILED: fsx::setup ($*)"
    echo "logs: $WORK"
    finish 0
}

find_fsx() {
    if [[ -n ${FSX_BIN:-} ]]; then
        [[ -x $FSX_BIN ]] && printf '%s\n' "$FSX_BIN" && return 0
        return 1
    fi
    command -v fsx 2>/dev/null && return 0
    [[ -x $HOME/.cargo/bin/fsx ]] && printf '%s\n' "$HOME/.cargo/bin/fsx" && return 0
    return 1
}

FSX=$(find_fsx) || setup_fail "fsx not found; install it with: cargo install --locked fsx"

# ---------------------------------------------------------------- config
declare -A weight=(
    [close_open]=1
    [read]=10
    [write]=10
    [mapread]=10
    [mapwrite]=10
    [invalidate]=1
    [truncate]=10
    [fsync]=1
    [fdatasync]=1
    [posix_fallocate]=1
    [punch_hole]=1
    [sendfile]=1
    [posix_fadvise]=1
    [copy_file_range]=1
)
for op in ${FSX_DISABLE:-}; do
    [[ -n ${weight[$op]+x} ]] || setup_fail "FSX_DISABLE: unknown operation '$op' (known: ${!weight[*]})"
    weight[$op]=0
done
if [[ -n ${FSX_CONFIG:-} ]]; then
    cp -- "$FSX_CONFIG" "$CONFIG" || setup_fail "cannot read FSX_CONFIG=$FSX_CONFIG"
else
    {
        echo "# generated by tools/fsx.sh"
        echo "flen = ${FSX_FLEN:-262144}"
        echo "nomsyncafterwrite = false"
        echo "nosizechecks = false"
        echo
        echo "[opsize]"
        echo "max = 65536"
        echo "min = 0"
        echo "align = 1"
        echo
        echo "[weights]"
        for op in close_open read write mapread mapwrite invalidate truncate fsync \
            fdatasync posix_fallocate punch_hole sendfile posix_fadvise copy_file_range; do
            echo "$op = ${weight[$op]}"
        done
    } >"$CONFIG"
fi
enabled=$(awk -F' = ' '/^\[weights\]/ { w = 1; next } /^\[/ { w = 0 }
    w && $2 + 0 > 0 { printf "%s%s", sep, $1; sep = " " }' "$CONFIG")

# ---------------------------------------------------------------- target
if [[ -n $target ]]; then
    mkdir -p -- "$target" || setup_fail "cannot create $target"
    dir=$(realpath -- "$target")
    what="directory $dir ($(findmnt -n -o FSTYPE --target "$dir" 2>/dev/null || stat -f -c %T -- "$dir"))"
else
    snapfs_bin >/dev/null || setup_fail "snapfs is not built (cargo build --release, or set SNAPFS_BIN)"
    mkdir -p "$STORE" "$MNT"
    echo "starting snapfs: store $STORE, mount point $MNT, daemon log $DAEMON_LOG"
    snapfs_start "$STORE" "$MNT" "$DAEMON_LOG" || setup_fail "snapfs did not mount (see $DAEMON_LOG)"
    # Never test the bare mount-point directory by mistake.
    [[ $(stat -f -c %t -- "$MNT") == 65735546 ]] ||
        setup_fail "$MNT is not a FUSE mount after snapfs_start"
    dir=$MNT
    what="snapfs mounted at $MNT (pid $SNAPFS_PID)"
fi
file=$dir/fsx-$seed.dat

echo "fsx:     $FSX ($("$FSX" --version 2>/dev/null || echo unknown version))"
echo "target:  $what"
echo "file:    $file"
echo "ops:     $ops   seed: $seed   (reproduce: tools/fsx.sh -N $ops -S $seed${target:+ $target})"
echo "enabled: $enabled"
echo "logs:    $WORK  (fsx output: $LOG, config: $CONFIG)"
echo "running fsx (timeout ${run_timeout}s)..."

# fsx 0.3.2's mapread never munmaps (src/main.rs, domapread), so the fsx process leaks one
# mapping per mapread and dies with ENOMEM at vm.max_map_count (65530) in runs of about 900,000
# ops. For long runs, raise the limit for the duration of the run (as root) and restore it.
old_map_count=$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 0)
if ((ops > old_map_count)) && [[ -w /proc/sys/vm/max_map_count ]]; then
    echo "raising vm.max_map_count from $old_map_count to $((ops + 65536)) for this run (fsx leaks mappings)"
    echo $((ops + 65536)) >/proc/sys/vm/max_map_count
    restore_map_count=$old_map_count
fi

# ---------------------------------------------------------------- run
start=$SECONDS
status=0
# Run in the background and `wait`, so that INT/TERM reach our trap at once.
(cd / && exec timeout -k 30 "$run_timeout" \
    "$FSX" -f "$CONFIG" -N "$ops" -S "$seed" -P "$WORK" "$file") \
    >"$LOG" 2>&1 &
RUNNER_PID=$!
wait "$RUNNER_PID" || status=$?
RUNNER_PID=
elapsed=$((SECONDS - start))
echo "fsx finished in ${elapsed}s with exit status $status"

passed=1
reasons=()
if ((status != 0)); then
    passed=0
    if ((status == 124 || status == 137)); then
        reasons+=("fsx timed out after ${run_timeout}s")
    else
        reasons+=("fsx exited with status $status")
    fi
elif ! grep -q 'All operations completed A-OK!' "$LOG"; then
    passed=0
    reasons+=("fsx exited 0 but did not report 'All operations completed A-OK!'")
fi
if ((passed)); then
    rm -f -- "$file"
fi

if [[ -z $target ]]; then
    if ! _snapfs_pid_alive "$SNAPFS_PID"; then
        passed=0
        reasons+=("the snapfs daemon died during the run (see $DAEMON_LOG)")
    fi
    if ! snapfs_stop "$MNT"; then
        passed=0
        reasons+=("snapfs unmount/daemon exit was not clean (see $DAEMON_LOG)")
    fi
fi

if ((!passed)); then
    echo
    echo "---- fsx output, head (first errors) ----"
    awk '{ print } /LOG DUMP/ { exit }' "$LOG" | head -n 40
    echo "---- fsx output, tail (last operations) ----"
    tail -n 40 -- "$LOG"
    echo "---- end of fsx output ----"
    for r in "${reasons[@]}"; do
        echo "FAILED: fsx: $r"
    done
    echo "reproduce: tools/fsx.sh -N $ops -S $seed${target:+ $target}"
    [[ -e $WORK/$(basename -- "$file").fsxgood ]] &&
        echo "expected file contents: $WORK/$(basename -- "$file").fsxgood"
    [[ -z $target ]] && echo "store kept for inspection: $STORE"
else
    echo "fsx: all $ops operations completed OK in ${elapsed}s"
    if [[ -z $target ]]; then
        rm -rf -- "$STORE"
        rmdir -- "$MNT" 2>/dev/null || true
    fi
fi
echo "fsx output: $LOG"
[[ -z $target ]] && echo "snapfs daemon log: $DAEMON_LOG"
finish "$passed"
