#!/usr/bin/env bash
# snapfs benchmark harness: a plain directory on the same disk ("native") vs a
# snapfs mount, warm-up + N alternating runs, medians and snapfs/native ratio.
# I/O itself is done by tools/bench_io.py (python3, stdlib only).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/bench.sh {p1|read|p7|dedup|all} [options]

  p1     write SIZE MiB in 1 MiB write()s + fsync (p1-write), then SIZE MiB as
         4 files from 2 concurrent writers, each file fsynced (p1-multi)
  read   read a SIZE MiB file in 1 MiB reads after dropping caches (P2; --readers N:
         N processes, each its own 1/N of the file; side `snapshot`: the same file
         read from a read-only mount of a snapshot taken after it was written)
  p7     create FILES files of 4 KiB in one directory (no fsync; files/s)
  dedup  snapfs only: write the same SIZE MiB twice, compare `snapfs stat`
  all    p1, read, p7, dedup

options:
  --runs N          timed runs per side after one warm-up run (default 5)
  --size-mib N      file size for p1/read/dedup (default 1024)
  --files N         file count for p7 (default 10000)
  --native-only     skip the snapfs side (harness smoke test)
  --sides LIST      comma-separated sides, native first (default native,snapfs); also
                    copy and passthrough: benches/fuse_ceiling.rs, the FUSE transport's own
                    ceiling (needs BENCH_CEILING=its binary, `cargo bench --bench
                    fuse_ceiling --no-run` prints the path)
  --allow-tmpfs     allow --workdir on tmpfs (/dev/shm: the software's ceiling, no disk)
  --threads N       pass --threads N to `snapfs mount`
  --readers N       read: N concurrent reader processes (default 1)
  --workdir DIR     where test dirs and stores live (default /var/tmp/snapfs-bench)
  --results DIR     results dir (default WORKDIR/results/YYYYmmdd-HHMMSS)
env: SNAPFS_BIN (default ${CARGO_TARGET_DIR:-$HOME/.cache/snapfs/target}/release/snapfs),
     SNAPFS_MOUNT_OPTS (extra `snapfs mount` arguments, e.g. "--chunk-size 4194304"),
     BENCH_DATA=bf16 (checkpoint-like data, zstd -1 saves about 12%; default incompressible),
     BENCH_READAHEAD_KB=N (set the snapfs mount's read_ahead_kb after mounting; read bench),
     SNAPFS_MAX_WRITE / SNAPFS_WRITEBACK_CACHE (passed to the daemon; docs/benchmarks.md)
Must run as root (drop_caches). Refuses to run with less than 8 GiB free.
EOF
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CMDLINE=$(printf '%q ' "$0" "$@")
RUNS=5 SIZE_MIB=1024 FILES=10000 NATIVE_ONLY=0 THREADS="" SIDES_ARG="" ALLOW_TMPFS=0 READERS=1
WORK=/var/tmp/snapfs-bench RESULTS=""
SNAPFS="(native only)"
MIN_FREE_GIB=8
# snapfs_bin, require_fuse, snapfs_start, snapfs_stop (honour SNAPFS_BIN, SNAPFS_FSTYPE)
# shellcheck source=SCRIPTDIR/lib-mount.sh
. "$HERE/lib-mount.sh"

die() { echo "bench.sh: $*" >&2; exit 1; }

CMD=${1:-}
[[ $CMD =~ ^(p1|read|p7|dedup|all)$ ]] || { usage >&2; exit 2; }
shift
while (($#)); do
    case $1 in
        --runs) RUNS=$2; shift ;;
        --size-mib) SIZE_MIB=$2; shift ;;
        --files) FILES=$2; shift ;;
        --native-only) NATIVE_ONLY=1 ;;
        --threads) THREADS=$2; shift ;;
        --readers) READERS=$2; shift ;;
        --sides) SIDES_ARG=$2; shift ;;
        --allow-tmpfs) ALLOW_TMPFS=1 ;;
        --workdir) WORK=$2; shift ;;
        --results) RESULTS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
