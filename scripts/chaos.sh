#!/usr/bin/env bash
# Chaos suite: real `wharf serve` processes (3 brokers, one loopback address each), a fault
# under load, then the audit. Each scenario runs wharf-loadgen --verify (acks=all, RF=3,
# min_insync=2, a tailing consumer, failed deliveries sent again) with flush=always, then with
# flush=interval, on a fresh cluster, and passes when: the audit passes (0 acknowledged records
# lost or moved, no offset seen holding two records, the log dense below the HW: see
# loadgen/src/audit.rs; the producer is idempotent, so no record twice unless the load
# generator itself sent it again after a failed delivery), the partitions the fault hit kept serving where the scenario demands
# it, and the ISR is full again after the fault healed (bounded wait).
#
#   scripts/chaos.sh [scenario...]        default: all; CHAOS_QUICK=1: the CI subset
#
# Scenarios: leader-kill (a), follower-kill (b), controller-kill (c), random-kills (d),
# leader-stop (e: SIGSTOP beyond the session timeout, then SIGCONT), netns-leader-isolated,
# netns-controller-isolated, netns-flap (f: network partitions in network namespaces, root only,
# else SKIPPED; see scripts/chaos/netns.sh), all-kill (g), rolling-restart (h).
# One line per scenario and flush mode: PASS|FAIL|SKIPPED, the reason, the duration; then a
# summary. Exit 0 all passed; 1 a scenario failed; 3 none failed but some did not run.
# Environment: CHAOS_QUICK (0), CHAOS_SECONDS (load per scenario: 40, quick 20), CHAOS_DOWN_S
# (how long a victim stays down: 10, quick 6), CHAOS_FAILOVER_WAIT_S (5: a new leader must
# appear by then), CHAOS_STOP_S (SIGSTOP length, beyond the session timeout: 12), CHAOS_RATE
# (records/s: 1000), CHAOS_FLUSH ("always interval"; quick: always), CHAOS_KEEP=1 keeps the
# data of passed scenarios, CHAOS_FLAP_S (netns-flap: how long the link flaps, 10),
# CHAOS_CONTROLLER_WAIT_S (a new controller leader by then: 10), CHAOS_ACKS (all; quorum for
# the single-fault scenarios), CHAOS_IN_FLIGHT (produce requests per partition: 1; up to 5
# keep order with the idempotent producer), CHAOS_CONTROLLER=0 (brokers
# without controller_voters, for a wharf without the controller). Reports and logs: target/chaos/run-PID/SCENARIO-FLUSH/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/chaos/lib.sh
source scripts/chaos/lib.sh

QUICK=${CHAOS_QUICK:-0}
if [[ $QUICK == 1 ]]; then
  SECONDS_LOAD=${CHAOS_SECONDS:-20}; DOWN_S=${CHAOS_DOWN_S:-6}; FLUSHES=${CHAOS_FLUSH:-always}
  DEFAULT_SCENARIOS=(follower-kill leader-kill leader-stop all-kill rolling-restart netns-leader-isolated)
else
  SECONDS_LOAD=${CHAOS_SECONDS:-40}; DOWN_S=${CHAOS_DOWN_S:-10}; FLUSHES=${CHAOS_FLUSH:-always interval}
  DEFAULT_SCENARIOS=(leader-kill follower-kill controller-kill random-kills leader-stop
    all-kill rolling-restart netns-leader-isolated netns-controller-isolated netns-flap)
fi
WAIT_S=${CHAOS_FAILOVER_WAIT_S:-5}
STOP_S=${CHAOS_STOP_S:-12}
FLAP_S=${CHAOS_FLAP_S:-10}
CONTROLLER_WAIT_S=${CHAOS_CONTROLLER_WAIT_S:-10}
RATE=${CHAOS_RATE:-1000}
# acks=quorum promises survival of one failure only: run it with the single-fault scenarios
# (leader-kill, follower-kill, controller-kill, random-kills, leader-stop, rolling-restart).
ACKS=${CHAOS_ACKS:-all}
IN_FLIGHT=${CHAOS_IN_FLIGHT:-1}
LEAD_S=5  # Load before the fault.
ROOT=$PWD/target/chaos/run-$$
mkdir -p "$ROOT"
chaos_bins
chaos_pick_port

