#!/usr/bin/env bash
# A 3-node Garage cluster on 127.0.0.1 (replication factor 3, each node with its own ports and
# directories), and the issue-10 drill against it: a checkpoint replicates while one node is
# killed; the snapshot completes; recover is byte-identical.
#   tools/garage-cluster.sh start DIR        three nodes, layout applied, a key and a bucket;
#                                            writes DIR/env (AWS_*, SNAPFS_CLUSTER_ENDPOINT)
#   tools/garage-cluster.sh kill DIR N       kill -9 node N (1-3)
#   tools/garage-cluster.sh revive DIR N     start node N again
#   tools/garage-cluster.sh stop DIR         stop every node
#   tools/garage-cluster.sh drill [MIB]      the drill in a temporary DIR (default 512 MiB);
#                                            prints "N passed, N failed"
# Garage comes from tools/garage.sh install.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
GARAGE_BIN="$SNAPFS_CACHE/garage/bin/garage"
BUCKET=snapfs-cluster

die() { echo "garage-cluster.sh: $*" >&2; exit 1; }
say() { echo "garage-cluster.sh: $*" >&2; }
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
lcurl() { curl --noproxy '*' --silent --max-time 5 "$@"; }
g() { local n=$1; shift; "$GARAGE_BIN" -c "$DIR/n$n/garage.toml" "$@"; }

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

start_node() {
  local n=$1 d="$DIR/n$1"
  (exec setsid "$GARAGE_BIN" -c "$d/garage.toml" server </dev/null >>"$d/garage.log" 2>&1) &
  echo $! >"$d/pid"
}

