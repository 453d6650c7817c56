#!/usr/bin/env bash
# A real S3 server (Garage, single node) on loopback for snapfs's replication tests.
#   tools/garage.sh install       build Garage once into $SNAPFS_CACHE/garage/bin (10-20 min)
#   tools/garage.sh start DIR     start a server with all its state in DIR, then write DIR/env;
#                                 if DIR already holds a config, reuse it (same ports, keys, data)
#   tools/garage.sh stop DIR      stop it: TERM, then KILL after a timeout; idempotent
#   tools/garage.sh restart DIR   stop, then start again with the same config, keys and data
#   tools/garage.sh status DIR    exit 0 if the server of DIR is running
#   tools/garage.sh selftest      start one in a temp dir; signed PUT/GET/LIST/DELETE; restart
# DIR/env holds `export` lines for the tests: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_REGION, AWS_DEFAULT_REGION, SNAPFS_TEST_S3_ENDPOINT, SNAPFS_TEST_S3_BUCKET,
# SNAPFS_TEST_GARAGE_DIR and SNAPFS_TEST_GARAGE_SH (this script, to stop/start it from a test).
# Everything listens on 127.0.0.1 only. GARAGE_START_TIMEOUT (s, default 60) bounds `start`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/env.sh
. "$here/env.sh"

GARAGE_VERSION=2.5.0
GARAGE_ROOT="$SNAPFS_CACHE/garage"
GARAGE_BIN="$GARAGE_ROOT/bin/garage"
BUCKET=snapfs-test

die() { echo "garage.sh: $*" >&2; exit 1; }
say() { echo "garage.sh: $*" >&2; }
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# curl straight to loopback, never through a proxy, bounded in time.
lcurl() { curl --noproxy '*' --silent --max-time 5 "$@"; }

installed() {
  [ -x "$GARAGE_BIN" ] && "$GARAGE_BIN" --version 2>/dev/null | grep -q "$GARAGE_VERSION"
}

cmd_install() {
  if installed; then
    say "$("$GARAGE_BIN" --version | head -n1) already in $GARAGE_BIN"
    return 0
  fi
  # Garage's default features bundle libsodium, SQLite and zstd: the build needs a C
  # toolchain and make, nothing else from the system. curl and python3 serve start/selftest.
  local need=() p
  for p in gcc libc6-dev make pkg-config curl python3; do
    have_pkg "$p" || need+=("$p")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    say "installing ${need[*]}"
    local sudo=
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  echo "setup: cargo install garage $GARAGE_VERSION (about 10-20 minutes, once)"
  mkdir -p "$GARAGE_ROOT"
  # Its own target directory, so the build never evicts snapfs's cache; removed afterwards.
  CARGO_TARGET_DIR="$SNAPFS_CACHE/garage-target" \
    cargo install garage --version "$GARAGE_VERSION" --locked --root "$GARAGE_ROOT"
  installed || die "the installed $GARAGE_BIN does not run or is not version $GARAGE_VERSION"
  rm -rf "$SNAPFS_CACHE/garage-target"
  say "$("$GARAGE_BIN" --version | head -n1) installed in $GARAGE_BIN"
}