RUNS=()
cleanup_all() {
  local run
  for run in "${RUNS[@]}"; do
    CHAOS_RUN=$run chaos_cleanup
    [[ -f $run/netns ]] && { chaos_netns_down "$run" || true; }
  done
  return 0
}
exec 9>&2  # The terminal's stderr: a signal may arrive while a fault's goes to harness.log.
trap 'cleanup_all 2>&9' EXIT
trap 'echo "chaos: interrupted; stopping brokers, removing namespaces" >&9; exit 130' INT TERM

# --- faults: each may set FAULT_FAIL (why the scenario cannot pass) and MUST_SERVE (partitions
# that must have been acknowledged while the victim was down).

fault_leader-kill() {
  local victim; victim=$(chaos_leader "$TOPIC" 0)
  chaos_log "kill -9 broker $victim (leader of partition 0)"
  chaos_kill "$victim" KILL
  MUST_SERVE=0
  chaos_wait_new_leader "$TOPIC" 0 "$victim" "$WAIT_S" ||
    FAULT_FAIL="no failover: partition 0 still led by dead broker $victim after $WAIT_S s"
  sleep "$DOWN_S"
  chaos_restart "$victim"
}

fault_follower-kill() {
  local leader victim
  leader=$(chaos_leader "$TOPIC" 0)
  victim=$(( leader % 3 + 1 ))
  chaos_log "kill -9 broker $victim (follower of partition 0, led by $leader)"
  chaos_kill "$victim" KILL
  MUST_SERVE=0
  sleep "$DOWN_S"
  chaos_restart "$victim"
}

fault_controller-kill() {
  local victim
  if ! victim=$(chaos_controller_leader); then FAULT_FAIL=$victim; return; fi
  chaos_log "kill -9 broker $victim (controller leader)"
  chaos_kill "$victim" KILL
  sleep "$DOWN_S"
  chaos_restart "$victim"
}

fault_random-kills() {
  local end=$(( $(date +%s) + SECONDS_LOAD - LEAD_S - 8 )) victim
  while (( $(date +%s) < end )); do
    victim=$(( RANDOM % 3 + 1 ))
    chaos_log "kill -9 broker $victim (random)"
    chaos_kill "$victim" KILL
    sleep $(( 2 + RANDOM % 3 ))
    chaos_restart "$victim" || { FAULT_FAIL="broker $victim did not restart"; return; }
    sleep 1
  done
}

fault_leader-stop() {
  local victim; victim=$(chaos_leader "$TOPIC" 0)
  chaos_log "SIGSTOP broker $victim (leader of partition 0) for $STOP_S s"
  chaos_kill "$victim" STOP
  MUST_SERVE=0
  sleep "$STOP_S"
  chaos_kill "$victim" CONT
}

fault_all-kill() {
  local id
  chaos_log "kill -9 of every broker"
  for id in "${CHAOS_BROKERS[@]}"; do kill -KILL "$(chaos_pid "$id")" 2>/dev/null || true; done
  for id in "${CHAOS_BROKERS[@]}"; do chaos_kill "$id" KILL; done
  sleep 2
  for id in "${CHAOS_BROKERS[@]}"; do chaos_start "$id"; echo "START $id $(chaos_now_ms)" >> "$CHAOS_RUN/events"; done
  for id in "${CHAOS_BROKERS[@]}"; do chaos_wait_ready "$id" 60 || FAULT_FAIL="broker $id did not restart"; done
}

fault_rolling-restart() {
  local id
  for id in "${CHAOS_BROKERS[@]}"; do
    chaos_log "rolling restart: broker $id"
    chaos_kill "$id" TERM
    chaos_restart "$id" || { FAULT_FAIL="broker $id did not restart"; return; }
    chaos_wait_full_isr "$TOPIC" || { FAULT_FAIL="no full ISR after restarting broker $id"; return; }
  done
}

# (f) Network partitions: each broker in its own namespace (scenario() sets them up).

# A partition heals: rules removed, describe asks every broker again.
netns_heal() {
  chaos_log "heal broker $1"
  chaos_netns_heal "$1" || FAULT_FAIL="iptables: cannot heal broker $1"
  CHAOS_ISOLATED=''
}

# After healing, VICTIM must agree with the others on partition 0's leader (it rejoined as a
# follower, or leads again after a legitimate election: no second leader), bounded.
netns_agree() {
  local victim=$1 other=$2 deadline=$(( $(date +%s) + CHAOS_ISR_WAIT_S )) mine theirs
  while (( $(date +%s) < deadline )); do
    mine=$(chaos_describe_from "$victim" "$TOPIC" | python3 -c 'import json,sys; print([p["leader"] for p in json.load(sys.stdin)["partitions"]])' 2>/dev/null) || mine=unknown
    theirs=$(chaos_describe_from "$other" "$TOPIC" | python3 -c 'import json,sys; print([p["leader"] for p in json.load(sys.stdin)["partitions"]])' 2>/dev/null) || theirs=unknown
    [[ $mine != unknown && $mine == "$theirs" ]] && return 0
    sleep 0.5
  done
  FAULT_FAIL+="${FAULT_FAIL:+; }after healing broker $victim reports leaders $mine, broker $other $theirs (${CHAOS_ISR_WAIT_S} s)"
}

