# shellcheck shell=bash
# Shared by scripts/chaos.sh and bench/failover.sh: a 3-broker cluster of real `wharf serve`
# processes on this host, faults, and the checks after them. Source it; it defines functions
# only (and the variables below). Every process it starts is recorded in $CHAOS_RUN/pids so
# chaos_cleanup (the callers' EXIT trap) can stop them all.
#
# Brokers bind 127.0.0.<10+id> (one loopback address per broker) on port $CHAOS_PORT (client),
# +100 (internal), +200 (admin). In network namespaces (scripts/chaos/netns.sh, sourced below:
# chaos_netns_up sets CHAOS_NETNS_PREFIX and CHAOS_HOST_PREFIX) each broker runs in its own
# namespace on 10.x.y.<10+id>; clients stay in the root namespace.
#
# Environment: WHARF_BIN, LOADGEN_BIN (default: $CARGO_TARGET_DIR or target, release);
# CHAOS_PORT (default: a free port from 31092 up); REPLICA_LAG_MAX_MS (3000: a dead follower
# leaves the ISR after this); CHAOS_ISR_WAIT_S (60: bound on the wait for a full ISR);
# CHAOS_ISOLATED (broker ids, space-separated: cut off by a partition, so describe and cluster
# status ask the others); CHAOS_CONTROLLER (1: brokers 1-3 run the Raft controller,
# `controller_voters`; 0: a static cluster, for a wharf without the controller; default $CONTROLLER).

CHAOS_BROKERS=(1 2 3)
: "${REPLICA_LAG_MAX_MS:=3000}"
: "${CHAOS_ISR_WAIT_S:=60}"

chaos_now_ms() { date +%s%3N; }
chaos_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

chaos_bins() {
  local target=${CARGO_TARGET_DIR:-target}
  WHARF_BIN=${WHARF_BIN:-$target/release/wharf}
  LOADGEN_BIN=${LOADGEN_BIN:-$target/release/wharf-loadgen}
  if [[ ! -x $WHARF_BIN || ! -x $LOADGEN_BIN ]]; then
    cargo build --release -p wharf -p wharf-loadgen
  fi
}

# Host (address) of broker $1; a network-namespace run overrides CHAOS_HOST_PREFIX. With
# CHAOS_LAYOUT=cluster-local the cluster is deploy/cluster-local.sh's (127.0.0.1, client ports
# BASE_PORT.., pid files in the same place): bench/failover.sh.
chaos_host() {
  if [[ ${CHAOS_LAYOUT:-} == cluster-local ]]; then echo 127.0.0.1; else echo "${CHAOS_HOST_PREFIX:-127.0.0.}$((10 + $1))"; fi
}
chaos_addr() {
  if [[ ${CHAOS_LAYOUT:-} == cluster-local ]]; then echo "127.0.0.1:$((BASE_PORT + $1 - 1))"; else echo "$(chaos_host "$1"):$CHAOS_PORT"; fi
}
chaos_bootstrap() {
  local out=() b
  for b in "${CHAOS_BROKERS[@]}"; do out+=("$(chaos_addr "$b")"); done
  (IFS=,; echo "${out[*]}")
}

# A free client port whose +100 and +200 are free on every broker address.
chaos_pick_port() {
  [[ -n ${CHAOS_PORT:-} ]] && return
  CHAOS_PORT=$(python3 - "$$" <<'PY'
import socket, sys
def free(host, port):
    with socket.socket() as s:
        try:
            s.bind((host, port)); return True
        except OSError:
            return False
start = 31092 + (int(sys.argv[1]) % 300) * 10
for base in list(range(start, 40000, 10)) + list(range(31092, start, 10)):
    if all(free(f"127.0.0.{10 + b}", base + d) for b in (1, 2, 3) for d in (0, 100, 200)):
        print(base); break
else:
    raise SystemExit("no free ports")
PY
)
}

