#!/usr/bin/env bash
# The project's benchmark: one local service (examples/tcpload.rs) exposed
# through each target on 127.0.0.1, and the same loads against each public
# port, every bulk byte verified. One JSON line per measurement, prefixed by
# the target; compare targets only within one run (the machine is shared).
#
#   examples/bench.sh                      # direct and zlt, plus rathole and bore if installed
#   examples/bench.sh zlt rathole          # chosen targets
#   ROUNDS=3 examples/bench.sh rathole zlt # interleaved: see below
#
# Targets: direct (no tunnel: the machine's limit), zlt (this project, built
# with the dist profile), zlt-base (another build of it, BASE_BIN=path: a
# before/after of a change in one interleaved run), rathole and bore (from
# `cargo install --root ~/.cache/tunnel-peers rathole@0.5.0 bore-cli@0.6.0`),
# zlt-2 (zlt with two agents registering the service: replicas sharing its port;
# zlt-base-2 the same with BASE_BIN), zlt-c2 (zlt with one agent and
# `--connections 2`: two links, each on its own thread; the default since
# 2026-12-04, the flag for builds before it), zlt-c1 (`--connections 1`:
# one link, the default before),
# and two baselines that are not tunnels: relay (one plain TCP relay process,
# `tcpload relay`: accept, dial the service, copy; the least work any tunnel
# that ends the visitor's TCP and dials the service must do) and relay2 (two
# relays chained by a TCP connection per visitor: a two-process tunnel's
# shape with nothing else in it).
# Loads (LOADS="up 1073741824 1|conn 4 5" picks some): 1 GiB up and down on one stream, 1 GiB up on each of 8 streams,
# 64-byte ping-pong on 1 and on 64 connections, new connections/s (connect,
# one ping-pong, the service closes) with 4 workers, 1000 idle connections
# held; and the latency probe beside bulk (`mixed`: a 64-byte ping-pong beside
# one bulk download, one upload, 8 downloads, through the same port: the
# probe's p50/p99 and the bulk's MiB/s). Memory: the tunnel's processes' RSS fresh, after the loads (idle) and
# with the 1000 connections held. SECS (default 5) and BYTES (per stream,
# default 1 GiB) change the sizes; ports 21201-21211 must be free.
#
# Interleaved (ROUNDS=N): this machine switches for minutes at a time between
# a fast and a slow state, so targets run one after the other can land in
# different ones. With ROUNDS set, every target is started at once on its own
# ports (21210+10i, 21211+10i), and each load runs ROUNDS times on every target
# in turn (the order rotating), then one summary line per load gives each
# target's median (MiB/s, or operations/s and p50 µs) and its ratio to the
# first target's: name rathole first to read zlt's ratio to it. No memory
# figures in this mode.
set -u
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$HOME/.cache/tunnel-peers} SECS=${SECS:-5} BYTES=${BYTES:-1073741824}
LOCAL=21201 CTRL=21210 PUB=21211
# two builds, so that the binary measured is the one shipped: built with an
# example, it would carry the dev-dependencies' features (tokio's multi-thread
# runtime); no difference in speed was measured, but it is not the same binary
# (BIN=path measures a binary built before instead, and builds nothing but
# the load generator if it is missing: the tree may change meanwhile)
if [ -z "${BIN:-}" ]; then
  cargo build --profile dist --quiet --bin zlayer-tunnel || exit 2
  BIN=target/dist/zlayer-tunnel
