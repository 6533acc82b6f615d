#!/usr/bin/env bash
# A 3-broker Wharf cluster on this host (127.0.0.1, distinct ports and data directories).
#
#   deploy/cluster-local.sh up DIR          start brokers 1, 2, 3; returns once all are ready
#   deploy/cluster-local.sh down DIR        stop them (SIGTERM, then SIGKILL after 20 s)
#   deploy/cluster-local.sh restart DIR N   restart broker N with the same settings
#
# Client ports BASE_PORT, BASE_PORT+1, BASE_PORT+2 (env BASE_PORT, default 9092); admin HTTP
# ports ADMIN_BASE_PORT.. (default BASE_PORT+552, i.e. 9644..); internal listeners (replication
# and topic changes between brokers, peers authenticated with the cluster secret in
# DIR/cluster.secret, made once with mode 600) INTERNAL_BASE_PORT.. (default BASE_PORT+100,
# i.e. 9192..); data in DIR/broker-N, logs in
# DIR/broker-N.log, pids in DIR/broker-N.pid, configs in DIR/broker-N.toml. WHARF_BIN picks the
# binary (default target/release/wharf, built if missing); SHARDS (default 1) shards per broker;
# CPU_SET (default unbound: three brokers on one host must not all pin their shard 0 to CPU 0);
# REPLICA_LAG_MAX_MS (default 10000) the ISR lag limit; MIN_INSYNC (default 2); CONTROLLER
# (default 1: brokers 1, 2, 3 run the Raft controller and partitions fail over automatically;
# 0: a static cluster whose leaders never move); EXTRA_CONFIG (TOML added to every broker's
# config before its sections, e.g. a [replica_selection] table); RACKS (comma-separated rack of
# brokers 1, 2, 3, e.g. "a,b,c": follower reads by rack).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 ]] || usage
command=$1
dir=$2
base_port=${BASE_PORT:-9092}
admin_base_port=${ADMIN_BASE_PORT:-$((base_port + 552))}
internal_base_port=${INTERNAL_BASE_PORT:-$((base_port + 100))}
shards=${SHARDS:-1}
bin=${WHARF_BIN:-target/release/wharf}
brokers=(1 2 3)

client_port() { echo $((base_port + $1 - 1)); }
admin_port() { echo $((admin_base_port + $1 - 1)); }
internal_port() { echo $((internal_base_port + $1 - 1)); }

# The cluster secret every broker proves on the others' internal listeners.
write_secret() {
  [[ -s "$dir/cluster.secret" ]] && return
  (umask 077; head -c 32 /dev/urandom | base64 > "$dir/cluster.secret")
}

write_config() {
  local id=$1
  {
    echo "broker_id = $id"
    echo "data_dir = \"$dir/broker-$id\""
    echo "listen = \"127.0.0.1:$(client_port "$id")\""
    echo "admin_listen = \"127.0.0.1:$(admin_port "$id")\""
    echo "shards = $shards"
    echo "cpu_set = \"${CPU_SET:-unbound}\""
    if [[ -n ${EXTRA_CONFIG:-} ]]; then
      printf '%s\n' "$EXTRA_CONFIG"
    fi
    echo "[topic_defaults]"
    echo "min_insync_replicas = ${MIN_INSYNC:-2}"
    echo "[cluster]"
    echo "replica_lag_max_ms = ${REPLICA_LAG_MAX_MS:-10000}"
    echo "internal_listen = \"127.0.0.1:$(internal_port "$id")\""
    echo "secret_file = \"$dir/cluster.secret\""
    if [[ ${CONTROLLER:-1} == 1 ]]; then
      echo "controller_voters = [1, 2, 3]"
    fi
    for b in "${brokers[@]}"; do
      echo "[[cluster.brokers]]"
      echo "id = $b"
      echo "address = \"127.0.0.1:$(client_port "$b")\""
      echo "internal_address = \"127.0.0.1:$(internal_port "$b")\""
      if [[ -n ${RACKS:-} ]]; then
        local racks
        IFS=, read -r -a racks <<<"$RACKS"
        echo "rack = \"${racks[$((b - 1))]}\""
      fi
    done
  } > "$dir/broker-$id.toml"
}

running() { [[ -f "$dir/broker-$1.pid" ]] && kill -0 "$(cat "$dir/broker-$1.pid")" 2>/dev/null; }

start() {
  local id=$1
  if running "$id"; then echo "broker $id already runs (pid $(cat "$dir/broker-$id.pid"))"; return; fi
  # Another process on our ports would answer the readiness check for a broker that failed.
  local port
  for port in "$(client_port "$id")" "$(admin_port "$id")" "$(internal_port "$id")"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "broker $id: 127.0.0.1:$port is in use by another process" >&2; return 1
    fi
  done
  write_secret
  write_config "$id"
  mkdir -p "$dir/broker-$id"
  nohup "$bin" serve --config "$dir/broker-$id.toml" >> "$dir/broker-$id.log" 2>&1 &
  echo $! > "$dir/broker-$id.pid"
}

wait_ready() {
  local id=$1
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$(admin_port "$id")/readyz" > /dev/null 2>&1; then
      echo "broker $id ready on 127.0.0.1:$(client_port "$id") (pid $(cat "$dir/broker-$id.pid"))"
      return 0
    fi
    if ! running "$id"; then
      echo "broker $id exited; last log lines:" >&2; tail -n 20 "$dir/broker-$id.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "broker $id not ready after 30 s; see $dir/broker-$id.log" >&2
  return 1
}

stop() {
  local id=$1
  running "$id" || { rm -f "$dir/broker-$id.pid"; return 0; }
  local pid; pid=$(cat "$dir/broker-$id.pid")
  kill -TERM "$pid"
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "broker $id did not stop in 20 s; killing it" >&2; kill -KILL "$pid"; fi
  rm -f "$dir/broker-$id.pid"
  echo "broker $id stopped"
}

if [[ ! -x "$bin" ]]; then cargo build --release -p wharf; fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
case "$command" in
  up)
    for id in "${brokers[@]}"; do start "$id"; done
    for id in "${brokers[@]}"; do wait_ready "$id"; done ;;
  down)
    for id in "${brokers[@]}"; do stop "$id"; done ;;
  restart)
    [[ $# -eq 3 && " ${brokers[*]} " == *" $3 "* ]] || usage
    stop "$3"; start "$3"; wait_ready "$3" ;;
  *) usage ;;
esac