fault_netns-leader-isolated() {
  local victim other; victim=$(chaos_leader "$TOPIC" 0)
  other=$(( victim % 3 + 1 ))
  chaos_log "isolate broker $victim (leader of partition 0) from the other brokers, not from clients, for $DOWN_S s"
  chaos_netns_isolate "$victim" peers || { FAULT_FAIL="iptables: cannot isolate broker $victim"; return; }
  chaos_netns_rules "$victim" >&2 || true
  CHAOS_ISOLATED=$victim
  MUST_SERVE=0
  chaos_wait_new_leader "$TOPIC" 0 "$victim" "$WAIT_S" ||
    FAULT_FAIL="no failover: brokers $(chaos_not_isolated | tr '\n' ' ')still name isolated broker $victim leader of partition 0 after $WAIT_S s"
  sleep "$DOWN_S"
  netns_heal "$victim"
  chaos_wait_full_isr "$TOPIC" || FAULT_FAIL+="${FAULT_FAIL:+; }broker $victim did not rejoin the ISR"
  netns_agree "$victim" "$other"
}

fault_netns-controller-isolated() {
  local victim new='' deadline
  if ! victim=$(chaos_controller_leader); then FAULT_FAIL=$victim; return; fi
  chaos_log "isolate broker $victim (controller leader) from the other brokers, not from clients, for $DOWN_S s"
  chaos_netns_isolate "$victim" peers || { FAULT_FAIL="iptables: cannot isolate broker $victim"; return; }
  CHAOS_ISOLATED=$victim
  MUST_SERVE="0 1 2"
  deadline=$(( $(date +%s) + CONTROLLER_WAIT_S ))
  while (( $(date +%s) < deadline )); do
    new=$(chaos_controller_leader 2>/dev/null) && [[ $new != "$victim" ]] && break
    new=''; sleep 0.2
  done
  if [[ -n $new ]]; then chaos_log "controller leader now broker $new"
  else FAULT_FAIL="no new controller leader among brokers $(chaos_not_isolated | tr '\n' ' ')within $CONTROLLER_WAIT_S s of isolating broker $victim"
  fi
  sleep "$DOWN_S"
  netns_heal "$victim"
  chaos_wait_full_isr "$TOPIC" || FAULT_FAIL+="${FAULT_FAIL:+; }broker $victim did not rejoin the ISR"
  # The old controller leader follows the new one once healed (bounded).
  deadline=$(( $(date +%s) + CHAOS_ISR_WAIT_S ))
  local theirs mine
  while (( $(date +%s) < deadline )); do
    theirs=$(chaos_controller_leader 2>/dev/null) || theirs=unknown
    mine=$(chaos_controller_leader_from "$victim" 2>/dev/null) || mine=unknown
    [[ $mine != unknown && $mine == "$theirs" ]] && return
    sleep 0.5
  done
  FAULT_FAIL+="${FAULT_FAIL:+; }after healing broker $victim names controller leader $mine, the others $theirs"
}

fault_netns-flap() {
  local victim other; victim=$(chaos_leader "$TOPIC" 0)
  other=$(( victim % 3 + 1 ))
  chaos_log "flap broker $victim's link to the other brokers (leader of partition 0) for $FLAP_S s"
  chaos_netns_flap "$victim" "$FLAP_S" peers || FAULT_FAIL="iptables: flapping broker $victim failed"
  chaos_netns_heal "$victim" || true
  chaos_wait_full_isr "$TOPIC" || FAULT_FAIL+="${FAULT_FAIL:+; }no full ISR after the link settled"
  netns_agree "$victim" "$other"
}

# --- one scenario in one flush mode

# result STATUS NAME FLUSH START REASON
result() {
  local line
  line=$(printf '%-8s %-25s flush=%-8s %4ss  %s' "$1" "$2" "$3" "$(( $(date +%s) - $4 ))" "$5")
  echo "$line" | tee -a "$ROOT/results.txt"
}