# chaos_cluster_init DIR: configs for brokers 1..3 in DIR (fresh data directories).
chaos_cluster_init() {
  CHAOS_DIR=$1
  mkdir -p "$CHAOS_DIR"
  (umask 077; head -c 32 /dev/urandom | base64 > "$CHAOS_DIR/cluster.secret")
  local id b
  for id in "${CHAOS_BROKERS[@]}"; do
    {
      echo "broker_id = $id"
      echo "data_dir = \"$CHAOS_DIR/broker-$id\""
      echo "listen = \"$(chaos_addr "$id")\""
      echo "admin_listen = \"$(chaos_host "$id"):$((CHAOS_PORT + 200))\""
      echo "shards = 1"
      echo "cpu_set = \"unbound\""
      echo "[topic_defaults]"
      echo "min_insync_replicas = 2"
      echo "[cluster]"
      echo "replica_lag_max_ms = $REPLICA_LAG_MAX_MS"
      echo "internal_listen = \"$(chaos_host "$id"):$((CHAOS_PORT + 100))\""
      echo "secret_file = \"$CHAOS_DIR/cluster.secret\""
      if [[ ${CHAOS_CONTROLLER:-${CONTROLLER:-1}} == 1 ]]; then
        echo "controller_voters = [$(IFS=,; echo "${CHAOS_BROKERS[*]}")]"
      fi
      for b in "${CHAOS_BROKERS[@]}"; do
        echo "[[cluster.brokers]]"
        echo "id = $b"
        echo "address = \"$(chaos_addr "$b")\""
        echo "internal_address = \"$(chaos_host "$b"):$((CHAOS_PORT + 100))\""
      done
    } > "$CHAOS_DIR/broker-$id.toml"
  done
}

chaos_pid() { cat "$CHAOS_DIR/broker-$1.pid" 2>/dev/null; }
chaos_running() { local pid; pid=$(chaos_pid "$1") && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

# chaos_start ID: starts broker ID (in its network namespace when CHAOS_NETNS_PREFIX is set).
chaos_start() {
  local id=$1
  chaos_running "$id" && return 0
  mkdir -p "$CHAOS_DIR/broker-$id"
  if [[ -n ${CHAOS_NETNS_PREFIX:-} ]]; then
    ip netns exec "${CHAOS_NETNS_PREFIX}$id" "$WHARF_BIN" serve --config "$CHAOS_DIR/broker-$id.toml" \
      >> "$CHAOS_DIR/broker-$id.log" 2>&1 &
  else
    "$WHARF_BIN" serve --config "$CHAOS_DIR/broker-$id.toml" >> "$CHAOS_DIR/broker-$id.log" 2>&1 &
  fi
  echo $! > "$CHAOS_DIR/broker-$id.pid"
  echo $! >> "$CHAOS_RUN/pids"
}

# chaos_wait_ready ID [SECONDS]: until /readyz answers 200 (bounded).
chaos_wait_ready() {
  local id=$1 deadline=$(( $(date +%s) + ${2:-30} ))
  while (( $(date +%s) < deadline )); do
    curl -fsS -m 1 "http://$(chaos_host "$id"):$((CHAOS_PORT + 200))/readyz" >/dev/null 2>&1 && return 0
    if ! chaos_running "$id"; then
      chaos_log "broker $id exited; last log lines:"; tail -n 20 "$CHAOS_DIR/broker-$id.log" >&2; return 1
    fi
    sleep 0.1
  done
  chaos_log "broker $id not ready after ${2:-30} s"; return 1
}

chaos_up() {
  local id
  for id in "${CHAOS_BROKERS[@]}"; do chaos_start "$id"; done
  for id in "${CHAOS_BROKERS[@]}"; do chaos_wait_ready "$id" || return 1; done
}

# chaos_kill ID SIGNAL: sends SIGNAL (KILL, TERM, STOP, CONT) to broker ID; KILL and TERM wait
# (bounded) until it exited.
chaos_kill() {
  local id=$1 signal=$2 pid
  pid=$(chaos_pid "$id") || return 0
  [[ -n $pid ]] || return 0
  kill -"$signal" "$pid" 2>/dev/null || return 0
  echo "$signal $id $(chaos_now_ms)" >> "$CHAOS_RUN/events"
  case $signal in
    KILL|TERM)

      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
      chaos_log "broker $id still alive 30 s after SIG$signal; killing it"
      kill -KILL "$pid" 2>/dev/null || true ;;
  esac
}

