#!/usr/bin/env bash
# Where the tunnel's time goes under one load: a CPU profile (perf, call
# graphs) of the server and of the agent, each written as a flamegraph SVG,
# while examples/tcpload.rs drives the load through a tunnel on 127.0.0.1.
#
#   examples/profile.sh                        # conn 4 (new connections), into docs/profiles/
#   examples/profile.sh "rr 1 64" /tmp/prof    # 64-byte ping-pong on one connection, elsewhere
#
# The load runs for SECS (default 6); perf samples SAMPLE seconds (default 2)
# of it, on each process in turn, at 2999 Hz (user and kernel). Needs perf
# (the OS package) and inferno (installed here into ~/.cache/inferno if
# absent: `cargo install inferno`). Ports 21301-21311 must be free.
set -eu
cd "$(dirname "$0")/.."
LOADSPEC=${1:-conn 4} OUT=${2:-docs/profiles} SECS=${SECS:-6} SAMPLE=${SAMPLE:-2}
LOCAL=21301 CTRL=21310 PUB=21311
command -v perf >/dev/null || { echo "profile: perf not found (install the OS's perf package)" >&2; exit 2; }
INFERNO=${INFERNO:-$HOME/.cache/inferno}
[ -x "$INFERNO/bin/inferno-flamegraph" ] || cargo install --quiet --root "$INFERNO" inferno
cargo build --profile dist --quiet --bin zlayer-tunnel
cargo build --profile dist --quiet --example tcpload
BIN=target/dist/zlayer-tunnel LOAD=target/dist/examples/tcpload
work=$(mktemp -d) PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
start() { "$@" >>"$work/log" 2>&1 & PIDS+=($!); }
wait_tcp() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
mkdir -p "$OUT"

start "$LOAD" serve 127.0.0.1:$LOCAL; wait_tcp $LOCAL
start "$BIN" server --listen 127.0.0.1:$CTRL --port-range $PUB-$PUB --bind-host 127.0.0.1 --token profile-token
server=${PIDS[-1]}; wait_tcp $CTRL
start env ZLAYER_TUNNEL_TOKEN=profile-token "$BIN" agent --server ws://127.0.0.1:$CTRL/tunnel/v1 --tcp svc:$LOCAL:$PUB
agent=${PIDS[-1]}; wait_tcp $PUB
name=$(echo "$LOADSPEC" | tr ' ' '-')
for side in server agent; do
  pid=$server; [ $side = agent ] && pid=$agent
  set -- $LOADSPEC
  "$LOAD" "$1" 127.0.0.1:$PUB "${@:2}" "$SECS" >"$work/load.json" &
  loader=$!
  sleep 1 # past the load's start
  perf record -q -F 2999 -g --call-graph dwarf,16384 -p "$pid" -o "$work/$side.data" -- sleep "$SAMPLE" >/dev/null 2>&1
  wait $loader
  perf script -i "$work/$side.data" 2>/dev/null | "$INFERNO/bin/inferno-collapse-perf" >"$work/$side.folded"
  [ -n "${KEEP:-}" ] && cp "$work/$side.folded" "$KEEP-$side.folded"
  "$INFERNO/bin/inferno-flamegraph" --minwidth 0.5 --title "zlayer-tunnel $side, tcpload $LOADSPEC" \
    <"$work/$side.folded" >"$OUT/$side-$name.svg"
  echo "$side: $OUT/$side-$name.svg; load: $(cat "$work/load.json")"
  # the share of samples under each system call, and in user space
  awk '{ n = $NF; total += n; sys = "user space"
         if (match($0, /__x64_sys_[a-z0-9_]+/)) sys = substr($0, RSTART + 10, RLENGTH - 10)
         else if (match($0, /(asm_|irq|softirq|do_softirq)[a-z_]*/)) sys = "interrupts, softirq"
         by[sys] += n }
       END { for (s in by) printf "  %5.1f%%  %s\n", 100 * by[s] / total, s }' "$work/$side.folded" | sort -rn | head -12
done