fi
[ -x target/dist/examples/tcpload ] || cargo build --profile dist --quiet --example tcpload || exit 2
LOAD=target/dist/examples/tcpload
ulimit -n 4096 2>/dev/null || true
work=$(mktemp -d) SERVICE= TPIDS=()
stop_target() {
  for p in "${TPIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${TPIDS[@]}"; do wait "$p" 2>/dev/null; done
  TPIDS=()
}
cleanup() { stop_target; [ -n "$SERVICE" ] && kill "$SERVICE" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start() { "$@" >>"$work/log" 2>&1 & TPIDS+=($!); }
wait_tcp() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# a connection through the tunnel echoes: the agent has registered
wait_echo() { for _ in $(seq 100); do timeout 5 "$LOAD" hold 127.0.0.1:$1 1 0 >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo $t; }

up_target() {
  case $1 in
    direct) PORT=$LOCAL ;;
    relay)
      start "$LOAD" relay 127.0.0.1:$PUB 127.0.0.1:$LOCAL; PORT=$PUB ;;
    relay2)
      start "$LOAD" relay 127.0.0.1:$CTRL 127.0.0.1:$LOCAL; wait_tcp $CTRL || return 1
      start "$LOAD" relay 127.0.0.1:$PUB 127.0.0.1:$CTRL; PORT=$PUB ;;
    zlt|zlt-base|zlt-2|zlt-base-2|zlt-c2|zlt-c1)
      local bin=$BIN
      if [ "${1#zlt-base}" != "$1" ]; then
        bin=${BASE_BIN:-}
        [ -x "$bin" ] || { echo "zlt-base needs BASE_BIN, a zlayer-tunnel binary to compare with" >&2; return 1; }
      fi
      start "$bin" server --listen 127.0.0.1:$CTRL --port-range $PUB-$PUB --bind-host 127.0.0.1 --token bench-token
      wait_tcp $CTRL || return 1
      # (the flag only where needed: builds before it do not know it)
      local links=()
      [ "$1" = zlt-c2 ] && links=(--connections 2)
      [ "$1" = zlt-c1 ] && links=(--connections 1)
      start env ZLAYER_TUNNEL_TOKEN=bench-token "$bin" agent --server ws://127.0.0.1:$CTRL/tunnel/v1 ${links[@]+"${links[@]}"} --tcp svc:$LOCAL:$PUB
      # zlt-2: a second agent, a replica of the service: visitors spread over both
      if [ "${1%-2}" != "$1" ]; then
        env ZLAYER_TUNNEL_TOKEN=bench-token "$bin" agent --server ws://127.0.0.1:$CTRL/tunnel/v1 --tcp svc:$LOCAL:$PUB 2>"$work/replica-$CTRL.log" >/dev/null & TPIDS+=($!)
        for _ in $(seq 100); do grep -q "service registered" "$work/replica-$CTRL.log" 2>/dev/null && break; sleep 0.1; done
      fi
      PORT=$PUB ;;
    rathole)
      [ -x "$PEERS/bin/rathole" ] || return 1
      printf '[server]\nbind_addr = "127.0.0.1:%s"\n[server.services.svc]\ntoken = "bench-token"\nbind_addr = "127.0.0.1:%s"\n' $CTRL $PUB >"$work/s.toml"
      printf '[client]\nremote_addr = "127.0.0.1:%s"\n[client.services.svc]\ntoken = "bench-token"\nlocal_addr = "127.0.0.1:%s"\n' $CTRL $LOCAL >"$work/c.toml"
      start "$PEERS/bin/rathole" "$work/s.toml"; wait_tcp $CTRL || return 1
      start "$PEERS/bin/rathole" "$work/c.toml"; PORT=$PUB ;;
    bore)
      [ -x "$PEERS/bin/bore" ] || return 1
      start "$PEERS/bin/bore" server --bind-addr 127.0.0.1 --min-port $PUB --max-port $PUB; wait_tcp 7835 || return 1
      start "$PEERS/bin/bore" local $LOCAL --local-host 127.0.0.1 --to 127.0.0.1 --port $PUB; PORT=$PUB ;;
    *) echo "unknown target $1" >&2; return 1 ;;
  esac
  wait_echo "$PORT"
}