chaos_restart() {
  if [[ ${CHAOS_LAYOUT:-} == cluster-local ]]; then
    WHARF_BIN=$WHARF_BIN deploy/cluster-local.sh restart "$CHAOS_DIR" "$1" >&2 || return 1
    chaos_pid "$1" >> "$CHAOS_RUN/pids"
    echo "START $1 $(chaos_now_ms)" >> "$CHAOS_RUN/events"
    return 0
  fi
  chaos_start "$1" && echo "START $1 $(chaos_now_ms)" >> "$CHAOS_RUN/events" && chaos_wait_ready "$1" 60
}

chaos_down() {
  local id
  for id in "${CHAOS_BROKERS[@]}"; do
    kill -CONT "$(chaos_pid "$id")" 2>/dev/null || true
    chaos_kill "$id" TERM
  done
}

# chaos_not_isolated: the brokers not named in CHAOS_ISOLATED, one per line.
chaos_not_isolated() {
  local b
  for b in "${CHAOS_BROKERS[@]}"; do
    [[ " ${CHAOS_ISOLATED:-} " == *" $b "* ]] || echo "$b"
  done
}

# chaos_describe_from BROKER TOPIC: `wharf topic describe --format json` as BROKER answers it.
chaos_describe_from() {
  timeout 10 "$WHARF_BIN" topic describe "$2" --bootstrap "$(chaos_addr "$1")" --format json 2>/dev/null
}

# chaos_describe TOPIC: the description from the first broker (not isolated) that answers.
chaos_describe() {
  local b
  for b in $(chaos_not_isolated); do chaos_describe_from "$b" "$1" && return 0; done
  return 1
}

# chaos_leader TOPIC PARTITION: the broker id leading it (as the brokers describe it).
chaos_leader() {
  chaos_describe "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(next(p["leader"] for p in d["partitions"] if p["partition"] == int(sys.argv[1])))' "$2"
}

# chaos_full_isr TOPIC: true when every partition is served (error none) with ISR = replicas.
chaos_full_isr() {
  chaos_describe "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
ok = all(p["error"] == "none" and sorted(p["isr"]) == sorted(p["replicas"]) for p in d["partitions"])
sys.exit(0 if ok else 1)' 2>/dev/null
}

# chaos_wait_full_isr TOPIC: bounded by CHAOS_ISR_WAIT_S; prints the last description on failure.
chaos_wait_full_isr() {
  local deadline=$(( $(date +%s) + CHAOS_ISR_WAIT_S ))
  while (( $(date +%s) < deadline )); do
    chaos_full_isr "$1" && return 0
    sleep 0.5
  done
  chaos_log "ISR of $1 not full after ${CHAOS_ISR_WAIT_S} s:"
  chaos_describe "$1" >&2 || chaos_log "(no broker answers describe)"
  return 1
}

