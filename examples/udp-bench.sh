#!/usr/bin/env bash
# UDP side by side on loopback: direct, rathole 0.5.0 (type = "udp") and
# zlayer-tunnel, with the same load (examples/udpload.rs), every reply checked
# byte for byte: 64- and 1200-byte datagrams on 1 flow with 1 in flight
# (latency) and on 8 flows x 8 in flight (rate); one busy socket with 64 in
# flight (a resolver's or dnsperf -c 1's shape), of 64-byte and of 1400-byte
# datagrams (what one flow carries, in Mbit/s each way); and 10,000 queries
# each from a new source port, 64 at a time. One JSON line per measurement,
# prefixed by the target.
#
#   examples/udp-bench.sh [direct] [rathole] [zlt]     (default: all found)
#
# rathole comes from `cargo install --root ~/.cache/tunnel-peers rathole@0.5.0`.
set -u
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$HOME/.cache/tunnel-peers} SECS=${SECS:-5}
LOCAL=21101 CTRL=21110 PUB=21111
cargo build --release --quiet --bin zlayer-tunnel --example udpload || exit 2
BIN=target/release/zlayer-tunnel LOAD=target/release/examples/udpload
work=$(mktemp -d) PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
start() { "$@" >>"$work/log" 2>&1 & PIDS+=($!); }
wait_tcp() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# waits until a datagram to the public port comes back
wait_udp() { for _ in $(seq 50); do timeout 5 "$LOAD" rr 127.0.0.1:$1 16 1 1 1 2>/dev/null | grep -q '"replies":[1-9]' && return 0; sleep 0.2; done; return 1; }

start "$LOAD" echo 127.0.0.1:$LOCAL
targets=${*:-direct rathole zlt}
for t in $targets; do
  before=${#PIDS[@]}
  case $t in
    direct) port=$LOCAL ;;
    rathole)
      [ -x "$PEERS/bin/rathole" ] || { echo "rathole {\"error\":\"not installed\"}"; continue; }
      printf '[server]\nbind_addr = "127.0.0.1:%s"\n[server.services.svc]\ntype = "udp"\ntoken = "bench-token"\nbind_addr = "127.0.0.1:%s"\n' $CTRL $PUB >"$work/s.toml"
      printf '[client]\nremote_addr = "127.0.0.1:%s"\n[client.services.svc]\ntype = "udp"\ntoken = "bench-token"\nlocal_addr = "127.0.0.1:%s"\n' $CTRL $LOCAL >"$work/c.toml"
      start "$PEERS/bin/rathole" "$work/s.toml"; wait_tcp $CTRL
      start "$PEERS/bin/rathole" "$work/c.toml"; port=$PUB ;;
    zlt)
      start "$BIN" server --listen 127.0.0.1:$CTRL --port-range $PUB-$PUB --bind-host 127.0.0.1 --token bench-token
      wait_tcp $CTRL
      start env ZLAYER_TUNNEL_TOKEN=bench-token "$BIN" agent --server ws://127.0.0.1:$CTRL/tunnel/v1 --udp svc:$LOCAL:$PUB
      port=$PUB ;;
    *) echo "unknown target $t" >&2; continue ;;
  esac
  wait_udp $port || { echo "$t {\"error\":\"no UDP answer on $port\"}"; }
  for size in 64 1200; do
    echo "$t $("$LOAD" rr 127.0.0.1:$port $size 1 1 "$SECS")"
    echo "$t $("$LOAD" rr 127.0.0.1:$port $size 8 8 "$SECS")"
  done
  echo "$t $("$LOAD" rr 127.0.0.1:$port 64 1 64 "$SECS")"
  echo "$t $("$LOAD" rr 127.0.0.1:$port 1400 1 64 "$SECS")"
  echo "$t $("$LOAD" fresh 127.0.0.1:$port 10000 64)"
  for p in "${PIDS[@]:$before}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  PIDS=("${PIDS[@]:0:$before}")
  sleep 0.5
done
