# shellcheck shell=bash
# Shared helpers for snapfs test scripts (pjdfstest, fsx, crash tests,
# benchmarks).  Source it; do not execute it:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib-mount.sh"
#
#   require_fuse || exit 0               # prints "SKIPPED: /dev/fuse absent"
#   snapfs_start "$store" "$mnt" "$log"  # sets SNAPFS_PID, waits for the mount
#   ...
#   snapfs_stop "$mnt"                   # umount + wait for the daemon to exit
#
# snapfs_start must run in the calling shell (not in $(...) or a pipeline),
# so that SNAPFS_PID is a child of that shell and its exit status can be
# collected by snapfs_stop.
#
# Environment knobs (all optional):
#   SNAPFS_BIN            snapfs binary (default:
#                         ${CARGO_TARGET_DIR:-$HOME/.cache/snapfs/target}/release/snapfs)
#   SNAPFS_MOUNT_OPTS     extra arguments for `snapfs mount`, word-split
#                         (e.g. "--threads 2 --log-level debug")
#   SNAPFS_FSTYPE         fstype expected in /proc/mounts (default fuse.snapfs;
#                         plain "fuse" is accepted when the mount's source is
#                         the store directory, see snapfs_is_mounted)
#   SNAPFS_MOUNT_TIMEOUT  seconds to wait for the mount to appear (default 30)
#   SNAPFS_STOP_TIMEOUT   seconds to wait for the daemon to exit after the
#                         umount before it is killed (default 30)
#
# All functions return non-zero on failure instead of exiting, so they are
# usable from traps and with `set -e` callers alike.

SNAPFS_PID=${SNAPFS_PID:-}
SNAPFS_MNT=${SNAPFS_MNT:-}
SNAPFS_LOG=${SNAPFS_LOG:-}

_snapfs_err() { printf '%s\n' "$*" >&2; }

# snapfs_bin: print the path of the release snapfs binary, or fail clearly.
snapfs_bin() {
    local target=${CARGO_TARGET_DIR:-$HOME/.cache/snapfs/target}
    local bin=${SNAPFS_BIN:-$target/release/snapfs}
    if [[ ! -x $bin ]]; then
        _snapfs_err "error: snapfs binary not found or not executable: $bin"
        _snapfs_err "       build it first: cargo build --release   (or set SNAPFS_BIN)"
        return 1
    fi
    printf '%s\n' "$bin"
}

# require_fuse: succeed if FUSE can be used; otherwise print the skip reason
# on stdout and return 1.
require_fuse() {
    if [[ ! -c /dev/fuse ]]; then
        echo "SKIPPED: /dev/fuse absent"
        return 1
    fi
    return 0
}

