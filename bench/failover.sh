#!/usr/bin/env bash
# Failover time on a local 3-broker cluster (deploy/cluster-local.sh), RF=3, min_insync=2,
# fsync before every ack, one partition, wharf-loadgen acks=all with --verify and --gap-report:
#   1. FAILOVER_KILLS times (20): find partition 0's leader (`wharf topic describe`), kill -9
#      it, wait up to FAILOVER_WAIT_S (5) for another broker to lead it, restart the victim,
#      wait for the full ISR (bounded), then the next cycle (each cycle FAILOVER_CYCLE_S, 12).
#   2. The controlled-shutdown variant: FAILOVER_TERMS times (5), SIGTERM instead of kill -9.
# Prints the failover gaps (last ack before the fault to the first after it, on partition 0):
# median, p90, max per variant; for SIGTERM also the failed requests. Without failover (a
# dead leader's partition stays unavailable) it says so after the first kill and exits 1.
# Exit: 0 all went through and the audit passed; 1 no failover, an audit failure or no full
# ISR. Output in target/failover/run-PID/ (loadgen reports, gap JSON, events, broker logs).
# Environment: also FAILOVER_RATE (records/s, 2000), BASE_PORT (default: a free one).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/chaos/lib.sh
source scripts/chaos/lib.sh
KILLS=${FAILOVER_KILLS:-20}
TERMS=${FAILOVER_TERMS:-5}
WAIT_S=${FAILOVER_WAIT_S:-5}
CYCLE_S=${FAILOVER_CYCLE_S:-12}
RATE=${FAILOVER_RATE:-2000}
chaos_bins
export WHARF_BIN REPLICA_LAG_MAX_MS
CHAOS_LAYOUT=cluster-local
CHAOS_RUN=$PWD/target/failover/run-$$
mkdir -p "$CHAOS_RUN"
: > "$CHAOS_RUN/pids"
: > "$CHAOS_RUN/events"
CHAOS_DIR=$CHAOS_RUN/cluster
if [[ -z ${BASE_PORT:-} ]]; then
  BASE_PORT=$(python3 - <<'PY'
import socket
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); return True
        except OSError:
            return False
for base in range(33092, 33092 + 10 * 200, 10):
    if all(free(base + d) for d in (0, 1, 2, 100, 101, 102, 552, 553, 554)):
        print(base); break
else:
    raise SystemExit("failover: no free ports")
PY
)
fi
export BASE_PORT
LOADGEN_PID=
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  [[ -n $LOADGEN_PID ]] && kill -KILL "$LOADGEN_PID" 2>/dev/null
  deploy/cluster-local.sh down "$CHAOS_DIR" >/dev/null 2>&1 || true
  chaos_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM

deploy/cluster-local.sh up "$CHAOS_DIR" >&2
for id in "${CHAOS_BROKERS[@]}"; do chaos_pid "$id" >> "$CHAOS_RUN/pids"; done
TOPIC=failover-$$
"$WHARF_BIN" topic create "$TOPIC" --partitions 1 --replication-factor 3 \
  --config min_insync_replicas=2 --config flush=always --bootstrap "$(chaos_addr 1)" >&2

# phase NAME SIGNAL COUNT: one loadgen run with COUNT fault cycles; returns 2 when the first
# fault shows no failover.
phase() {
  local name=$1 signal=$2 count=$3 i victim start cycle_end
  local out=$CHAOS_RUN/$name
  : > "$CHAOS_RUN/events"
  "$LOADGEN_BIN" --bootstrap "$(chaos_bootstrap)" --topic "$TOPIC" --acks all --rate "$RATE" \
    --producers 1 --threads 1 --message-bytes 256 --batch-bytes 65536 --requests-in-flight 1 \
    --warmup 0 --duration $((count * CYCLE_S + 8)) --verify --tail-consumers 1 \
    --request-timeout-ms 5000 --delivery-timeout-ms 10000 \
    --gap-report "$out-gaps.json" --json "$out.json" > "$out.txt" 2> "$out.log" &
  LOADGEN_PID=$!
  echo $LOADGEN_PID >> "$CHAOS_RUN/pids"
  sleep 4
  for i in $(seq 1 "$count"); do
    start=$(date +%s)
    victim=$(chaos_leader "$TOPIC" 0)
    chaos_log "$name $i/$count: SIG$signal to broker $victim (leader of partition 0)"
    chaos_kill "$victim" "$signal"
    if ! chaos_wait_new_leader "$TOPIC" 0 "$victim" "$WAIT_S"; then
      echo "NO FAILOVER: partition 0 was still led by broker $victim (down after SIG$signal) $WAIT_S s later; it is unavailable until that broker returns"
      chaos_restart "$victim" >&2 || true
      chaos_wait_full_isr "$TOPIC" || true
      kill -KILL "$LOADGEN_PID" 2>/dev/null || true
      LOADGEN_PID=
      return 2
    fi
    chaos_restart "$victim" >&2
    if ! chaos_wait_full_isr "$TOPIC"; then echo "FAIL: no full ISR after restarting broker $victim"; return 1; fi
    cycle_end=$((start + CYCLE_S))
    while (( $(date +%s) < cycle_end )); do sleep 0.2; done
  done
  local code=0
  wait "$LOADGEN_PID" || code=$?
  LOADGEN_PID=
  tail -n 12 "$out.txt"
  chaos_gaps "$out-gaps.json" "$CHAOS_RUN/events" 0 > "$out-faults.jsonl"
  python3 - "$name" "$out-faults.jsonl" "$out.json" <<'PY'
import json, statistics, sys
name, faults, run = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
rows = [json.loads(l) for l in open(faults) if l.strip()]
gaps = sorted(r["gap_ms"] for r in rows if r["gap_ms"] is not None)
def pct(q):
    return gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else None
summary = {"variant": name, "faults": len(rows), "gaps_ms": gaps,
           "median_ms": statistics.median(gaps) if gaps else None, "p90_ms": pct(0.9),
           "max_ms": gaps[-1] if gaps else None,
           "failed_requests": run["produce"]["errors"], "errors_by_kind": run["produce"]["errors_by_kind"],
           "served_while_down": sum(r["served_while_down"] for r in rows)}
print(json.dumps(summary))
print(f"{name}: {len(rows)} faults, failover gap median {summary['median_ms']} ms, p90 {summary['p90_ms']} ms, "
      f"max {summary['max_ms']} ms; failed requests {summary['failed_requests']} {summary['errors_by_kind']}", file=sys.stderr)
PY
  return "$code"
}

status=0
phase kill-9 KILL "$KILLS" | tee "$CHAOS_RUN/summary-kill.txt" || status=$?
if (( status == 2 )); then
  echo "failover: FAILED (no automatic failover); details in $CHAOS_RUN" >&2
  exit 1
fi
phase sigterm TERM "$TERMS" | tee "$CHAOS_RUN/summary-term.txt" || status=$?
echo "failover: reports in $CHAOS_RUN" >&2
exit $(( status != 0 ))
