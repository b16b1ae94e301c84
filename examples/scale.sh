#!/usr/bin/env bash
# Scale runs on loopback, each bounded in time, each failing if anything is lost:
#
#   examples/scale.sh conns    # 10,000 concurrent connections through one agent
#   examples/scale.sh agents   # 1,000 agents (own WebSocket, own token, one service) on one server
#   examples/scale.sh          # both
#
# CONNS=... and AGENTS=... change the sizes. Reports, as JSON lines, the
# server's and the agent's RSS while everything is held (and, for agents, the
# server's CPU at idle). Ports 22001-22020 and 23000-24999 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-10000} AGENTS=${AGENTS:-1000}
ECHO=22001 CTRL=22010 PUB=22011 ADMIN=22009 RANGE_LOW=23000

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# each process (load, service, server, agent) holds one socket per connection
[ "$(ulimit -n)" -ge $((CONNS + 500)) ] || { echo "scale: need $((CONNS + 500)) file descriptors per process, have $(ulimit -n)" >&2; exit 2; }
cargo build --release --quiet --bin zlayer-tunnel --example scale
BIN=target/release/zlayer-tunnel LOAD=target/release/examples/scale
work=$(mktemp -d) PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start() { "$@" >>"$work/log" 2>&1 & LAST=$!; PIDS+=("$LAST"); }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "scale: port $1 never opened" >&2; return 1; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
http_get() { exec 3<>"/dev/tcp/127.0.0.1/$1"; printf 'GET %s HTTP/1.0\r\n\r\n' "$2" >&3; cat <&3; exec 3<&-; }

# Runs the load driver; when it says it holds, calls $1; passes its other
# lines through, then its exit status as {"exit":N}.
drive() {
  local on_held=$1; shift
  while IFS= read -r line; do
    case $line in
      *'"event":"held"'*) $on_held ;;
      *) echo "$line" ;;
    esac
  done < <(timeout 600 "$LOAD" "$@" 2>>"$work/log"; echo "{\"exit\":$?}")
}

conns() {
  local echo_pid server agent
  start "$LOAD" echo 127.0.0.1:$ECHO; echo_pid=$LAST; wait_port $ECHO
  start "$BIN" server --listen 127.0.0.1:$CTRL --port-range $PUB-$PUB --bind-host 127.0.0.1 --token scale; server=$LAST
  wait_port $CTRL
  start env ZLAYER_TUNNEL_TOKEN=scale "$BIN" agent --server ws://127.0.0.1:$CTRL/tunnel/v1 --tcp svc:$ECHO:$PUB; agent=$LAST
  wait_port $PUB
  local idle_server idle_agent
  idle_server=$(rss_kb "$server") idle_agent=$(rss_kb "$agent")
  held() {
    echo "{\"scale\":\"conns\",\"connections\":$CONNS,\"server_rss_kb\":{\"idle\":$idle_server,\"held\":$(rss_kb "$server")},\"agent_rss_kb\":{\"idle\":$idle_agent,\"held\":$(rss_kb "$agent")}}"
  }
  local result; result=$(drive held hold 127.0.0.1:$PUB "$CONNS")
  echo "$result"
  kill "$agent" "$server" "$echo_pid"; wait "$agent" "$server" 2>/dev/null || true
  [[ $result == *"\"alive_after_hold\":$CONNS,"* && $result == *'{"exit":0}'* ]]
}

agents() {
  local echo_pid server high=$((RANGE_LOW + AGENTS - 1))
  "$LOAD" hashes "$AGENTS" >"$work/tokens"
  start "$LOAD" echo 127.0.0.1:$ECHO; echo_pid=$LAST; wait_port $ECHO
  start "$BIN" server --listen 127.0.0.1:$CTRL --port-range $RANGE_LOW-$high --bind-host 127.0.0.1 \
    --token-file "$work/tokens" --heartbeat-interval 5s --heartbeat-timeout 15s --admin-listen 127.0.0.1:$ADMIN
  server=$LAST
  wait_port $CTRL
  local idle_server; idle_server=$(rss_kb "$server")
  held() {
    local t0 t1 tunnels
    t0=$(cpu_ticks "$server"); sleep 10; t1=$(cpu_ticks "$server")
    tunnels=$(http_get $ADMIN /metrics | awk '$1 == "zlayer_tunnel_tunnels" {print $2}')
    echo "{\"scale\":\"agents\",\"agents\":$AGENTS,\"server_tunnels\":$tunnels,\"server_rss_kb\":{\"idle\":$idle_server,\"held\":$(rss_kb "$server")},\"server_cpu_percent_idle\":$(( (t1 - t0) * 100 / $(getconf CLK_TCK) / 10 ))}"
  }
  local result; result=$(drive held agents ws://127.0.0.1:$CTRL/tunnel/v1 "$AGENTS" $ECHO)
  echo "$result"
  kill "$server" "$echo_pid"; wait "$server" 2>/dev/null || true
  [[ $result == *"\"connected_after_hold\":$AGENTS,"* && $result == *'{"exit":0}'* ]]
}

case ${1:-all} in
  conns) conns ;;
  agents) agents ;;
  all) conns && agents ;;
  *) echo "usage: $0 [conns|agents|all]" >&2; exit 2 ;;
esac
