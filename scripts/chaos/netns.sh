#!/usr/bin/env bash
# shellcheck shell=bash
# Network namespaces for the chaos suite's partition scenarios (f). Sourced by lib.sh (functions
# only), or run directly:
#
#   scripts/chaos/netns.sh check                 can this host run them? (prints why not; exit 3)
#   scripts/chaos/netns.sh up RUN                namespaces for one run; state in RUN/netns
#   scripts/chaos/netns.sh down RUN              tear down everything RUN/netns names
#   scripts/chaos/netns.sh isolate RUN N [peers|all]   heal RUN N   flap RUN N SECONDS [peers|all]
#   scripts/chaos/netns.sh selftest              up, brokers serve, isolation, teardown (root)
#
# Layout of one run (ID = w<pid>r<seq>, every interface name <= 13 characters):
#
#   root namespace                 ID-hub namespace               ID-b1 .. ID-b3
#   IDr 10.X.Y.1/24  <-- veth -->  IDx ┐
#                                      ├ bridge IDbr
#                                  IDhN ┘  <------ veth ------->  IDbN 10.X.Y.(10+N)/24, lo up
#
# Clients (loadgen, CLI, curl) stay in the root namespace and reach every broker through IDr.
# The bridge lives in the hub namespace, so the host's own iptables (FORWARD policy,
# br_netfilter) never see broker-to-broker traffic. Faults are iptables rules in a chain CHAOS
# that each broker namespace jumps to from INPUT and OUTPUT: "peers" drops traffic to and from
# the other brokers' addresses only (clients still reach the broker), "all" drops everything on
# its veth. Deleting the namespaces removes the veths, the bridge and the rules with them;
# teardown kills what still runs inside first (a namespace with a process in it outlives its
# name), then checks that no namespace and no link of the run is left.

# The state file RUN/netns holds NETNS_ID, NETNS_SUBNET (10.X.Y), NETNS_HOSTIF; the rest follows.
NETNS_SEQ=${NETNS_SEQ:-0}

netns_log() { echo "[$(date +%H:%M:%S)] netns: $*" >&2; }

# chaos_netns_check: true when this host can run the scenarios; else prints the reason (one
# line, for SKIPPED). Installs iproute2/iptables with apt-get when root and they are missing.
chaos_netns_check() {
  if [[ $(id -u) != 0 ]]; then echo "needs root (network namespaces, veth, iptables)"; return 1; fi
  if ! command -v ip >/dev/null || ! command -v iptables >/dev/null; then
    if command -v apt-get >/dev/null; then
      netns_log "installing iproute2 iptables"
      DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2 iptables >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2 iptables >/dev/null 2>&1; }
    fi
    command -v ip >/dev/null || { echo "needs 'ip' (apt-get install iproute2)"; return 1; }
    command -v iptables >/dev/null || { echo "needs 'iptables' (apt-get install iptables)"; return 1; }
  fi
  # A real probe: a namespace, a veth pair and an iptables rule inside it.
  local probe="w$$probe" err
  if ! err=$( { ip netns add "$probe" &&
      ip link add "${probe}a" netns "$probe" type veth peer name "${probe}b" netns "$probe" &&
      ip netns exec "$probe" iptables -w -A INPUT -i "${probe}a" -j DROP; } 2>&1); then
    ip netns del "$probe" 2>/dev/null
    echo "cannot create namespaces/veths/iptables rules here: ${err//$'\n'/ }"; return 1
  fi
  ip netns del "$probe"
}

# netns_load RUN: the state of RUN's namespaces into NETNS_* variables.
netns_load() {
  local state=$1/netns
  [[ -f $state ]] || return 1
  NETNS_ID='' NETNS_SUBNET='' NETNS_HOSTIF=''
  # shellcheck source=/dev/null
  source "$state"
  [[ -n $NETNS_ID ]] || return 1
  NETNS_HUB=$NETNS_ID-hub
  NETNS_PREFIX=$NETNS_ID-b
}