# chaos_wait_new_leader TOPIC PARTITION OLD SECONDS: true once a broker other than OLD leads
# the partition and serves it; false after SECONDS (no failover).
chaos_wait_new_leader() {
  local deadline=$(( $(date +%s) + $4 ))
  while (( $(date +%s) < deadline )); do
    if chaos_describe "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = next(p for p in d["partitions"] if p["partition"] == int(sys.argv[1]))
sys.exit(0 if p["leader"] != int(sys.argv[2]) and p["error"] == "none" else 1)' "$2" "$3" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

# chaos_controller_leader: the controller leader's broker id from `wharf cluster status`
# (being added with the controller), asked of the brokers not isolated. Fails, printing "not
# available yet", without it. Accepted output: JSON with a key naming the leader
# ("controller_leader", "leader_id", "leader"), or text with "leader ... <id>".
chaos_controller_leader() {
  local b
  chaos_has_cluster_status || return 1
  for b in $(chaos_not_isolated); do chaos_controller_leader_from "$b" && return 0; done
  echo "not available yet: 'wharf cluster status' names no controller leader"; return 1
}

# chaos_has_cluster_status: true when this wharf has `cluster status`; else prints why not.
chaos_has_cluster_status() {
  "$WHARF_BIN" cluster status --help >/dev/null 2>&1 && return 0
  echo "not available yet: this wharf has no 'cluster status' command"; return 1
}

# chaos_controller_leader_from BROKER: the controller leader as BROKER reports it.
chaos_controller_leader_from() {
  local out
  out=$(timeout 10 "$WHARF_BIN" cluster status --bootstrap "$(chaos_addr "$1")" --format json 2>/dev/null) ||
    out=$(timeout 10 "$WHARF_BIN" cluster status --bootstrap "$(chaos_addr "$1")" 2>/dev/null) || return 1
  python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
try:
    d = json.loads(out)
    def find(o):
        if isinstance(o, dict):
            for k in ("controller_leader", "leader_id", "leader"):
                if isinstance(o.get(k), int):
                    return o[k]
            for v in o.values():
                r = find(v)
                if r is not None:
                    return r
        return None
    r = find(d)
except ValueError:
    m = re.search(r"leader\D*(\d+)", out, re.I)
    r = int(m.group(1)) if m else None
if r is None:
    sys.exit(1)
print(r)
PY
}

# chaos_cleanup: stops every process this run started (SIGCONT first: a stopped process
# ignores SIGTERM), then SIGKILL after 10 s.
chaos_cleanup() {
  [[ -n ${CHAOS_RUN:-} && -f $CHAOS_RUN/pids ]] || return 0
  local pid
  while read -r pid; do
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done < "$CHAOS_RUN/pids"
  for _ in $(seq 1 100); do
    local alive=0
    while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$CHAOS_RUN/pids"
    (( alive )) || return 0
    sleep 0.1
  done
  while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$CHAOS_RUN/pids"
}

# chaos_gaps GAPS_JSON EVENTS PARTITION: per fault (KILL/TERM/STOP/ISOLATE events), the failover
# gap on PARTITION: last ack before the fault to the first after it, and whether an ack arrived
# before the victim was started, continued or healed again. With SETTLE_MS (4th argument) also
# whether acks still arrived later than SETTLE_MS after the fault and before the victim came
# back ("served_after_settle": a partition isolated from its leader may see an in-flight ack
# or two while the ISR shrinks; only a new leader keeps them coming), and the largest gap in
# that window, its edges included ("window_max_gap_ms"). One JSON object per line.
chaos_gaps() {
  python3 - "$@" <<'PY'
import bisect, json, sys
gaps, events, partition = sys.argv[1], sys.argv[2], int(sys.argv[3])
settle = int(sys.argv[4]) if len(sys.argv) > 4 else 0
times = json.load(open(gaps))["partitions"][partition]["ack_unix_ms"]
evs = [l.split() for l in open(events) if l.strip()]
for i, (sig, broker, ms) in enumerate(evs):
    if sig not in ("KILL", "TERM", "STOP", "ISOLATE"):
        continue
    ms = int(ms)

    def window_max_gap(start, end):
        if end is None:
            return None
        w = [start] + [t for t in times if start < t < end] + [end]
        return max(b - a for a, b in zip(w, w[1:]))
    back = next((int(m) for s, b, m in evs[i + 1:] if b == broker and s in ("START", "CONT", "HEAL")), None)
    before = times[bisect.bisect_left(times, ms) - 1] if bisect.bisect_left(times, ms) > 0 else None
    j = bisect.bisect_right(times, ms)
    after = times[j] if j < len(times) else None
    print(json.dumps({
        "signal": sig, "broker": int(broker), "at_unix_ms": ms, "back_unix_ms": back,
        "gap_ms": (after - before) if (after is not None and before is not None) else None,
        "served_while_down": after is not None and (back is None or after < back),
        "served_after_settle": any(ms + settle < t and (back is None or t < back) for t in times),
        "window_max_gap_ms": window_max_gap(ms, back),
    }))
PY
}

# shellcheck source=scripts/chaos/netns.sh
source "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
