#!/usr/bin/env bash
# Run the pjdfstest POSIX conformance suite (the Rust rewrite from crates.io:
# `cargo install --locked pjdfstest`, which needs libacl1-dev to build).
#
# Usage:
#   tools/pjdfstest.sh [MOUNT_DIR] [-- PATTERN...]
#
#   MOUNT_DIR  test this existing directory (created if missing), e.g. a
#              directory on ext4 for a baseline.  Without it, a fresh snapfs
#              store and mount point are made under a temp dir, `snapfs mount`
#              is started in the background and the suite runs inside it.
#   PATTERN    only run tests whose name contains PATTERN (pjdfstest filter),
#              e.g. `tools/pjdfstest.sh -- chmod rename::`.
#
# Output: every failed test (with the first lines of its panic message),
# every skipped test with pjdfstest's reason, the path of the full log, and
# as the very last line:  N passed, N failed, N skipped
# Exit status: 0 only if the suite ran and nothing failed.  If /dev/fuse is
# absent (snapfs mode only) it prints "SKIPPED: /dev/fuse absent" and exits 0.
#
# Environment:
#   PJDFSTEST_BIN       pjdfstest binary (default: from PATH or ~/.cargo/bin)
#   PJDFSTEST_FEATURES  opt-in features to enable (default:
#                       "posix_fallocate rename_ctime utime_now utimensat";
#                       `pjdfstest -l` lists them all)
#   PJDFSTEST_XFAIL     test names expected to fail (counted as skipped)
#   PJDFSTEST_NAPTIME   seconds slept between timestamp checks (default 0.01)
#   PJDFSTEST_USERS     the two unprivileged users used by the multi-user
#                       tests (default "nobody tests"; created if missing)
#   PJDFSTEST_TIMEOUT   seconds before the whole run is killed (default 3600)
#   PJDFSTEST_SECONDARY_FS  dir on another file system, for the EXDEV tests
#                       (default: picked automatically)
#   SNAPFS_*            see tools/lib-mount.sh (binary, mount options, timeouts)
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib-mount.sh source-path=SCRIPTDIR
. "$HERE/lib-mount.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

target=""
patterns=()
while (($#)); do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        patterns=("$@")
        break
        ;;
    -*)
        echo "error: unknown option $1" >&2
        usage >&2
        exit 2
        ;;
    *)
        if [[ -n $target ]]; then
            echo "error: only one MOUNT_DIR may be given" >&2
            exit 2
        fi
        target=$1
        ;;
    esac
    shift
done

if [[ -z $target ]]; then
    require_fuse || exit 0
fi

features=${PJDFSTEST_FEATURES-posix_fallocate rename_ctime utime_now utimensat}
naptime=${PJDFSTEST_NAPTIME:-0.01}
run_timeout=${PJDFSTEST_TIMEOUT:-3600}
read -r -a users <<<"${PJDFSTEST_USERS:-nobody tests}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapfs-pjdfstest.XXXXXX")
# The multi-user tests must be able to reach the mount point inside WORK.
chmod 0755 "$WORK"
LOG=$WORK/pjdfstest.log
RAW=$WORK/pjdfstest.raw
CONFIG=$WORK/pjdfstest.toml
RESULTS=$WORK/results.tsv
STORE=$WORK/store
MNT=$WORK/mnt
DAEMON_LOG=$WORK/snapfs.log

summary_printed=0
RUNNER_PID=
extra_failures=() # "name<TAB>why" for failures outside pjdfstest's own tests

