#!/usr/bin/env bash
# Real DNS through the tunnel: dnsmasq as the service, dnsperf as the client
# (both from Debian: `apt-get install dnsperf dnsmasq-base`), direct, through
# rathole 0.5.0 (type = "udp") and through zlayer-tunnel, one after the other.
#
#   examples/dns-bench.sh [direct] [rathole] [zlt]      (default: all found)
#
# Per target: dnsperf with one client socket (-c 1, up to 100 queries in
# flight) for SECS seconds flat out, then paced at PACED queries/s (default
# 20,000); one line each: queries/s, sent, lost (unanswered within 2 s).
# dnsmasq answers every query from its own table (no upstream), so the
# service is never the one waiting.
set -u
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$HOME/.cache/tunnel-peers} SECS=${SECS:-10} PACED=${PACED:-20000}
LOCAL=21501 CTRL=21510 PUB=21511
for tool in dnsperf dnsmasq; do
  command -v $tool >/dev/null || [ -x /usr/sbin/$tool ] || {
    echo "$tool is missing: apt-get install dnsperf dnsmasq-base" >&2; exit 2; }
done
cargo build --release --quiet --bin zlayer-tunnel || exit 2
BIN=target/release/zlayer-tunnel
work=$(mktemp -d) PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
start() { "$@" >>"$work/log" 2>&1 & PIDS+=($!); }
wait_tcp() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# a query through the target is answered
wait_dns() { for _ in $(seq 50); do dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -n 1 -t 1 2>/dev/null | grep -q 'Queries completed: *[1-9]' && return 0; sleep 0.2; done; return 1; }
# "Queries per second: N", sent and lost, as one JSON object
perf() {
  dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -c 1 -l "$SECS" -t 2 "${@:2}" 2>&1 | awk '
    /Queries sent:/ {sent=$3} /Queries completed:/ {done=$3} /Queries lost:/ {lost=$3}
    /Queries per second:/ {qps=$4}
    END {printf "{\"sent\":%d,\"completed\":%d,\"lost\":%d,\"qps\":%.0f}\n", sent, done, lost, qps}'
}

for i in $(seq 100); do echo "host$i.bench.test A"; done >"$work/queries"
start /usr/sbin/dnsmasq --no-daemon --keep-in-foreground --no-resolv --no-hosts \
  --listen-address=127.0.0.1 --bind-interfaces --port=$LOCAL --address=/bench.test/10.0.0.1 \
  --cache-size=1000 --log-facility=- --quiet-dhcp
targets=${*:-direct rathole zlt}
for t in $targets; do
  before=${#PIDS[@]}
  case $t in
    direct) port=$LOCAL ;;
    rathole)
      [ -x "$PEERS/bin/rathole" ] || { echo "rathole {\"error\":\"not installed\"}"; continue; }
      printf '[server]\nbind_addr = "127.0.0.1:%s"\n[server.services.dns]\ntype = "udp"\ntoken = "bench-token"\nbind_addr = "127.0.0.1:%s"\n' $CTRL $PUB >"$work/s.toml"
      printf '[client]\nremote_addr = "127.0.0.1:%s"\n[client.services.dns]\ntype = "udp"\ntoken = "bench-token"\nlocal_addr = "127.0.0.1:%s"\n' $CTRL $LOCAL >"$work/c.toml"
      start "$PEERS/bin/rathole" "$work/s.toml"; wait_tcp $CTRL
      start "$PEERS/bin/rathole" "$work/c.toml"; port=$PUB ;;
    zlt)
      start "$BIN" server --listen 127.0.0.1:$CTRL --port-range $PUB-$PUB --bind-host 127.0.0.1 --token bench-token
      wait_tcp $CTRL
      start env ZLAYER_TUNNEL_TOKEN=bench-token "$BIN" agent --server ws://127.0.0.1:$CTRL/tunnel/v1 --udp dns:$LOCAL:$PUB
      port=$PUB ;;
    *) echo "unknown target $t" >&2; continue ;;
  esac
  wait_dns $port || echo "$t {\"error\":\"no DNS answer on $port\"}"
  echo "$t flat-out $(perf $port)"
  echo "$t paced-$PACED $(perf $port -Q "$PACED")"
  for p in "${PIDS[@]:$before}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  PIDS=("${PIDS[@]:0:$before}")
  sleep 0.5
done