netns_ns() { echo "$NETNS_PREFIX$1"; }               # broker N's namespace
netns_addr() { echo "$NETNS_SUBNET.$((10 + $1))"; }  # broker N's address

# A 10.X.Y.0/24 that no address or route of the root namespace touches; X in 200..249.
netns_pick_subnet() {
  local used n x y
  used=$(ip -o -4 addr show; ip -4 route show table all 2>/dev/null)
  for (( n = 0; n < 12800; n++ )); do
    local k=$(( ($$ * 31 + NETNS_SEQ * 7 + n) % 12800 ))
    x=$(( 200 + k / 256 )); y=$(( k % 256 ))
    grep -q "10\.$x\.$y\." <<< "$used" || { echo "10.$x.$y"; return 0; }
  done
  return 1
}

# netns_build BROKERS...: the layout (NETNS_* set); stops at the first failing command.
netns_build() {
  local b ns
  ip netns add "$NETNS_HUB" || return 1
  ip -n "$NETNS_HUB" link set lo up || return 1
  ip -n "$NETNS_HUB" link add "${NETNS_ID}br" type bridge || return 1
  ip -n "$NETNS_HUB" link set "${NETNS_ID}br" up || return 1
  ip link add "$NETNS_HOSTIF" type veth peer name "${NETNS_ID}x" netns "$NETNS_HUB" || return 1
  ip -n "$NETNS_HUB" link set "${NETNS_ID}x" master "${NETNS_ID}br" up || return 1
  ip addr add "$NETNS_SUBNET.1/24" dev "$NETNS_HOSTIF" || return 1
  ip link set "$NETNS_HOSTIF" up || return 1
  for b in "$@"; do
    ns=$(netns_ns "$b")
    ip netns add "$ns" || return 1
    ip -n "$ns" link set lo up || return 1
    ip link add "${NETNS_ID}b$b" netns "$ns" type veth peer name "${NETNS_ID}h$b" netns "$NETNS_HUB" || return 1
    ip -n "$NETNS_HUB" link set "${NETNS_ID}h$b" master "${NETNS_ID}br" up || return 1
    ip -n "$ns" addr add "$(netns_addr "$b")/24" dev "${NETNS_ID}b$b" || return 1
    ip -n "$ns" link set "${NETNS_ID}b$b" up || return 1
    ip netns exec "$ns" iptables -w -N CHAOS || return 1
    ip netns exec "$ns" iptables -w -A INPUT -j CHAOS || return 1
    ip netns exec "$ns" iptables -w -A OUTPUT -j CHAOS || return 1
  done
}

