#!/usr/bin/env bash
# Follower-read figures (issue 17) on a local 3-broker cluster (deploy/cluster-local.sh: 1 shard
# per broker, the three sharing this host's cores and disk; fsync before every ack):
# a topic with 1 partition, RF 3, min_insync_replicas 2; one producer at READS_RATE records/s
# (1 KiB, acks=all) and 6 tailing consumers that each read the whole topic (wharf-loadgen
# --fan-out), run twice on fresh topics:
#   replica_selector = leader   every consumer reads from the leader
#   replica_selector = load     the leader sends tailing consumers to in-sync followers
# Per run, over the measured window: each broker's consumer egress (bytes/s, from its
# wharf_consumer_fetched_bytes_total counters) and CPU (its process's CPU time / wall time),
# where the consumers read at the end (`wharf topic describe --readers`), and the consumers'
# end-to-end latency p50/p99 (wharf-loadgen).
# The selector's egress threshold is READS_EGRESS_HIGH bytes/s (8 MiB/s) for this run, so the
# leader counts as loaded at a rate this 2-vCPU host sustains; the other thresholds are the
# defaults ([replica_selection] in docs/operations.md).
# Reports in target/follower-reads/ (loadgen JSON, readers, summary.txt, summary.json).
# Environment: READS_SECONDS (10), READS_WARMUP (4), READS_RATE (3000), READS_EGRESS_HIGH,
# BASE_PORT (35092; the cluster's ports, see deploy/cluster-local.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh curl python3
export PATH="$HOME/.cargo/bin:$PATH"
OUT=target/follower-reads
SECS=${READS_SECONDS:-10}
WARM=${READS_WARMUP:-4}
RATE=${READS_RATE:-3000}
EGRESS_HIGH=${READS_EGRESS_HIGH:-8388608}
export BASE_PORT=${BASE_PORT:-35092}
ADMIN_BASE=$((BASE_PORT + 552))
cargo build --release --locked -p wharf -p wharf-loadgen
rm -rf "$OUT" && mkdir -p "$OUT"
EXTRA_CONFIG=$(printf '[replica_selection]\negress_high_bytes_per_s = %s' "$EGRESS_HIGH")
export EXTRA_CONFIG
trap 'deploy/cluster-local.sh down "$OUT/cluster" >/dev/null 2>&1 || true' EXIT
deploy/cluster-local.sh up "$OUT/cluster"
C="127.0.0.1:$BASE_PORT,127.0.0.1:$((BASE_PORT + 1)),127.0.0.1:$((BASE_PORT + 2))"
W=./target/release/wharf
LG=./target/release/wharf-loadgen

# Per broker: id, consumer bytes served (both roles), process CPU ticks (utime + stime), time.
snapshot() {
  local id
  for id in 1 2 3; do
    local bytes pid ticks
    bytes=$(curl -sf "127.0.0.1:$((ADMIN_BASE + id - 1))/metrics" \
      | awk '/^wharf_consumer_fetched_bytes_total/ {s += $2} END {printf "%d", s}')
    pid=$(cat "$OUT/cluster/broker-$id.pid")
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    echo "$id $bytes $ticks $(date +%s.%N)"
  done
}

for selector in leader load; do
  topic="reads-$selector"
  echo "== replica_selector = $selector: 1 producer at $RATE records/s, 6 tailing consumers"
  $W topic create "$topic" --partitions 1 --replication-factor 3 \
    --config "replica_selector=$selector" --config min_insync_replicas=2 --bootstrap "$C" >/dev/null
  leader=
  for _ in $(seq 100); do  # Bounded: 10 s for the full ISR.
    leader=$($W topic describe "$topic" --bootstrap "$C" --format json | python3 -c '
import json, sys
p = json.load(sys.stdin)["partitions"][0]
print(p["leader"] if len(p["isr"]) == 3 else "")')
    [[ -n $leader ]] && break
    sleep 0.1
  done
  [[ -n $leader ]] || { echo "follower-reads: $topic never got a full ISR" >&2; exit 1; }
  echo "$leader" > "$OUT/$selector-leader"
  $LG --bootstrap "$C" --topic "$topic" --workload e2e --producers 1 --consumers 6 --fan-out \
    --rate "$RATE" --acks all --message-bytes 1024 --batch-bytes 65536 --linger-ms 1 \
    --duration "$SECS" --warmup "$WARM" --json "$OUT/$selector.json" > "$OUT/$selector.txt" &
  LOADGEN=$!
  sleep "$WARM"
  snapshot > "$OUT/$selector-before"
  sleep "$SECS"
  snapshot > "$OUT/$selector-after"
  $W topic describe "$topic" --readers --bootstrap "$C" > "$OUT/$selector-readers.txt" || true
  wait $LOADGEN
  tail -4 "$OUT/$selector.txt"
  $W topic delete "$topic" --bootstrap "$C" >/dev/null
done
deploy/cluster-local.sh down "$OUT/cluster"
trap - EXIT
rm -rf "$OUT/cluster"

python3 - "$OUT" "$RATE" "$EGRESS_HIGH" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out, rate, egress_high = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hz = os.sysconf("SC_CLK_TCK")

def window(selector):
    before = {l.split()[0]: l.split()[1:] for l in open(f"{out}/{selector}-before")}
    after = {l.split()[0]: l.split()[1:] for l in open(f"{out}/{selector}-after")}
    brokers = {}
    for b in before:
        bytes0, ticks0, t0 = int(before[b][0]), int(before[b][1]), float(before[b][2])
        bytes1, ticks1, t1 = int(after[b][0]), int(after[b][1]), float(after[b][2])
        seconds = t1 - t0
        brokers[int(b)] = {
            "egress_mb_per_s": (bytes1 - bytes0) / seconds / 1e6,
            "cpu_percent": 100.0 * (ticks1 - ticks0) / hz / seconds,
        }
    return brokers

summary = {"rate_records_per_s": rate, "egress_high_bytes_per_s": egress_high, "runs": {}}
print(f"3 brokers on 127.0.0.1 (1 shard each, sharing this host's cores and disk), RF 3, fsync always; "
      f"1 producer at {rate} records/s of 1 KiB (acks=all), 6 tailing consumers each reading the topic; "
      f"selector egress threshold {egress_high / 2**20:.0f} MiB/s")
for selector in ["leader", "load"]:
    report = json.load(open(f"{out}/{selector}.json"))
    leader = int(open(f"{out}/{selector}-leader").read())
    brokers = window(selector)
    e2e = report["e2e"]["latency_us"]
    lead = brokers[leader]
    followers = [b for b in brokers if b != leader]
    summary["runs"][selector] = {
        "leader": leader,
        "brokers": brokers,
        "e2e_p50_us": e2e["p50"],
        "e2e_p99_us": e2e["p99"],
        "consumed_msgs_per_s": report["consume"]["msgs_per_s"],
    }
    print(f"  replica_selector={selector:<6} leader {leader}: consumer egress {lead['egress_mb_per_s']:6.1f} MB/s, "
          f"CPU {lead['cpu_percent']:5.1f}%; followers "
          + ", ".join(f"{b}: {brokers[b]['egress_mb_per_s']:.1f} MB/s, CPU {brokers[b]['cpu_percent']:.1f}%" for b in followers)
          + f"; end-to-end p50 {e2e['p50'] / 1000:.2f} ms, p99 {e2e['p99'] / 1000:.2f} ms; "
          f"consumed {report['consume']['msgs_per_s']:.0f} records/s")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
PY