[[ $RUNS =~ ^[1-9][0-9]*$ && $SIZE_MIB =~ ^[1-9][0-9]*$ && $FILES =~ ^[1-9][0-9]*$ ]] ||
    die "--runs, --size-mib and --files must be positive integers"
((SIZE_MIB % 4 == 0)) || die "--size-mib must be a multiple of 4 (p1-multi uses 4 files)"
[[ -z $THREADS || $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
[[ $READERS =~ ^[1-9][0-9]*$ ]] || die "--readers must be a positive integer"

# ---------------------------------------------------------------- checks ----
((EUID == 0)) || die "must run as root (needs /proc/sys/vm/drop_caches)"
command -v python3 >/dev/null || die "python3 not found"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
fstype=$(df --output=fstype "$WORK" | tail -n1 | tr -d ' ')
[[ $fstype != tmpfs && $fstype != ramfs ]] || ((ALLOW_TMPFS)) ||
    die "$WORK is on $fstype; the native baseline must be on the real disk (use --workdir)"
# A snapfs store may keep deleted data until compaction: allow (RUNS+2) files x2.
need_mib=$(((RUNS + 2) * SIZE_MIB * 2))
((need_mib > MIN_FREE_GIB * 1024)) || need_mib=$((MIN_FREE_GIB * 1024))
avail_mib=$(($(df -B1M --output=avail "$WORK" | tail -n1)))
((avail_mib >= need_mib)) ||
    die "only $avail_mib MiB free on $WORK, need at least $need_mib MiB; refusing to run"

SIDES=(native snapfs)
if ((NATIVE_ONLY)); then
    SIDES=(native)
elif [[ -n $SIDES_ARG ]]; then
    IFS=, read -r -a SIDES <<<"$SIDES_ARG"
    [[ ${SIDES[0]} == native ]] || die "--sides must start with native (the baseline)"
fi
has_side() { local s; for s in "${SIDES[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }
for side in "${SIDES[@]}"; do
    [[ $side =~ ^(native|snapfs|snapshot|copy|passthrough)$ ]] || die "unknown side: $side"
    [[ $side != snapshot || ($CMD == read && " ${SIDES[*]} " == *" snapfs "*) ]] ||
        die "side snapshot: only for read, and only with side snapfs (it reads snapfs's file)"
    [[ ! $side =~ ^(copy|passthrough)$ || -x ${BENCH_CEILING:-} ]] ||
        die "side $side needs BENCH_CEILING=path of the fuse_ceiling bench binary"
done
if has_side snapfs; then
    SNAPFS=$(snapfs_bin) || die "no snapfs binary (build it, set SNAPFS_BIN, or use --native-only)"
fi
((${#SIDES[@]} == 1)) || require_fuse >/dev/null || die "/dev/fuse missing"
NATIVE_ONLY=0
has_side snapfs || NATIVE_ONLY=1   # from here on: "no snapfs mount"

RESULTS=${RESULTS:-$WORK/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
TSV=$RESULTS/results.tsv
DEDUP_FAILED=0
NONCE=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')   # makes every invocation's data new

io() { python3 "$HERE/bench_io.py" "$@"; }
seed() { echo "$NONCE-$1-$2-$3"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

{
    echo "command: $CMDLINE"
    echo "date:    $(date -Is)"
    echo "git:     $(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo none)"
    echo "snapfs:  $SNAPFS"
    echo "runs=$RUNS size_mib=$SIZE_MIB files=$FILES threads=${THREADS:-default} readers=$READERS workdir=$WORK"
    echo "SNAPFS_MOUNT_OPTS=${SNAPFS_MOUNT_OPTS:-}"
    echo "BENCH_DATA=${BENCH_DATA:-random}"
    echo "sides: ${SIDES[*]}"
    echo "SNAPFS_MAX_WRITE=${SNAPFS_MAX_WRITE:-} SNAPFS_WRITEBACK_CACHE=${SNAPFS_WRITEBACK_CACHE:-} BENCH_READAHEAD_KB=${BENCH_READAHEAD_KB:-}"
    [[ -z ${BENCH_CEILING:-} ]] || echo "ceiling: $BENCH_CEILING"
    echo; echo "\$ uname -a"; uname -a
    echo "\$ nproc"; nproc
    echo "\$ free -g"; free -g
    echo "\$ lscpu | grep 'Model name'"; lscpu | grep 'Model name' || true
    echo "\$ df -T $WORK"; df -T "$WORK"
    echo "\$ uptime"; uptime
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt"
echo

# ---------------------------------------------------------- snapfs mount ----
snap_mount() {   # STORE MNT LOG (one mount at a time: lib-mount.sh tracks one pid)
    snapfs_start "$1" "$2" "$3" ${THREADS:+--threads "$THREADS"} ||
        die "snapfs mount $1 $2 failed (log: $3)"
    if [[ -n ${BENCH_READAHEAD_KB:-} ]]; then
        local dev
        dev=$(mountpoint -d "$2") || die "mountpoint -d $2 failed"
        echo "$BENCH_READAHEAD_KB" >"/sys/class/bdi/$dev/read_ahead_kb" ||
            die "cannot set read_ahead_kb of $2"
    fi
}

declare -A CEIL_PID=()   # side -> pid of its fuse_ceiling daemon
ceil_mount() {   # SIDE BACKING MNT LOG
    local side=$1 i
    mkdir -p "$2" "$3"
    "$BENCH_CEILING" "$2" "$3" ${THREADS:+--threads "$THREADS"} \
        $([[ $side == passthrough ]] && echo --passthrough) 2>"$4" &
    CEIL_PID[$side]=$!
    for ((i = 0; i < 100; i++)); do
        mountpoint -q "$3" && return 0
        kill -0 "${CEIL_PID[$side]}" 2>/dev/null || break
        sleep 0.1
    done
    die "fuse_ceiling $side did not mount $3 (log: $4)"
}

ceil_umount() {   # SIDE MNT
    umount "$2" || umount -l "$2" || true
    wait "${CEIL_PID[$1]}" 2>/dev/null || true
    unset "CEIL_PID[$1]"
}

snap_umount() {   # MNT
    snapfs_stop "$1" ||
        echo "bench.sh: WARNING: unclean snapfs shutdown of $1" | tee -a "$RESULTS/warnings.txt" >&2
}

cleanup() {
    if [[ -n ${SNAPFS_PID:-} ]]; then snapfs_stop "$SNAPFS_MNT" || true; fi
    local m
    for m in "$WORK"/mnt-copy-* "$WORK"/mnt-passthrough-* "$WORK"/mnt-read-snap; do
        ! mountpoint -q "$m" 2>/dev/null || umount -l "$m" || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------- per-bench dirs ---
declare -A DIR=()      # side -> directory the benchmark writes into

setup() {   # BENCH: fresh native dir and fresh snapfs store + mount
    local b=$1
    rm -rf "$WORK/native-$b" "$WORK/store-$b"
    mkdir -p "$WORK/native-$b"
    DIR[native]=$WORK/native-$b
    if ((!NATIVE_ONLY)); then
        snap_mount "$WORK/store-$b" "$WORK/mnt-$b" "$RESULTS/snapfs-$b.log"
        DIR[snapfs]=$WORK/mnt-$b
    fi
    local side
    for side in copy passthrough; do
        has_side "$side" || continue
        rm -rf "$WORK/back-$side-$b"
        ceil_mount "$side" "$WORK/back-$side-$b" "$WORK/mnt-$side-$b" "$RESULTS/$side-$b.log"
        DIR[$side]=$WORK/mnt-$side-$b
    done
}

teardown() {   # BENCH: record store stats, unmount, delete everything
    local b=$1
    if ((!NATIVE_ONLY)); then
        sync
        "$SNAPFS" stat "$WORK/mnt-$b" >"$RESULTS/stat-$b.txt" 2>&1 || true
        snap_umount "$WORK/mnt-$b"
        du -sb "$WORK/store-$b" >>"$RESULTS/stat-$b.txt"
        rm -rf "$WORK/store-$b"
        rmdir "$WORK/mnt-$b" 2>/dev/null || true
    fi
    local side
    for side in copy passthrough; do
        has_side "$side" || continue
        ceil_umount "$side" "$WORK/mnt-$side-$b"
        rm -rf "$WORK/back-$side-$b"
        rmdir "$WORK/mnt-$side-$b" 2>/dev/null || true
    done
    rm -rf "$WORK/native-$b"
}

alternate() {   # BENCH FN: warm-up, then RUNS x (native, snapfs); FN SIDE DIR RUN
    local b=$1 fn=$2 run side
    echo "== $b: warm-up + $RUNS alternating runs (${SIDES[*]})"
    for run in warmup $(seq 1 "$RUNS"); do
        for side in "${SIDES[@]}"; do
            "$fn" "$b" "$side" "${DIR[$side]}" "$run"
        done
    done
    io summarize "$TSV" --bench "$b"
}

# ------------------------------------------------------------- benchmarks ---
# CPU seconds (user + system) the side's FUSE daemon has used so far; 0 on the native side.
daemon_cpu() {
    local pid=""
    case $1 in
        snapfs) pid=${SNAPFS_PID:-} ;;
        copy|passthrough) pid=${CEIL_PID[$1]:-} ;;
    esac
    [[ -n $pid ]] || { echo 0; return; }
    awk -v tck="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / tck }' \
        "/proc/$pid/stat"
}

p1_write_once() {
    local b=$1 side=$2 dir=$3 run=$4 cpu0 cpu1
    sync
    cpu0=$(daemon_cpu "$side")
    io write "$dir/checkpoint.bin" --mib "$SIZE_MIB" --seed "$(seed "$b" "$side" "$run")" \
        --out "$TSV" --bench "$b" --side "$side" --run "$run"
    cpu1=$(daemon_cpu "$side")
    # The daemon's CPU from the first write to fsync's return, per GiB written.
    [[ $side == native ]] ||
        awk -v a="$cpu0" -v b="$cpu1" -v m="$SIZE_MIB" -v r="$run" -v bn="$b" -v sd="$side" \
            'BEGIN { printf "%s\t%s\t%s\t%.3f\n", bn, sd, r, (b - a) * 1024 / m }' >>"$RESULTS/cpu.tsv"
    rm -f "$dir/checkpoint.bin"
    sync
}

cpu_summary() {   # BENCH: median daemon CPU-s/GiB over the timed runs, per side
    [[ -f $RESULTS/cpu.tsv ]] || return 0
    local side
    for side in "${SIDES[@]}"; do
        [[ $side != native ]] || continue
        awk -F'\t' -v bn="$1" -v sd="$side" '$1 == bn && $2 == sd && $3 != "warmup" { print $4 }' \
            "$RESULTS/cpu.tsv" | sort -n |
            awk '{ v[NR] = $1 } END { if (NR) printf "%s %s: daemon CPU per GiB written (to fsync): runs %d, median %.3f s/GiB (min %.3f, max %.3f)\n", bn, sd, NR, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[1], v[NR] }' bn="$1" sd="$side" |
            tee -a "$RESULTS/cpu-summary.txt"
    done
}

p1_multi_once() {
    local b=$1 side=$2 dir=$3 run=$4 cpu0 cpu1
    sync
    cpu0=$(daemon_cpu "$side")
    io pwrite "$dir" --mib "$SIZE_MIB" --files 4 --writers 2 --seed "$(seed "$b" "$side" "$run")" \
        --out "$TSV" --bench "$b" --side "$side" --run "$run"
    cpu1=$(daemon_cpu "$side")
    [[ $side == native ]] ||
        awk -v a="$cpu0" -v b="$cpu1" -v m="$SIZE_MIB" -v r="$run" -v bn="$b" -v sd="$side" \
            'BEGIN { printf "%s\t%s\t%s\t%.3f\n", bn, sd, r, (b - a) * 1024 / m }' >>"$RESULTS/cpu.tsv"
    rm -f "$dir"/part*.bin
    sync
}

read_once() {
    local b=$1 side=$2 dir=$3 run=$4
    drop_caches
    io read "$dir/checkpoint.bin" --expect-mib "$SIZE_MIB" --readers "$READERS" \
        --out "$TSV" --bench "$b" --side "$side" --run "$run"
}

p7_once() {
    local b=$1 side=$2 dir=$3 run=$4
    sync
    io smallfiles "$dir/p7-$run" --count "$FILES" --size 4096 --seed "$(seed "$b" "$side" "$run")" \
        --out "$TSV" --bench "$b" --side "$side" --run "$run"
    sync   # flush outside the timed region
    rm -rf "${dir:?}/p7-$run"
    sync
}

bench_p1() {
    setup p1-write; alternate p1-write p1_write_once; cpu_summary p1-write; teardown p1-write
    setup p1-multi; alternate p1-multi p1_multi_once; cpu_summary p1-multi; teardown p1-multi
}

bench_read() {
    local side
    setup read
    echo "== read: writing the ${SIZE_MIB} MiB source file on each side (untimed)"
    for side in "${SIDES[@]}"; do
        [[ $side != snapshot ]] || continue
        io write "${DIR[$side]}/checkpoint.bin" --mib "$SIZE_MIB" --seed "$(seed read "$side" src)" \
            --bench read-src --side "$side" --run src
    done
    if has_side snapshot; then
        # The snapfs side's file, read through a read-only mount of a snapshot of it (served
        # by the running daemon): the same chunks, through a view of an older epoch.
        "$SNAPFS" snapshot create "${DIR[snapfs]}" p2 >/dev/null || die "snapshot create failed"
        mkdir -p "$WORK/mnt-read-snap"
        "$SNAPFS" mount "$WORK/store-read" "$WORK/mnt-read-snap" --snapshot p2 \
            >"$RESULTS/snapshot-mount.log" 2>&1 || die "snapshot mount failed (log: $RESULTS/snapshot-mount.log)"
        mountpoint -q "$WORK/mnt-read-snap" || die "the snapshot mount is not mounted"
        DIR[snapshot]=$WORK/mnt-read-snap
    fi
    alternate read read_once
    if has_side snapshot; then
        umount "$WORK/mnt-read-snap" || umount -l "$WORK/mnt-read-snap" || true
        rmdir "$WORK/mnt-read-snap" 2>/dev/null || true
    fi
    teardown read
}

bench_p7() {
    setup p7; alternate p7 p7_once; teardown p7
}

dedup_stat() {   # LABEL: snapfs stat --json + du of the store, into results
    local label=$1 f=$RESULTS/dedup-stat-$1.json stored logical unique du
    sync
    "$SNAPFS" stat "$WORK/mnt-dedup" --json >"$f"
    read -r stored logical unique < <(io stored-bytes "$f")
    du=$(du -sb "$WORK/store-dedup" | cut -f1)
    printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$logical" "$unique" "$stored" "$du" >>"$RESULTS/dedup.tsv"
    echo "  -- snapfs stat after: $label"
    "$SNAPFS" stat "$WORK/mnt-dedup" | sed 's/^/     /'
    echo "     du -sb store: $du"
    DEDUP_STORED[$label]=$stored DEDUP_DU[$label]=$du
}

bench_dedup() {
    if ((NATIVE_ONLY)); then echo "== dedup: skipped (snapfs only)"; return 0; fi
    declare -gA DEDUP_STORED=() DEDUP_DU=()
    local s b=dedup size=$((SIZE_MIB * 1048576)) verdict
    s=$(seed dedup snapfs content)
    rm -rf "$WORK/store-dedup"
    snap_mount "$WORK/store-dedup" "$WORK/mnt-dedup" "$RESULTS/snapfs-dedup.log"
    printf 'label\tlogical_bytes\tunique_bytes\tstored_bytes\tdu_store_bytes\n' >"$RESULTS/dedup.tsv"
    echo "== dedup: same ${SIZE_MIB} MiB content written twice on snapfs"
    dedup_stat empty
    io write "$WORK/mnt-dedup/copy1.bin" --mib "$SIZE_MIB" --seed "$s" \
        --out "$RESULTS/dedup-writes.tsv" --bench dedup --side snapfs --run copy1
    dedup_stat copy1
    io write "$WORK/mnt-dedup/copy2.bin" --mib "$SIZE_MIB" --seed "$s" \
        --out "$RESULTS/dedup-writes.tsv" --bench dedup --side snapfs --run copy2
    dedup_stat copy2
    cmp "$WORK/mnt-dedup/copy1.bin" "$WORK/mnt-dedup/copy2.bin" || die "dedup: copies differ"
    if [[ ${DEDUP_STORED[copy1]} == NA || ${DEDUP_STORED[copy2]} == NA ]]; then
        verdict="UNKNOWN (no stored-bytes field found in stat --json)"
    elif ((DEDUP_STORED[copy2] - DEDUP_STORED[copy1] < size / 10)); then
        verdict="PASS (second copy added < 10% of its size to stored bytes)"
    else
        DEDUP_FAILED=1
        verdict="FAIL (second copy added $((DEDUP_STORED[copy2] - DEDUP_STORED[copy1])) stored bytes)"
    fi
    echo "  stored bytes: after copy1 ${DEDUP_STORED[copy1]}, after copy2 ${DEDUP_STORED[copy2]}"
    echo "  du -sb store: after copy1 ${DEDUP_DU[copy1]}, after copy2 ${DEDUP_DU[copy2]}"
    echo "  dedup: $verdict" | tee "$RESULTS/dedup-verdict.txt"
    "$SNAPFS" stat "$WORK/mnt-dedup" >"$RESULTS/stat-$b.txt" 2>&1 || true
    snap_umount "$WORK/mnt-dedup"
    rm -rf "$WORK/store-dedup"
    rmdir "$WORK/mnt-dedup" 2>/dev/null || true
}

case $CMD in
    p1) bench_p1 ;;
    read) bench_read ;;
    p7) bench_p7 ;;
    dedup) bench_dedup ;;
    all) bench_p1; bench_read; bench_p7; bench_dedup ;;
esac

if [[ -f $TSV || -f $RESULTS/dedup.tsv ]]; then
    {
        echo "# snapfs benchmark results"; echo
        echo '```'; cat "$RESULTS/env.txt"; echo '```'; echo
        [[ ! -f $TSV ]] || io summarize "$TSV" --json "$RESULTS/summary.json"
        if [[ -f $RESULTS/dedup.tsv ]]; then
            echo "### dedup"; echo; echo '```'
            cat "$RESULTS/dedup.tsv" "$RESULTS/dedup-writes.tsv" "$RESULTS/dedup-verdict.txt"
            echo '```'
        fi
    } >"$RESULTS/summary.md"
fi
echo "results: $RESULTS (results.tsv, summary.md, summary.json, env.txt)"
((!DEDUP_FAILED)) || die "dedup check FAILED (see $RESULTS/dedup.tsv)"