# chaos_netns_up RUN [BROKERS...]: builds the layout for brokers (default 1 2 3), writes RUN/netns
# and exports CHAOS_NETNS_PREFIX and CHAOS_HOST_PREFIX for lib.sh. On failure it tears down
# what it made and returns 1.
chaos_netns_up() {
  local run=$1; shift
  local brokers=("$@"); [[ ${#brokers[@]} -gt 0 ]] || brokers=(1 2 3)
  NETNS_SEQ=$(( NETNS_SEQ + 1 ))
  NETNS_ID="w$$r$NETNS_SEQ"
  NETNS_SUBNET=$(netns_pick_subnet) || { netns_log "no free 10.x.y.0/24"; return 1; }
  NETNS_HOSTIF=${NETNS_ID}r
  mkdir -p "$run"
  # State first: a teardown after a failure half-way finds what to remove.
  printf 'NETNS_ID=%s\nNETNS_SUBNET=%s\nNETNS_HOSTIF=%s\nNETNS_BROKERS="%s"\n' \
    "$NETNS_ID" "$NETNS_SUBNET" "$NETNS_HOSTIF" "${brokers[*]}" > "$run/netns"
  netns_load "$run"
  local err
  if ! err=$(netns_build "${brokers[@]}" 2>&1); then
    netns_log "setup failed: ${err//$'\n'/ }"
    chaos_netns_down "$run"; return 1
  fi
  # Bounded wait until the root namespace reaches every broker address (links come up
  # asynchronously; the bridge forwards at once, no STP).
  local b ok
  for b in "${brokers[@]}"; do
    ok=0
    for _ in $(seq 1 50); do
      if netns_ping "$b"; then ok=1; break; fi
      sleep 0.1
    done
    (( ok )) || { netns_log "broker $b's namespace unreachable"; chaos_netns_down "$run"; return 1; }
  done
  export CHAOS_NETNS_PREFIX=$NETNS_PREFIX CHAOS_HOST_PREFIX="$NETNS_SUBNET."
  netns_log "up: $NETNS_ID, $NETNS_SUBNET.0/24, brokers ${brokers[*]} at $NETNS_SUBNET.$((10 + brokers[0]))..; host side $NETNS_HOSTIF"
}

# netns_ping N: the root namespace resolves broker N's address at layer 2 (arp through the
# bridge) — no ping binary needed: a TCP connect to a closed port answers with RST at once.
netns_ping() {
  timeout 1 bash -c "exec 3<>/dev/tcp/$(netns_addr "$1")/9" 2>/dev/null || true
  ip neigh show "$(netns_addr "$1")" dev "$NETNS_HOSTIF" 2>/dev/null | grep -q 'lladdr'
}

# chaos_netns_down RUN: kills every process in the run's namespaces, deletes them (and with
# them veths, bridge and rules) and the host-side veth, removes RUN/netns. Reports leftovers.
chaos_netns_down() {
  local run=$1 b ns pid left=()
  netns_load "$run" || return 0
  local spaces=("$NETNS_HUB")
  for b in ${NETNS_BROKERS:-1 2 3}; do spaces+=("$(netns_ns "$b")"); done
  for ns in "${spaces[@]}"; do
    [[ -e /run/netns/$ns ]] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -CONT "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true; done
  done
  for ns in "${spaces[@]}"; do
    [[ -e /run/netns/$ns ]] || continue
    for _ in $(seq 1 50); do [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break; sleep 0.1; done
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$NETNS_HOSTIF" 2>/dev/null || true
  for _ in $(seq 1 30); do  # veths of a deleted namespace go away asynchronously
    left=()
    ip netns list | grep -q "^$NETNS_ID-" && left+=("namespaces: $(ip netns list | grep "^$NETNS_ID-" | cut -d' ' -f1 | tr '\n' ' ')")
    ip -o link show | grep -q ": ${NETNS_ID}[a-z]" && left+=("links: $(ip -o link show | grep ": ${NETNS_ID}[a-z]" | cut -d: -f2 | tr '\n' ' ')")
    [[ ${#left[@]} -eq 0 ]] && break
    sleep 0.1
  done
  if [[ ${#left[@]} -gt 0 ]]; then netns_log "teardown of $NETNS_ID left ${left[*]}"; return 1; fi
  rm -f "$run/netns"
  if [[ ${CHAOS_NETNS_PREFIX:-} == "$NETNS_PREFIX" ]]; then unset CHAOS_NETNS_PREFIX CHAOS_HOST_PREFIX; fi
  netns_log "down: $NETNS_ID (no namespace or link of it left)"
}

# netns_event WHAT N: "WHAT N ms" in $CHAOS_RUN/events (the gap report's fault log).
netns_event() { [[ -n ${CHAOS_RUN:-} ]] && echo "$1 $2 $(date +%s%3N)" >> "$CHAOS_RUN/events"; return 0; }

# chaos_netns_isolate N [peers|all]: peers (default): N neither sends to nor receives from the
# other brokers; clients still reach it. all: nothing passes N's veth. Adds to earlier rules.
chaos_netns_isolate() {
  local id=$1 mode=${2:-peers} ns b
  ns=$(netns_ns "$id")
  if [[ $mode == all ]]; then
    ip netns exec "$ns" iptables -w -A CHAOS -i "${NETNS_ID}b$id" -j DROP &&
      ip netns exec "$ns" iptables -w -A CHAOS -o "${NETNS_ID}b$id" -j DROP || return 1
  else
    for b in ${NETNS_BROKERS:-1 2 3}; do
      [[ $b == "$id" ]] && continue
      ip netns exec "$ns" iptables -w -A CHAOS -s "$(netns_addr "$b")" -j DROP &&
        ip netns exec "$ns" iptables -w -A CHAOS -d "$(netns_addr "$b")" -j DROP || return 1
    done
  fi
  netns_event ISOLATE "$id"
}

# chaos_netns_heal N: removes every rule of N's CHAOS chain.
chaos_netns_heal() {
  ip netns exec "$(netns_ns "$1")" iptables -w -F CHAOS || return 1
  netns_event HEAL "$1"
}

# chaos_netns_flap N SECONDS [peers|all]: isolate, heal, ... every 1-2 s (random) for SECONDS;
# ends healed.
chaos_netns_flap() {
  local id=$1 end=$(( $(date +%s) + $2 )) mode=${3:-peers} n=0
  while (( $(date +%s) < end )); do
    chaos_netns_isolate "$id" "$mode" || return 1
    sleep "1.$(( RANDOM % 10 ))"
    chaos_netns_heal "$id" || return 1
    n=$(( n + 1 ))
    (( $(date +%s) < end )) && sleep "1.$(( RANDOM % 10 ))"
  done
  netns_log "flapped broker $id's link $n times"
}

# chaos_netns_connect FROM HOST PORT: a TCP connect (1 s bound) from broker FROM's namespace, or
# from the root namespace when FROM is "root".
chaos_netns_connect() {
  if [[ $1 == root ]]; then
    timeout 1 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null
  else
    ip netns exec "$(netns_ns "$1")" timeout 1 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null
  fi
}

# chaos_netns_rules N: N's CHAOS chain (for logs).
chaos_netns_rules() { ip netns exec "$(netns_ns "$1")" iptables -w -S CHAOS; }

# --- run directly
netns_selftest() {
  local run root status=0
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  cd "$root" || return 1
  # shellcheck source=scripts/chaos/lib.sh
  source scripts/chaos/lib.sh
  run=$root/target/chaos/netns-selftest-$$
  mkdir -p "$run"; : > "$run/pids"; : > "$run/events"
  CHAOS_RUN=$run
  # shellcheck disable=SC2064
  trap "CHAOS_RUN='$run' chaos_cleanup; chaos_netns_down '$run'" EXIT
  trap 'exit 130' INT TERM
  local why; why=$(chaos_netns_check) || { echo "SKIPPED: $why"; return 3; }
  chaos_bins
  chaos_netns_up "$run" || return 1
  CHAOS_PORT=${CHAOS_PORT:-31092}
  chaos_cluster_init "$run/cluster"
  check() { if "${@:2}"; then echo "ok    $1"; else echo "FAIL  $1"; status=1; fi; }
  not() { ! "$@"; }
  check "brokers start in their namespaces and answer /readyz from the root namespace" chaos_up
  if (( status )); then echo "FAIL  (the rest needs the brokers; see $run/cluster/broker-*.log)"; trap - EXIT; CHAOS_RUN=$run chaos_cleanup; chaos_netns_down "$run"; return 1; fi
  local b
  for b in 1 2 3; do
    check "broker $b listens on $(chaos_addr "$b") inside $(netns_ns "$b") only" \
      bash -c "ip netns exec $(netns_ns "$b") ss -Htln | grep -q '$(chaos_addr "$b")' && ! ss -Htln | grep -q '$(chaos_addr "$b")'"
  done
  check "topic create through the namespaces" "$WHARF_BIN" topic create netns-selftest --partitions 3 \
    --replication-factor 3 --config min_insync_replicas=2 --bootstrap "$(chaos_addr 1)"
  check "loadgen --verify (5 s, acks=all) from the root namespace" timeout -s KILL 90 "$LOADGEN_BIN" \
    --bootstrap "$(chaos_bootstrap)" --topic netns-selftest --acks all --rate 500 --producers 1 \
    --threads 1 --message-bytes 256 --warmup 0 --duration 5 --verify --verify-timeout 30 --json "$run/loadgen.json"
  check "full ISR" chaos_wait_full_isr netns-selftest
  local ip=$((CHAOS_PORT + 100))
  check "broker 1 -> broker 2 internal port connects (before isolation)" chaos_netns_connect 1 "$(chaos_host 2)" "$ip"
  chaos_netns_isolate 1 peers
  chaos_netns_rules 1 | sed 's/^/      /'
  check "isolate 1 peers: 1 -> 2 blocked" not chaos_netns_connect 1 "$(chaos_host 2)" "$ip"
  check "isolate 1 peers: 3 -> 1 blocked" not chaos_netns_connect 3 "$(chaos_host 1)" "$ip"
  check "isolate 1 peers: 2 -> 3 still connects" chaos_netns_connect 2 "$(chaos_host 3)" "$ip"
  check "isolate 1 peers: client (root) -> 1 still connects" chaos_netns_connect root "$(chaos_host 1)" "$CHAOS_PORT"
  check "isolate 1 peers: client (root) -> 1 /readyz answers" curl -fsS -m 2 -o /dev/null "http://$(chaos_host 1):$((CHAOS_PORT + 200))/readyz"
  chaos_netns_heal 1
  check "heal 1: 1 -> 2 connects again" chaos_netns_connect 1 "$(chaos_host 2)" "$ip"
  chaos_netns_isolate 2 all
  check "isolate 2 all: client (root) -> 2 blocked" not chaos_netns_connect root "$(chaos_host 2)" "$CHAOS_PORT"
  check "isolate 2 all: 1 -> 2 blocked" not chaos_netns_connect 1 "$(chaos_host 2)" "$ip"
  check "isolate 2 all: client (root) -> 1 still connects" chaos_netns_connect root "$(chaos_host 1)" "$CHAOS_PORT"
  chaos_netns_heal 2
  check "heal 2: client (root) -> 2 connects again" chaos_netns_connect root "$(chaos_host 2)" "$CHAOS_PORT"
  check "flap 3 s" chaos_netns_flap 3 3
  check "flap ends healed" chaos_netns_connect 3 "$(chaos_host 1)" "$ip"
  check "full ISR after the faults" chaos_wait_full_isr netns-selftest
  local id=$NETNS_ID
  chaos_down 2>/dev/null; CHAOS_RUN=$run chaos_cleanup
  check "teardown" chaos_netns_down "$run"
  check "nothing of $id left (ip netns list, ip link)" bash -c "! ip netns list | grep -q '^$id-' && ! ip -o link show | grep -q ': ${id}[a-z]'"
  trap - EXIT
  rm -rf "$run"
  return "$status"
}

if [[ ${#BASH_SOURCE[@]} -eq 1 && ${BASH_SOURCE[0]} == "$0" ]]; then  # run, not sourced
  set -uo pipefail
  cmd=${1:-}; shift || true
  case $cmd in
    check) why=$(chaos_netns_check) || { echo "SKIPPED: $why"; exit 3; }; echo "ok" ;;
    up) chaos_netns_up "$@" && echo "CHAOS_NETNS_PREFIX=$CHAOS_NETNS_PREFIX CHAOS_HOST_PREFIX=$CHAOS_HOST_PREFIX" ;;
    down) chaos_netns_down "$@" ;;
    isolate|heal|flap)
      netns_load "$1" || { echo "no namespaces in $1" >&2; exit 1; }
      shift; "chaos_netns_$cmd" "$@" ;;
    selftest) netns_selftest ;;
    *) sed -n '3,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
fi