wait_healthy() {  # every node's admin API answers (want: 200 healthy, or any answer)
  local want=${1:-200} deadline=$((SECONDS + 90)) n ok code
  while [ "$SECONDS" -lt "$deadline" ]; do
    ok=1
    for n in 1 2 3; do
      . "$DIR/n$n/ports"
      code=$(lcurl -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN/health" || true)
      if [ "$want" = any ]; then [ "$code" != 000 ] || ok=0; else [ "$code" = "$want" ] || ok=0; fi
    done
    [ "$ok" = 1 ] && return 0
    sleep 0.5
  done
  return 1
}

cmd_start() {
  [ -x "$GARAGE_BIN" ] || die "Garage is not installed: tools/garage.sh install"
  DIR=$1
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  chmod 700 "$DIR"
  local secret n
  secret=$(hex 32)
  for n in 1 2 3; do
    local d="$DIR/n$n" S3 RPC ADMIN
    mkdir -p "$d/meta" "$d/data"
    read -r S3 RPC ADMIN < <(free_ports 3)
    printf 'S3=%s\nRPC=%s\nADMIN=%s\n' "$S3" "$RPC" "$ADMIN" >"$d/ports"
    (
      umask 077
      cat >"$d/garage.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$RPC"
rpc_public_addr = "127.0.0.1:$RPC"
rpc_bind_outgoing = true
rpc_secret = "$secret"
[s3_api]
api_bind_addr = "127.0.0.1:$S3"
s3_region = "garage"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN"
admin_token = "$(hex 32)"
EOF
    )
    start_node "$n"
  done
  wait_healthy any || die "the nodes did not come up (logs: $DIR/n*/garage.log)"
  local ids=()
  for n in 1 2 3; do
    ids+=("$(g "$n" node id -q 2>/dev/null | tail -n1)")
  done
  for n in 2 3; do
    g 1 node connect "${ids[$((n - 1))]}" >/dev/null
  done
  for n in 1 2 3; do
    g 1 layout assign -z dc$n -c 1G "${ids[$((n - 1))]%%@*}" >/dev/null
  done
  g 1 layout apply --version 1 >/dev/null
  wait_healthy 200 || die "the cluster is not healthy after the layout (logs: $DIR/n*/garage.log)"
  local out key_id key_secret
  out=$(g 1 key create snapfs-cluster)
  key_id=$(sed -n 's/^Key ID:[[:space:]]*//p' <<<"$out" | head -n1)
  key_secret=$(sed -n 's/^Secret key:[[:space:]]*//p' <<<"$out" | head -n1)
  [ -n "$key_id" ] && [ -n "$key_secret" ] || die "cannot read the new key: $out"
  g 1 bucket create "$BUCKET" >/dev/null
  g 1 bucket allow --read --write --owner "$BUCKET" --key snapfs-cluster >/dev/null
  . "$DIR/n1/ports"
  {
    echo "export AWS_ACCESS_KEY_ID=$key_id"
    echo "export AWS_SECRET_ACCESS_KEY=$key_secret"
    echo "export AWS_REGION=garage"
    echo "export SNAPFS_CLUSTER_ENDPOINT=http://127.0.0.1:$S3"
    echo "export SNAPFS_CLUSTER_BUCKET=$BUCKET"
  } >"$DIR/env"
  say "3 nodes up (replication factor 3); S3 on http://127.0.0.1:$S3; source $DIR/env"
}

cmd_kill() { DIR=$1; kill -KILL "$(cat "$DIR/n$2/pid")" 2>/dev/null || true; say "node $2 killed"; }
cmd_revive() { DIR=$1; start_node "$2"; wait_healthy || die "node $2 did not come back"; say "node $2 back"; }
cmd_stop() {
  DIR=$1
  local n
  for n in 1 2 3; do
    [ -f "$DIR/n$n/pid" ] && kill -TERM "$(cat "$DIR/n$n/pid")" 2>/dev/null || true
  done
  sleep 1
  for n in 1 2 3; do
    [ -f "$DIR/n$n/pid" ] && kill -KILL "$(cat "$DIR/n$n/pid")" 2>/dev/null || true
  done
  return 0
}

cmd_drill() {
  local mib=${1:-512} tmp passed=0 failed=0
  [ -x "$SNAPFS_BIN" ] || die "build snapfs first ($SNAPFS_BIN)"
  if [ ! -e /dev/fuse ]; then
    echo "SKIPPED: /dev/fuse is absent (the drill mounts snapfs)"
    echo "0 passed, 0 failed"
    return 0
  fi
  tmp=$(mktemp -d /var/tmp/snapfs-cluster.XXXXXX)
  trap "umount -l '$tmp/mnt' 2>/dev/null || true; '$here/garage-cluster.sh' stop '$tmp/cluster' || true; rm -rf '$tmp'" EXIT
  check() { local name=$1; shift; if "$@"; then passed=$((passed + 1)); echo "ok   $name"; else failed=$((failed + 1)); echo "FAIL $name"; fi; }
  cmd_start "$tmp/cluster"
  . "$tmp/cluster/env"
  local spec="s3://$SNAPFS_CLUSTER_BUCKET/drill" opts=(--endpoint "$SNAPFS_CLUSTER_ENDPOINT" --region garage)
  mkdir -p "$tmp/mnt"
  "$SNAPFS_BIN" mount "$tmp/store" "$tmp/mnt" --replicate "$spec" "${opts[@]}" >"$tmp/daemon.log" 2>&1 &
  local daemon=$! i
  for i in $(seq 100); do mountpoint -q "$tmp/mnt" && break; sleep 0.1; done
  mountpoint -q "$tmp/mnt" || die "the mount did not come up: $(tail -5 "$tmp/daemon.log")"
  head -c $((mib << 20)) /dev/urandom >"$tmp/ckpt.src"
  mkdir -p "$tmp/mnt/ckpt"
  # The checkpoint is written and replicated while node 3 dies (node 1 serves S3).
  (dd if="$tmp/ckpt.src" of="$tmp/mnt/ckpt/model.pt" bs=1M conv=fsync status=none) &
  local writer=$!
  sleep 1
  DIR="$tmp/cluster" cmd_kill "$tmp/cluster" 3
  # The node must die mid-replication, or the drill shows nothing: chunks still queued.
  local pending
  pending=$("$SNAPFS_BIN" status "$tmp/mnt" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["backends"][0]["pending_chunks"])')
  echo "     ($pending chunks not yet uploaded when node 3 died)"
  check "node 3 died while the checkpoint replicated" test "$pending" -gt 0
  check "the checkpoint is written and fsynced with a node down" wait "$writer"
  "$SNAPFS_BIN" snapshot create "$tmp/mnt" ckpt-1 >/dev/null
  local t0=$SECONDS
  check "snapshot wait returns: complete on the 2 live nodes" \
    "$SNAPFS_BIN" snapshot wait "$tmp/mnt" ckpt-1 --timeout 600s
  echo "     (complete $((SECONDS - t0)) s after create)"
  local want
  want=$(b3sum --no-names "$tmp/ckpt.src" 2>/dev/null || sha256sum "$tmp/ckpt.src" | cut -d' ' -f1)
  kill -KILL "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  umount -l "$tmp/mnt" 2>/dev/null || true
  rm -rf "$tmp/store"
  check "recover with node 3 still down" "$SNAPFS_BIN" recover --from "$spec" "${opts[@]}" "$tmp/store2"
  "$SNAPFS_BIN" mount "$tmp/store2" "$tmp/mnt" >"$tmp/daemon2.log" 2>&1 &
  daemon=$!
  for i in $(seq 100); do mountpoint -q "$tmp/mnt" && break; sleep 0.1; done
  local got
  got=$(b3sum --no-names "$tmp/mnt/ckpt/model.pt" 2>/dev/null || sha256sum "$tmp/mnt/ckpt/model.pt" | cut -d' ' -f1)
  check "the recovered checkpoint is byte-identical" test "$got" = "$want"
  "$SNAPFS_BIN" umount "$tmp/mnt" >/dev/null 2>&1 || true
  wait "$daemon" 2>/dev/null || true
  DIR="$tmp/cluster"
  start_node 3
  check "node 3 rejoins (every node's health endpoint answers 200)" wait_healthy 200
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start) cmd_start "$@" ;;
  kill) cmd_kill "$@" ;;
  revive) cmd_revive "$@" ;;
  stop) cmd_stop "$@" ;;
  drill) cmd_drill "$@" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