# Called on any exit: stop the daemon if it is still up; if we die before
# printing the summary, make sure the run is not mistaken for a pass.
# shellcheck disable=SC2317  # invoked via trap
on_exit() {
    local rc=$?
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
        echo "pjdfstest did not complete (exit status $rc); logs in $WORK" >&2
        echo "0 passed, 1 failed"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# setup_fail MSG: the suite cannot run; report it as a failure and stop.
setup_fail() {
    echo "error: $*" >&2
    echo "FAILED: pjdfstest::setup ($*)"
    echo "logs: $WORK"
    summary_printed=1
    echo "0 passed, 1 failed"
    exit 1
}

find_pjdfstest() {
    if [[ -n ${PJDFSTEST_BIN:-} ]]; then
        [[ -x $PJDFSTEST_BIN ]] && printf '%s\n' "$PJDFSTEST_BIN" && return 0
        return 1
    fi
    command -v pjdfstest 2>/dev/null && return 0
    [[ -x $HOME/.cargo/bin/pjdfstest ]] && printf '%s\n' "$HOME/.cargo/bin/pjdfstest" && return 0
    return 1
}

# ensure_user NAME: make sure the user exists (creating it if we are root);
# print its primary group's name.
ensure_user() {
    local u=$1
    if ! getent passwd "$u" >/dev/null; then
        if ((EUID != 0)); then
            echo "error: user '$u' is missing and only root can create it" >&2
            return 1
        fi
        local -a grp=(--user-group)
        getent group "$u" >/dev/null && grp=(--gid "$u")
        useradd --system "${grp[@]}" --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "pjdfstest dummy user" "$u" >&2 ||
            return 1
        echo "created user $u" >&2
    fi
    id -gn "$u"
}

# pick_secondary_fs DIR: print a fresh directory on a file system other than
# DIR's (for the EXDEV tests), or nothing.
pick_secondary_fs() {
    local dev cand d
    dev=$(stat -c %d -- "$1")
    for cand in "$WORK" /dev/shm /run /var/tmp /tmp; do
        [[ -d $cand && -w $cand ]] || continue
        [[ $(stat -c %d -- "$cand") != "$dev" ]] || continue
        if [[ $cand == "$WORK" ]]; then
            d=$WORK/secondary-fs
            mkdir -p "$d"
        else
            d=$(mktemp -d "$cand/snapfs-pjdfstest-xdev.XXXXXX") || continue
            # outside WORK: remember to remove it after the run
            echo "$d" >>"$WORK/cleanup-dirs"
        fi
        chmod 0755 "$d"
        printf '%s\n' "$d"
        return 0
    done
}

# ---------------------------------------------------------------- setup
PJD=$(find_pjdfstest) ||
    setup_fail "pjdfstest not found; install it with: apt-get install libacl1-dev && cargo install --locked pjdfstest"

toml_users=""
for u in "${users[@]}"; do
    g=$(ensure_user "$u") || setup_fail "cannot set up dummy user '$u'"
    toml_users+="  [\"$u\", \"$g\"],"$'\n'
done
((${#users[@]} == 2)) || setup_fail "PJDFSTEST_USERS must name exactly two users"

{
    echo "# generated by tools/pjdfstest.sh"
    echo "[features]"
    for f in $features; do
        echo "$f = {}"
    done
    echo
    echo "[settings]"
    echo "naptime = $naptime"
    echo "allow_remount = false"
    printf 'expected_failures = ['
    for t in ${PJDFSTEST_XFAIL:-}; do printf '"%s", ' "$t"; done
    echo "]"
    echo
    echo "[dummy_auth]"
    echo "entries = ["
    printf '%s' "$toml_users"
    echo "]"
} >"$CONFIG"

if [[ -n $target ]]; then
    mkdir -p -- "$target" || setup_fail "cannot create $target"
    testdir=$(realpath -- "$target")
    what="directory $testdir ($(findmnt -n -o FSTYPE --target "$testdir" 2>/dev/null || stat -f -c %T -- "$testdir"))"
else
    snapfs_bin >/dev/null || setup_fail "snapfs is not built (cargo build --release, or set SNAPFS_BIN)"
    mkdir -p "$STORE" "$MNT"
    echo "starting snapfs: store $STORE, mount point $MNT, daemon log $DAEMON_LOG"
    # --allow-other: the multi-user tests switch to unprivileged uids, which
    # FUSE would otherwise refuse access to a root-owned mount.
    snapfs_start "$STORE" "$MNT" "$DAEMON_LOG" --allow-other || setup_fail "snapfs did not mount (see $DAEMON_LOG)"
    # Never test the bare mount-point directory by mistake.
    [[ $(stat -f -c %t -- "$MNT") == 65735546 ]] ||
        setup_fail "$MNT is not a FUSE mount after snapfs_start"
    testdir=$MNT
    what="snapfs mounted at $MNT (pid $SNAPFS_PID)"
fi

secondary=${PJDFSTEST_SECONDARY_FS:-$(pick_secondary_fs "$testdir")}
sec_args=()
[[ -n $secondary ]] && sec_args=(-s "$secondary")

echo "pjdfstest: $PJD ($("$PJD" --version 2>/dev/null || echo unknown version))"
echo "target:    $what"
echo "features:  ${features:-none}; naptime $naptime s; users ${users[*]}"
echo "secondary: ${secondary:-none (EXDEV tests will be skipped)}"
echo "logs:      $WORK  (full output: $LOG)"
echo "running pjdfstest (timeout ${run_timeout}s)..."

# ---------------------------------------------------------------- run
start=$SECONDS
status=0
# Run in the background and `wait`, so that INT/TERM reach our trap at once.
(cd / && NO_COLOR=1 CLICOLOR=0 exec timeout -k 30 "$run_timeout" \
    "$PJD" -c "$CONFIG" -p "$testdir" "${sec_args[@]}" -- "${patterns[@]}") \
    >"$RAW" 2>&1 &
RUNNER_PID=$!
wait "$RUNNER_PID" || status=$?
RUNNER_PID=
elapsed=$((SECONDS - start))
# Strip colour codes in case the binary ignores NO_COLOR.
sed 's/\x1b\[[0-9;]*m//g' "$RAW" >"$LOG"
rm -f "$RAW"
echo "pjdfstest finished in ${elapsed}s with exit status $status"

if [[ -z $target ]]; then
    if ! _snapfs_pid_alive "$SNAPFS_PID"; then
        extra_failures+=("snapfs::daemon_alive"$'\t'"the snapfs daemon died during the run (see $DAEMON_LOG)")
    fi
    if ! snapfs_stop "$MNT"; then
        extra_failures+=("snapfs::clean_shutdown"$'\t'"unmount/daemon exit was not clean (see $DAEMON_LOG)")
    fi
fi
if [[ -s $WORK/cleanup-dirs ]]; then
    xargs -r -d '\n' rm -rf -- <"$WORK/cleanup-dirs"
    rm -f "$WORK/cleanup-dirs"
fi

# ---------------------------------------------------------------- report
# results.tsv: KIND<TAB>NAME<TAB>DETAIL with KIND one of
#   P pass, F fail, U unexpected pass, X expected failure, S skip, T summary
awk '
function flush() {
    if (cur != "")
        printf "%s\t%s\t%s\n", kind, cur, detail
    cur = ""; kind = ""; detail = ""; n = 0; bt = 0
}
/^[^[:space:]]+[[:space:]]+(ok|FAILED|skipped|PASSED UNEXPECTEDLY|failed as expected)$/ {
    flush()
    if ($NF == "ok") print "P\t" $1 "\t"
    else if ($NF == "UNEXPECTEDLY") print "U\t" $1 "\tpassed but listed in PJDFSTEST_XFAIL"
    else if ($NF == "expected") print "X\t" $1 "\texpected failure (PJDFSTEST_XFAIL)"
    else { cur = $1; kind = ($NF == "FAILED") ? "F" : "S" }
    next
}
/^Summary:/ { flush(); print "T\t" $0 "\t"; next }
cur != "" {
    line = $0
    sub(/^[[:space:]]+/, "", line); sub(/[[:space:]]+$/, "", line)
    if (line ~ /^Backtrace:/) bt = 1
    if (line == "" || bt || n >= 4) next
    detail = (detail == "") ? line : detail " | " line
    n++
}
END { flush() }
' "$LOG" >"$RESULTS"

count() { awk -F'\t' -v k="$1" '$1 == k { n++ } END { print n + 0 }' "$RESULTS"; }
n_pass=$(count P)
n_fail=$(($(count F) + $(count U)))
n_skip=$(($(count S) + $(count X)))

summary=$(awk -F'\t' '$1 == "T" { print $2 }' "$RESULTS" | tail -n 1)
if [[ -z $summary ]]; then
    if ((status == 124 || status == 137)); then
        why="timed out after ${run_timeout}s; the test after the last one in $LOG hung"
    else
        why="no summary line; pjdfstest exit status $status; see $LOG"
    fi
    extra_failures+=("pjdfstest::run"$'\t'"$why")
else
    # Cross-check our parse against pjdfstest's own totals.
    read -r s_fail s_skip s_pass s_xfail < <(sed -E \
        's/^Summary: ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed, ([0-9]+) expected failures.*/\1 \2 \3 \4/' \
        <<<"$summary")
    if [[ "$s_fail $((s_skip + s_xfail)) $s_pass" != "$n_fail $n_skip $n_pass" ]]; then
        extra_failures+=("pjdfstest::parse"$'\t'"parsed $n_pass/$n_fail/$n_skip pass/fail/skip but pjdfstest says: $summary")
    fi
    if ((status != 0 && n_fail == 0)); then
        extra_failures+=("pjdfstest::run"$'\t'"pjdfstest exited with status $status although no test failed")
    fi
fi
if ((n_pass + n_fail + n_skip == 0)); then
    extra_failures+=("pjdfstest::run"$'\t'"no test ran (patterns: ${patterns[*]:-none})")
fi

if ((n_skip > 0)); then
    echo
    echo "Skipped tests ($n_skip):"
    awk -F'\t' '$1 == "S" || $1 == "X" { printf "  SKIPPED %s: %s\n", $2, $3 }' "$RESULTS"
    echo "Skip reasons:"
    awk -F'\t' '$1 == "S" || $1 == "X" { c[$3]++ } END { for (r in c) printf "  %4d  %s\n", c[r], r }' \
        "$RESULTS" | sort -k1,1nr
fi

n_fail=$((n_fail + ${#extra_failures[@]}))
if ((n_fail > 0)); then
    echo
    echo "Failed tests ($n_fail):"
    awk -F'\t' '$1 == "F" || $1 == "U" { printf "  FAILED %s: %s\n", $2, $3 }' "$RESULTS"
    for e in "${extra_failures[@]}"; do
        printf '  FAILED %s: %s\n' "${e%%$'\t'*}" "${e#*$'\t'}"
    done
fi

echo
[[ -n $summary ]] && echo "pjdfstest's own $summary"
echo "full log: $LOG"
if [[ -z $target ]]; then
    echo "snapfs daemon log: $DAEMON_LOG"
    if ((n_fail == 0)); then
        rm -rf -- "$STORE"
        rmdir -- "$MNT" 2>/dev/null || true
    else
        echo "store kept for inspection: $STORE"
    fi
fi
summary_printed=1
echo "$n_pass passed, $n_fail failed, $n_skip skipped"
if ((n_fail > 0)); then
    exit 1
fi
exit 0
