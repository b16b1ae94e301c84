#!/usr/bin/env bash
# A visitor through a peer link against one through a direct link (issue 19):
# one etcd, two servers of one cluster (public ports on 127.0.0.1 and
# 127.0.0.2), one agent linked to server 1 only, `tcpload serve` behind it.
# `direct` loads hit server 1's public port; `peer` hit server 2's, whose
# visitors go through its peer link to server 1. Interleaved rounds.
#
#   examples/cluster-bench.sh                 # ROUNDS=3, the loads below
#   ROUNDS=5 LOADS="rr 1 64 5|down 1073741824 1" examples/cluster-bench.sh
#
# Needs etcd (Debian: etcd-server) and protoc (protobuf-compiler) for the
# build with `--features etcd`; BIN=path measures a binary built before.
# Ports 21401-21421 must be free.
set -u
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "etcd is missing: apt-get install etcd-server" >&2; exit 2; }
if [ -z "${BIN:-}" ]; then
  cargo build --profile dist --quiet --features etcd --bin zlayer-tunnel || exit 2
  BIN=target/dist/zlayer-tunnel
fi
[ -x target/dist/examples/tcpload ] || cargo build --profile dist --quiet --example tcpload || exit 2
LOAD=target/dist/examples/tcpload
ROUNDS=${ROUNDS:-3}
LOCAL=21401 ETCD=21402 ETCD_PEER=21403 C1=21410 C2=21420 PUB=21411
work=$(mktemp -d) PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
start() { "$@" >>"$work/log" 2>&1 & PIDS+=($!); }
wait_tcp() { for _ in $(seq 100); do (exec 3<>/dev/tcp/$1/$2) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
wait_echo() { for _ in $(seq 100); do timeout 5 "$LOAD" hold "$1" 1 0 >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

start "$LOAD" serve 127.0.0.1:$LOCAL
start etcd --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:$ETCD \
  --advertise-client-urls http://127.0.0.1:$ETCD --listen-peer-urls http://127.0.0.1:$ETCD_PEER \
  --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER --initial-cluster default=http://127.0.0.1:$ETCD_PEER
wait_tcp 127.0.0.1 $ETCD || { echo "etcd did not start" >&2; exit 2; }
sleep 1 # etcd elects itself leader
"$BIN" token add --etcd http://127.0.0.1:$ETCD --token bench-token >/dev/null || exit 2
for i in 1 2; do
  ctrl=$((21400 + 10 * i))
  start env ZLAYER_TUNNEL_PEER_TOKEN=peer-token "$BIN" server --etcd http://127.0.0.1:$ETCD \
    --listen 127.0.0.1:$ctrl --port-range $PUB-$PUB --bind-host 127.0.0.$i --route-ttl 2s
done
wait_tcp 127.0.0.1 $C1 && wait_tcp 127.0.0.1 $C2 || { echo "the servers did not start" >&2; exit 2; }
start env ZLAYER_TUNNEL_TOKEN=bench-token "$BIN" agent --server ws://127.0.0.1:$C1/tunnel/v1 --tcp svc:$LOCAL:0
wait_echo 127.0.0.1:$PUB || { echo "no echo through server 1" >&2; cat "$work/log" >&2; exit 2; }
wait_echo 127.0.0.2:$PUB || { echo "no echo through server 2's peer link" >&2; cat "$work/log" >&2; exit 2; }

IFS='|' read -r -a loads <<<"${LOADS:-down 1073741824 1|up 1073741824 1|rr 1 64 5|rr 64 64 5}"
for load in "${loads[@]}"; do
  set -- $load
  for round in $(seq "$ROUNDS"); do
    echo "direct round $round $(timeout 300 "$LOAD" "$1" 127.0.0.1:$PUB "${@:2}")"
    echo "peer round $round $(timeout 300 "$LOAD" "$1" 127.0.0.2:$PUB "${@:2}")"
  done
done