# _snapfs_mnt_field PATH: PATH escaped the way /proc/mounts escapes it.
_snapfs_mnt_field() {
    local p=$1
    p=${p//\\/\\134}
    p=${p// /\\040}
    p=${p//$'\t'/\\011}
    p=${p//$'\n'/\\012}
    printf '%s' "$p"
}

# _snapfs_abspath PATH: absolute, symlink-free path (PATH need not exist).
_snapfs_abspath() {
    realpath -m -- "$1"
}

# snapfs_mount_fstype MNT: print the fstype mounted on MNT (topmost), or
# nothing and return 1 if MNT is not a mount point.
snapfs_mount_fstype() {
    local field
    field=$(_snapfs_mnt_field "$(_snapfs_abspath "$1")")
    awk -v m="$field" '$2 == m { t = $3 } END { if (t == "") exit 1; print t }' /proc/mounts
}

# snapfs_is_mounted MNT [STORE]: true if snapfs is mounted on MNT: fstype
# SNAPFS_FSTYPE (fuse.snapfs), or plain "fuse" -- fuser's own mount(2) path
# drops the subtype -- whose source (snapfs's FSName, the store directory)
# is STORE when STORE is given.
snapfs_is_mounted() {
    local field t src store
    field=$(_snapfs_mnt_field "$(_snapfs_abspath "$1")")
    read -r t src < <(awk -v m="$field" '$2 == m { t = $3; s = $1 }
        END { if (t != "") print t, s }' /proc/mounts) || return 1
    [[ -n ${t:-} ]] || return 1
    [[ $t == "${SNAPFS_FSTYPE:-fuse.snapfs}" ]] && return 0
    [[ $t == fuse ]] || return 1
    (($# >= 2)) || return 0
    store=$(_snapfs_mnt_field "$(_snapfs_abspath "$2")")
    [[ $src == "$store" || $src == "$(_snapfs_mnt_field "$2")" ]]
}

# _snapfs_pid_alive PID: true while PID exists and is not a zombie.
_snapfs_pid_alive() {
    local pid=$1 state
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# _snapfs_now_ms: wall-clock milliseconds (bash >= 5 EPOCHREALTIME).
_snapfs_now_ms() {
    local t=${EPOCHREALTIME:-}
    if [[ -n $t ]]; then
        t=${t/[.,]/}
        printf '%s\n' "$((10#$t / 1000))"
    else
        printf '%s\n' "$((SECONDS * 1000))"
    fi
}

# _snapfs_wait_pid_exit PID TIMEOUT: wait up to TIMEOUT seconds for PID to
# exit.  Returns 0 if it is gone.
_snapfs_wait_pid_exit() {
    local pid=$1 deadline
    deadline=$(($(_snapfs_now_ms) + $2 * 1000))
    while _snapfs_pid_alive "$pid"; do
        (($(_snapfs_now_ms) < deadline)) || return 1
        sleep 0.2
    done
    return 0
}

# _snapfs_log_tail LOG: show the end of a daemon log on stderr.
_snapfs_log_tail() {
    local log=$1
    if [[ -s $log ]]; then
        _snapfs_err "---- last 30 lines of $log ----"
        tail -n 30 -- "$log" >&2
        _snapfs_err "---- end of $log ----"
    else
        _snapfs_err "(daemon log $log is empty)"
    fi
}

# _snapfs_reap PID: collect the exit status of our child PID into
# _SNAPFS_RC (127 if PID is not a child of this shell).  Must not be called
# from a subshell.
_SNAPFS_RC=0
_snapfs_reap() {
    _SNAPFS_RC=0
    wait "$1" 2>/dev/null || _SNAPFS_RC=$?
}

# snapfs_start STORE MNT LOG [EXTRA_MOUNT_ARGS...]
# Start `snapfs mount STORE MNT` in the background with stdout+stderr in LOG,
# set SNAPFS_PID/SNAPFS_MNT/SNAPFS_LOG, and wait (SNAPFS_MOUNT_TIMEOUT) for
# the mount to show up in /proc/mounts.  On failure, print the log tail, make
# sure no daemon is left behind and return 1.
snapfs_start() {
    if (($# < 3)); then
        _snapfs_err "usage: snapfs_start STORE MNT LOG [EXTRA_MOUNT_ARGS...]"
        return 2
    fi
    local store=$1 mnt=$2 log=$3 bin t
    shift 3
    local -a opts=()
    if [[ -n ${SNAPFS_MOUNT_OPTS:-} ]]; then
        read -r -a opts <<<"$SNAPFS_MOUNT_OPTS"
    fi
    local timeout=${SNAPFS_MOUNT_TIMEOUT:-30}

    bin=$(snapfs_bin) || return 1
    if [[ -n $SNAPFS_PID ]] && _snapfs_pid_alive "$SNAPFS_PID"; then
        _snapfs_err "error: a snapfs daemon (pid $SNAPFS_PID) is already running from this shell"
        return 1
    fi
    mkdir -p -- "$store" "$mnt" "$(dirname -- "$log")" || return 1
    mnt=$(_snapfs_abspath "$mnt")
    if t=$(snapfs_mount_fstype "$mnt"); then
        _snapfs_err "error: $mnt is already a mount point (fstype $t)"
        return 1
    fi

    {
        printf '+'
        printf ' %q' "$bin" mount "$store" "$mnt" "${opts[@]}" "$@"
        printf '\n'
    } >"$log"
    "$bin" mount "$store" "$mnt" "${opts[@]}" "$@" >>"$log" 2>&1 </dev/null &
    SNAPFS_PID=$!
    SNAPFS_MNT=$mnt
    SNAPFS_LOG=$log

    local deadline
    deadline=$(($(_snapfs_now_ms) + timeout * 1000))
    while ! snapfs_is_mounted "$mnt" "$store"; do
        if ! _snapfs_pid_alive "$SNAPFS_PID"; then
            _snapfs_reap "$SNAPFS_PID"
            _snapfs_err "error: snapfs mount exited with status $_SNAPFS_RC before $mnt was mounted"
            _snapfs_log_tail "$log"
            SNAPFS_PID=
            return 1
        fi
        if (($(_snapfs_now_ms) >= deadline)); then
            _snapfs_err "error: $mnt did not appear in /proc/mounts as ${SNAPFS_FSTYPE:-fuse.snapfs} (or fuse from $store) within ${timeout}s"
            if t=$(snapfs_mount_fstype "$mnt"); then
                _snapfs_err "       (something is mounted there with fstype '$t')"
            fi
            _snapfs_log_tail "$log"
            kill -TERM "$SNAPFS_PID" 2>/dev/null || true
            SNAPFS_STOP_TIMEOUT=10 snapfs_stop "$mnt" >/dev/null 2>&1 || true
            return 1
        fi
        sleep 0.2
    done
    return 0
}

# snapfs_stop MNT
# Unmount MNT (if mounted) and wait, bounded by SNAPFS_STOP_TIMEOUT, for the
# daemon started by snapfs_start to exit.  Escalates to SIGTERM, SIGKILL and
# a lazy umount if needed.  Returns 0 only on a clean shutdown: unmounted
# and the daemon exited by itself with status 0.  Safe to call twice.
# After a deliberate `kill -9 "$SNAPFS_PID"` (crash tests) it still cleans
# up the dead mount (ENOTCONN) but returns 1 because the daemon's status is
# 137; callers that expect that can ignore the return value.
snapfs_stop() {
    if (($# != 1)); then
        _snapfs_err "usage: snapfs_stop MNT"
        return 2
    fi
    local mnt bin pid=${SNAPFS_PID:-} ok=0 i
    local timeout=${SNAPFS_STOP_TIMEOUT:-30}
    mnt=$(_snapfs_abspath "$1")

    # 1. Unmount.  Retry a few times: EBUSY is common right after a test
    #    closes its last file.
    if snapfs_mount_fstype "$mnt" >/dev/null; then
        for i in 1 2 3 4 5; do
            if bin=$(snapfs_bin 2>/dev/null) &&
                timeout 20 "$bin" umount "$mnt" >/dev/null 2>&1; then
                :
            elif timeout 20 fusermount3 -u "$mnt" >/dev/null 2>&1; then
                :
            else
                timeout 20 umount "$mnt" >/dev/null 2>&1 || true
            fi
            snapfs_mount_fstype "$mnt" >/dev/null || break
            if ((i == 5)); then
                _snapfs_err "error: could not unmount $mnt cleanly"
                ok=1
            fi
            sleep 1
        done
    fi

    # 2. Wait for the daemon to exit by itself.
    if [[ -n $pid ]]; then
        if ! _snapfs_wait_pid_exit "$pid" "$timeout"; then
            _snapfs_err "error: snapfs daemon (pid $pid) still running ${timeout}s after unmount; sending SIGTERM"
            ok=1
            kill -TERM "$pid" 2>/dev/null || true
            if ! _snapfs_wait_pid_exit "$pid" 10; then
                _snapfs_err "error: snapfs daemon (pid $pid) ignored SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                _snapfs_wait_pid_exit "$pid" 10 || true
            fi
        fi
        _snapfs_reap "$pid"
        # 127: not our child (started elsewhere) -> status unknown, ignore.
        if [[ $_SNAPFS_RC != 0 && $_SNAPFS_RC != 127 ]]; then
            _snapfs_err "error: snapfs daemon (pid $pid) exited with status $_SNAPFS_RC"
            ok=1
        fi
        SNAPFS_PID=
    fi

    # 3. Last resort: make sure nothing is left mounted.
    if snapfs_mount_fstype "$mnt" >/dev/null; then
        _snapfs_err "error: $mnt still mounted; lazy-unmounting it"
        ok=1
        timeout 20 fusermount3 -uz "$mnt" >/dev/null 2>&1 ||
            timeout 20 umount -l "$mnt" >/dev/null 2>&1 || true
    fi

    if ((ok != 0)) && [[ -n ${SNAPFS_LOG:-} ]]; then
        _snapfs_log_tail "$SNAPFS_LOG"
    fi
    return "$ok"
}