scenario() {
  local name=$1 flush=$2 started; started=$(date +%s)
  case $name in
    netns-leader-isolated|netns-controller-isolated|netns-flap)
      local why
      if ! why=$(chaos_netns_check); then result SKIPPED "$name" "$flush" "$started" "$why"; return; fi
      if [[ $name == netns-controller-isolated ]] && ! why=$(chaos_has_cluster_status); then
        result FAIL "$name" "$flush" "$started" "$why"; return
      fi ;;
    controller-kill)
      local why
      if ! why=$(chaos_has_cluster_status); then result FAIL "$name" "$flush" "$started" "$why"; return; fi ;;
    leader-kill|follower-kill|random-kills|leader-stop|all-kill|rolling-restart) ;;
    *) result FAIL "$name" "$flush" "$started" "unknown scenario"; return ;;
  esac
  CHAOS_RUN=$ROOT/$name-$flush
  RUNS+=("$CHAOS_RUN")
  mkdir -p "$CHAOS_RUN"; : > "$CHAOS_RUN/pids"; : > "$CHAOS_RUN/events"
  CHAOS_ISOLATED=''
  if [[ $name == netns-* ]] && ! chaos_netns_up "$CHAOS_RUN" 2>> "$CHAOS_RUN/harness.log"; then
    result FAIL "$name" "$flush" "$started" "network namespaces did not come up (see $CHAOS_RUN/harness.log)"; return
  fi
  chaos_cluster_init "$CHAOS_RUN/cluster"
  if ! chaos_up 2>> "$CHAOS_RUN/harness.log"; then
    result FAIL "$name" "$flush" "$started" "cluster did not start (see $CHAOS_RUN)"; chaos_cleanup
    chaos_netns_down "$CHAOS_RUN" 2>> "$CHAOS_RUN/harness.log" || true; return
  fi
  TOPIC=chaos-$name-$$
  local partitions=3
  [[ $name == leader-* || $name == follower-* || $name == netns-leader-* || $name == netns-flap ]] && partitions=1
  if ! "$WHARF_BIN" topic create "$TOPIC" --partitions "$partitions" --replication-factor 3 \
      --config min_insync_replicas=2 --config "flush=$flush" --bootstrap "$(chaos_addr 1)" >/dev/null 2>> "$CHAOS_RUN/harness.log"; then
    result FAIL "$name" "$flush" "$started" "topic creation failed"; chaos_cleanup
    chaos_netns_down "$CHAOS_RUN" 2>> "$CHAOS_RUN/harness.log" || true; return
  fi
  local bounded=$(( SECONDS_LOAD + 120 ))  # Load, drains and the read-back, at most.
  timeout -s KILL "$bounded" "$LOADGEN_BIN" --bootstrap "$(chaos_bootstrap)" --topic "$TOPIC" \
    --acks "$ACKS" --rate "$RATE" --producers 1 --threads 1 --message-bytes 256 --batch-bytes 65536 \
    --requests-in-flight "$IN_FLIGHT" --warmup 0 --duration "$SECONDS_LOAD" --verify --tail-consumers 1 \
    --request-timeout-ms 5000 --delivery-timeout-ms 10000 --verify-timeout 60 \
    --gap-report "$CHAOS_RUN/gaps.json" --json "$CHAOS_RUN/loadgen.json" \
    > "$CHAOS_RUN/loadgen.txt" 2> "$CHAOS_RUN/loadgen.log" &
  local loadgen=$!
  echo "$loadgen" >> "$CHAOS_RUN/pids"
  sleep "$LEAD_S"
  FAULT_FAIL='' MUST_SERVE=''
  "fault_$name" 2>> "$CHAOS_RUN/harness.log"
  local code=0
  wait "$loadgen" || code=$?
  cp "$CHAOS_RUN/events" "$CHAOS_RUN/fault-events"  # Not the shutdown's SIGTERMs below.
  local isr=ok
  chaos_wait_full_isr "$TOPIC" 2>> "$CHAOS_RUN/harness.log" || isr="ISR not full ${CHAOS_ISR_WAIT_S} s after the fault healed"
  chaos_down 2>> "$CHAOS_RUN/harness.log"
  chaos_cleanup
  if [[ -f $CHAOS_RUN/netns ]] && ! chaos_netns_down "$CHAOS_RUN" 2>> "$CHAOS_RUN/harness.log"; then
    FAULT_FAIL+="${FAULT_FAIL:+; }teardown of the namespaces left something (see harness.log)"
  fi

  local verdict reasons=()
  verdict=$(python3 - "$CHAOS_RUN" "$code" "$flush" "$name" "${MUST_SERVE:-}" "$WAIT_S" <<'PY'
import json, os, sys
run, code, flush, name, must = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
settle_ms = int(sys.argv[6]) * 1000  # A new leader within CHAOS_FAILOVER_WAIT_S.
out = []
try:
    report = json.load(open(f"{run}/loadgen.json"))
    v = report["verify"]
    resent = report["produce"]["resent"]
except Exception:
    print(f"FAIL|no loadgen report (exit {code}; see {run}/loadgen.log)"); sys.exit()
bad = {k: v[k] for k in ("lost", "moved", "conflicts", "holes", "vanished", "corrupt", "unreadable_partitions") if v[k]}
# The producer is idempotent: its own retries are written once. A record the load generator
# sent again after a failed delivery is a new batch to the broker (a resend under a new
# sequence), so a duplicate fails the scenario only when nothing was resent.
if v["duplicated"] and not resent:
    bad["duplicated"] = v["duplicated"]
info = f"acked {v['acked']} lost {v['lost']} moved {v['moved']} dup {v['duplicated']} resent {resent} conflicts {v['conflicts']} holes {v['holes']}"
expected_loss = name == "all-kill" and flush == "interval"
if bad and expected_loss:
    info += " (loss allowed: flush=interval and every replica died)"
elif bad or code not in (0,):
    out.append("audit: " + ", ".join(f"{k} {n}" for k, n in bad.items()) if bad else f"loadgen exit {code}")
    out.extend(v.get("examples", [])[:3])
for part in must.split() if os.path.exists(f"{run}/gaps.json") else []:
    import subprocess
    rows = subprocess.run(["bash", "-c", f'source scripts/chaos/lib.sh; chaos_gaps "{run}/gaps.json" "{run}/fault-events" {part} {settle_ms}'],
                          capture_output=True, text=True).stdout.split("\n")
    for r in (json.loads(l) for l in rows if l.strip()):
        gap = r["gap_ms"]
        cut = r["signal"] == "ISOLATE"
        info += f"; partition {part} gap {gap} ms after " + (f"isolating broker {r['broker']} (largest while isolated {r['window_max_gap_ms']} ms)" if cut else f"SIG{r['signal']} of broker {r['broker']}")
        if cut and not r["served_after_settle"]:
            out.append(f"partition {part}: no ack from {settle_ms} ms after isolating broker {r['broker']} until it was healed (acks stopped, nobody took over)")
        elif not cut and not r["served_while_down"]:
            out.append(f"partition {part} unavailable while broker {r['broker']} was " + ("isolated (no ack until it was healed)" if cut else "down (no ack until it returned)"))
if name == "netns-flap" and os.path.exists(f"{run}/gaps.json"):
    p0 = json.load(open(f"{run}/gaps.json"))["partitions"][0]
    flaps = sum(1 for l in open(f"{run}/fault-events") if l.startswith("ISOLATE"))
    info += f"; {flaps} flaps, partition 0 largest ack gap {p0.get('max_gap_ms')} ms"
print(("FAIL|" if out else "PASS|") + "; ".join(out + [info]))
PY
)
  [[ -n $FAULT_FAIL ]] && reasons+=("$FAULT_FAIL")
  [[ $isr != ok ]] && reasons+=("$isr")
  if [[ ${verdict%%|*} == PASS && ${#reasons[@]} -eq 0 ]]; then
    result PASS "$name" "$flush" "$started" "${verdict#*|}"
    [[ ${CHAOS_KEEP:-0} == 1 ]] || rm -rf "$CHAOS_RUN/cluster"
  else
    reasons+=("${verdict#*|}")
    local IFS=';'
    result FAIL "$name" "$flush" "$started" "${reasons[*]} (logs: $CHAOS_RUN)"
  fi
}

scenarios=("$@")
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=("${DEFAULT_SCENARIOS[@]}")
: > "$ROOT/results.txt"
suite_started=$(date +%s)
for name in "${scenarios[@]}"; do
  for flush in $FLUSHES; do scenario "$name" "$flush"; done
done
pass=$(grep -c '^PASS' "$ROOT/results.txt" || true)
fail=$(grep -c '^FAIL' "$ROOT/results.txt" || true)
skip=$(grep -c '^SKIPPED' "$ROOT/results.txt" || true)
echo "chaos: $pass passed, $fail failed, $skip not run, in $(( $(date +%s) - suite_started )) s; details in $ROOT"
(( fail == 0 )) || exit 1
(( skip == 0 )) || exit 3