run_target() {
  local t=$1
  up_target "$t" || { echo "$t {\"error\":\"could not start (not installed, or its port never echoed)\"}"; stop_target; return; }
  local fresh; fresh=$(rss_kb "${TPIDS[@]}")
  for load in "up $BYTES 1" "down $BYTES 1" "up $BYTES 8" "rr 1 64 $SECS" "rr 64 64 $SECS" "conn 4 $SECS" "mixed down 1 $SECS" "mixed up 1 $SECS" "mixed down 8 $SECS"; do
    set -- $load
    echo "$t $(timeout 300 "$LOAD" "$1" 127.0.0.1:$PORT "${@:2}" || true)"
  done
  local idle; idle=$(rss_kb "${TPIDS[@]}")
  timeout 120 "$LOAD" hold 127.0.0.1:$PORT 1000 3 >"$work/hold" & local hold=$!
  for _ in $(seq 100); do grep -q '"mode":"hold"' "$work/hold" 2>/dev/null && break; sleep 0.1; done
  local held; held=$(rss_kb "${TPIDS[@]}")
  wait $hold
  echo "$t $(tail -1 "$work/hold") {\"rss_kb_fresh\":$fresh,\"rss_kb_idle\":$idle,\"rss_kb_1000_conns\":$held,\"kb_per_conn\":$(( (held - idle) / 1000 ))}"
  stop_target
}

"$LOAD" serve 127.0.0.1:$LOCAL 2>>"$work/log" & SERVICE=$!
wait_tcp $LOCAL || { echo "the service did not start" >&2; exit 2; }
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(direct zlt)
  [ -x "$PEERS/bin/rathole" ] && targets+=(rathole)
  [ -x "$PEERS/bin/bore" ] && targets+=(bore)
fi
[ "${ROUNDS:-0}" -gt 0 ] || { for t in "${targets[@]}"; do run_target "$t"; done; exit 0; }

# interleaved: every target up at once, on its own ports
declare -A PORTS
for i in "${!targets[@]}"; do
  t=${targets[$i]} CTRL=$((21210 + 10 * i)) PUB=$((21211 + 10 * i))
  up_target "$t" || { echo "$t {\"error\":\"could not start\"}"; exit 2; }
  PORTS[$t]=$PORT
done
# the figure a load is judged by: MiB/s, or operations/s and the p50 latency
figure() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }
median() { sort -n | awk '{v[NR]=$1} END {if (NR) print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
n=${#targets[@]}
IFS='|' read -r -a loads <<<"${LOADS:-up $BYTES 1|down $BYTES 1|up $BYTES 8|rr 1 64 $SECS|rr 64 64 $SECS|conn 4 $SECS|mixed down 1 $SECS|mixed up 1 $SECS|mixed down 8 $SECS}"
for load in "${loads[@]}"; do
  set -- $load
  for r in $(seq "$ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
      t=${targets[$(( (k + r) % n ))]}
      line=$(timeout 300 "$LOAD" "$1" "127.0.0.1:${PORTS[$t]}" "${@:2}" || true)
      echo "$t round $r $line"
      echo "$t $(echo "$line" | figure mib_per_s)$(echo "$line" | figure per_s) $(echo "$line" | figure p50_us) $(echo "$line" | figure p99_us) $(echo "$line" | figure bulk_mib_per_s)" >>"$work/figures"
    done
  done
  summary="{\"load\":\"$load\",\"rounds\":$ROUNDS"
  first=
  for t in "${targets[@]}"; do
    rate=$(awk -v t="$t" '$1 == t {print $2}' "$work/figures" | median)
    p50=$(awk -v t="$t" '$1 == t && $3 != "" {print $3}' "$work/figures" | median)
    p99=$(awk -v t="$t" '$1 == t && $4 != "" {print $4}' "$work/figures" | median)
    bulk=$(awk -v t="$t" '$1 == t && $5 != "" {print $5}' "$work/figures" | median)
    first=${first:-$rate}
    summary+=",\"$t\":{\"median\":$rate,\"p50_us\":${p50:-null},\"p99_us\":${p99:-null},\"bulk_mib_per_s\":${bulk:-null},\"ratio\":$(awk -v a="$rate" -v b="$first" 'BEGIN {printf "%.2f", (b > 0) ? a / b : 0}')}"
  done
  echo "summary $summary}"
  : >"$work/figures"
done