# Three free TCP ports on 127.0.0.1, chosen by the kernel.
free_ports() {
  python3 - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Whether pid is alive; a zombie (exited, not yet reaped by its new parent) is not.
alive() {
  local state
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# The pid of DIR's server if it is running (and really is that server), else nothing.
running_pid() {
  local dir=$1 pid
  [ -f "$dir/garage.pid" ] || return 1
  pid=$(cat "$dir/garage.pid")
  [ -n "$pid" ] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/garage.toml" || return 1
  echo "$pid"
}

write_env() {
  local dir=$1
  {
    echo "# Written by tools/garage.sh start; source it: . $dir/env"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "export AWS_REGION=garage"
    echo "export AWS_DEFAULT_REGION=garage"
    echo "export SNAPFS_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
    echo "export SNAPFS_TEST_S3_BUCKET=$BUCKET"
    printf 'export SNAPFS_TEST_GARAGE_DIR=%q\n' "$dir"
    printf 'export SNAPFS_TEST_GARAGE_SH=%q\n' "$here/garage.sh"
  } >"$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
}

cmd_start() {
  [ $# = 1 ] || die "usage: garage.sh start DIR"
  installed || die "Garage $GARAGE_VERSION is not installed; run tools/garage.sh install"
  mkdir -p "$1"
  local dir pid
  dir=$(cd "$1" && pwd)
  case "$dir" in *[\"\\\ ]* | *"'"*) die "DIR must not contain quotes, backslashes or spaces: $dir" ;; esac
  chmod 700 "$dir"
  if [ -f "$dir/state" ]; then
    # shellcheck source=/dev/null
    . "$dir/state"  # S3_PORT RPC_PORT ADMIN_PORT ACCESS_KEY SECRET_KEY BUCKET
  else
    read -r S3_PORT RPC_PORT ADMIN_PORT < <(free_ports)
    ACCESS_KEY="GK$(hex 12)"
    SECRET_KEY=$(hex 32)
    local rpc_secret admin_token
    rpc_secret=$(hex 32)
    admin_token=$(hex 32)
    mkdir -p "$dir/meta" "$dir/data"
    (
      umask 077
      cat >"$dir/garage.toml" <<EOF
# Written by tools/garage.sh start: one node, loopback only.
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_bind_outgoing = true
rpc_secret = "$rpc_secret"

[s3_api]
api_bind_addr = "127.0.0.1:$S3_PORT"
s3_region = "garage"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$admin_token"
EOF
      cat >"$dir/state.tmp" <<EOF
S3_PORT=$S3_PORT
RPC_PORT=$RPC_PORT
ADMIN_PORT=$ADMIN_PORT
ACCESS_KEY=$ACCESS_KEY
SECRET_KEY=$SECRET_KEY
BUCKET=$BUCKET
EOF
      mv "$dir/state.tmp" "$dir/state"
    )
  fi

  if pid=$(running_pid "$dir"); then
    say "already running (pid $pid) on 127.0.0.1:$S3_PORT"
  else
    # Fail clearly if another process took a port since the config was written.
    local port
    for port in "$S3_PORT" "$RPC_PORT" "$ADMIN_PORT"; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "127.0.0.1:$port (from $dir/garage.toml) is already in use by another process"
      fi
    done
    echo "==== start $(date -u +%FT%TZ)" >>"$dir/garage.log"
    rm -f "$dir/garage.pid"
    # In a session of its own, so a terminal's hangup or Ctrl-C does not reach it (Garage
    # shuts down on SIGHUP); the inner shell records its own pid, then execs Garage in it.
    # shellcheck disable=SC2016  # expanded by the inner shell
    GARAGE_DEFAULT_ACCESS_KEY=$ACCESS_KEY GARAGE_DEFAULT_SECRET_KEY=$SECRET_KEY \
      GARAGE_DEFAULT_BUCKET=$BUCKET RUST_LOG=${RUST_LOG:-garage=info} NO_COLOR=1 \
      setsid sh -c 'echo $$ >"$1/garage.pid.tmp" && mv "$1/garage.pid.tmp" "$1/garage.pid" &&
        exec "$2" -c "$1/garage.toml" server --single-node --default-bucket' \
      sh "$dir" "$GARAGE_BIN" </dev/null >>"$dir/garage.log" 2>&1 &
    local deadline=$((SECONDS + ${GARAGE_START_TIMEOUT:-60})) up=0
    while [ ! -s "$dir/garage.pid" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    [ -s "$dir/garage.pid" ] || die "Garage did not start (log: $dir/garage.log)"
    pid=$(cat "$dir/garage.pid")
    # Up means: the admin API reports the node healthy, the S3 API answers, and the default
    # bucket exists (it is created before the API servers start).
    while [ "$SECONDS" -lt "$deadline" ]; do
      if ! alive "$pid"; then
        tail -n 30 "$dir/garage.log" >&2
        rm -f "$dir/garage.pid"
        die "Garage exited during start (log: $dir/garage.log)"
      fi
      if [ "$(lcurl -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/health")" = 200 ] &&
        [ "$(lcurl -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3_PORT/$BUCKET")" != 000 ] &&
        "$GARAGE_BIN" -c "$dir/garage.toml" bucket info "$BUCKET" >/dev/null 2>&1; then
        up=1
        break
      fi
      sleep 0.5
    done
    if [ "$up" != 1 ]; then
      tail -n 30 "$dir/garage.log" >&2
      cmd_stop "$dir"
      die "Garage did not come up within ${GARAGE_START_TIMEOUT:-60} s (log: $dir/garage.log)"
    fi
    say "started (pid $pid): S3 on http://127.0.0.1:$S3_PORT, bucket $BUCKET, log $dir/garage.log"
  fi
  write_env "$dir"
  echo "$dir/env"
}

cmd_stop() {
  [ $# = 1 ] || die "usage: garage.sh stop DIR"
  [ -d "$1" ] || return 0
  local dir pid
  dir=$(cd "$1" && pwd)
  if pid=$(running_pid "$dir"); then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + ${GARAGE_STOP_TIMEOUT:-20}))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if alive "$pid"; then
      say "pid $pid ignored TERM for ${GARAGE_STOP_TIMEOUT:-20} s; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
      alive "$pid" && die "pid $pid survived KILL"
    fi
    say "stopped (pid $pid)"
  fi
  rm -f "$dir/garage.pid"
}

cmd_status() {
  [ $# = 1 ] || die "usage: garage.sh status DIR"
  local pid
  if [ -d "$1" ] && pid=$(running_pid "$(cd "$1" && pwd)"); then
    echo "running (pid $pid)"
  else
    echo "not running"
    return 1
  fi
}

cmd_selftest() {
  local tmp passed=0 failed=0
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand $tmp now
  trap "'$here/garage.sh' stop '$tmp/srv' >/dev/null 2>&1 || true; rm -rf '$tmp'" EXIT
  check() {  # check NAME COMMAND...: runs COMMAND, counts and prints the result
    local name=$1
    shift
    if "$@"; then
      passed=$((passed + 1))
      echo "ok   $name"
    else
      failed=$((failed + 1))
      echo "FAIL $name"
    fi
  }
  probe() { python3 "$here/s3probe.py" "$@"; }
  # shellcheck disable=SC1091  # written by start
  in_env() { (. "$tmp/srv/env" && "$@"); }
  local key
  key="selftest/dir/obj-$(hex 4).bin"
  listing() { in_env probe list selftest/ >"$tmp/list"; }
  listed() { listing && grep -qxF "$key" "$tmp/list"; }
  not_listed() { listing && ! grep -qxF "$key" "$tmp/list"; }
  not_running() { ! "$here/garage.sh" status "$tmp/srv" >/dev/null; }
  unreachable() { ! in_env probe anon >/dev/null 2>&1; }
  gone() { local rc=0; in_env probe get "$key" "$tmp/none" 2>/dev/null || rc=$?; [ "$rc" = 3 ]; }
  head -c 1048583 /dev/urandom >"$tmp/obj"  # a little over 1 MiB: more than one block

  check "start" "$here/garage.sh" start "$tmp/srv"
  [ -f "$tmp/srv/env" ] || { echo "FAIL no env file; giving up"; echo "$passed passed, $((failed + 1)) failed"; return 1; }
  cp "$tmp/srv/env" "$tmp/env.before"
  check "listens on loopback only" probe listeners "$(cat "$tmp/srv/garage.pid")"
  check "unsigned request is refused (403)" test "$(in_env probe anon)" = 403
  check "PUT" in_env probe put "$key" "$tmp/obj"
  check "GET returns the same bytes" in_env probe get "$key" "$tmp/got"
  check "bytes round-trip" cmp -s "$tmp/obj" "$tmp/got"
  check "LIST shows the object" listed
  check "stop" "$here/garage.sh" stop "$tmp/srv"
  check "not running after stop" not_running
  check "stop again is a no-op" "$here/garage.sh" stop "$tmp/srv"
  check "S3 unreachable while stopped" unreachable
  check "start again (restart)" "$here/garage.sh" start "$tmp/srv"
  check "same endpoint and keys after restart" cmp -s "$tmp/env.before" "$tmp/srv/env"
  rm -f "$tmp/got"
  check "GET after restart returns the bytes written before" in_env probe get "$key" "$tmp/got"
  check "bytes survive the restart" cmp -s "$tmp/obj" "$tmp/got"
  check "restart subcommand" "$here/garage.sh" restart "$tmp/srv"
  check "DELETE" in_env probe delete "$key"
  check "GET after DELETE is 404" gone
  check "LIST no longer shows it" not_listed
  check "final stop" "$here/garage.sh" stop "$tmp/srv"
  check "nothing left running" not_running
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) cmd_install ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  restart) cmd_stop "$@" && cmd_start "$@" ;;
  status) cmd_status "$@" ;;
  selftest) cmd_selftest ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
