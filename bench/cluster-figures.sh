#!/usr/bin/env bash
# The replication figures (issue 5), next to this machine's limits and the single-broker
# acks=leader throughput measured in the same run:
#   0. single broker, 2 shards, acks=leader: 2 producers, 1 KiB records, 1 MiB batches
#   then a local 3-broker cluster (deploy/cluster-local.sh, 1 shard per broker: three brokers
#   share the 2 cores and the disk), RF=3, min_insync_replicas=2, fsync before every ack:
#   for acks = all, quorum, leader:
#     a. throughput: 2 producers, 1 KiB records, 1 MiB batches, 3 partitions (one led by each
#        broker), closed loop
#     b. open loop at 50% of (a): produce p50/p99/p99.9 (coordinated-omission corrected), with
#        bench/stall_probe.py alongside (the latency floor the disk set in that window)
# Reports go to target/cluster-figures/ (JSON per run, summary.txt).
# Environment: FIGURE_SECONDS (10), FIGURE_WARMUP (2), SKIP_LIMITS=1 to reuse
# target/cluster-figures/limits.json, BASE_PORT for the cluster (default: the first base from
# 29092 up, in steps of 10, whose three client and three admin ports are all free).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh curl python3
export PATH="$HOME/.cargo/bin:$PATH"
OUT=target/cluster-figures
SECS=${FIGURE_SECONDS:-10}
WARM=${FIGURE_WARMUP:-2}
# A fixed base collided with a broker left running on this host (cluster-local.sh refuses a
# port in use, so the run failed): look for a free one unless told.
if [ -z "${BASE_PORT:-}" ]; then
  BASE_PORT=$(python3 - <<'PY'
import socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
for base in range(29092, 29092 + 10 * 200, 10):  # At most 200 candidates.
    if all(free(p) for p in (base, base + 1, base + 2, base + 100, base + 101, base + 102, base + 552, base + 553, base + 554)):
        print(base)
        break
else:
    raise SystemExit("cluster-figures: no free range of ports from 29092 up")
PY
)
fi
export BASE_PORT
mkdir -p "$OUT"
cargo build --release --locked -p wharf -p wharf-loadgen
if [ "${SKIP_LIMITS:-0}" != 1 ] || [ ! -f "$OUT/limits.json" ]; then
  LIMITS_JSON=$OUT/limits.json bash bench/limits.sh
fi
W=./target/release/wharf
LG=./target/release/wharf-loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); ADMIN=$(free_port)
rm -rf "$OUT/single" "$OUT/cluster"
$W serve --data-dir "$OUT/single" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" \
  --shards 2 >"$OUT/single.log" 2>&1 &
BROKER=$!
trap 'kill -9 $BROKER 2>/dev/null || true; deploy/cluster-local.sh down "$OUT/cluster" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 200); do curl -sf "127.0.0.1:$ADMIN/readyz" >/dev/null && break; sleep 0.05; done
echo "== 0. single broker, acks=leader throughput"
$LG --bootstrap "127.0.0.1:$PORT" --acks leader --duration "$SECS" --warmup "$WARM" --topic s0 --partitions 4 \
  --producers 2 --batch-bytes 1048576 --partitioner round-robin --json "$OUT/0-single-leader.json" | tail -4
kill -TERM $BROKER; wait $BROKER || true
rm -rf "$OUT/single"

deploy/cluster-local.sh up "$OUT/cluster"
C="127.0.0.1:$BASE_PORT"
for acks in all quorum leader; do
  echo "== acks=$acks: throughput"
  $LG --bootstrap "$C" --acks "$acks" --duration "$SECS" --warmup "$WARM" --topic "t-$acks" --partitions 3 \
    --replication-factor 3 --producers 2 --batch-bytes 1048576 --partitioner round-robin \
    --json "$OUT/$acks-throughput.json" | tail -4
  $W topic delete "t-$acks" --bootstrap "$C" >/dev/null
  HALF=$(python3 -c 'import json; print(int(json.load(open("'"$OUT/$acks"'-throughput.json"))["produce"]["msgs_per_s"] / 2))')
  echo "== acks=$acks: open loop at 50%: $HALF msgs/s"
  python3 bench/stall_probe.py --dir "$OUT/probe" --seconds "$((SECS + WARM))" --skip-seconds "$WARM" \
    --iops 100 --json "$OUT/$acks-disk-stalls.json" &
  PROBE=$!
  head -1 /proc/stat >"$OUT/$acks-cpu-before"  # The CPU time of every process on the host, in ticks.
  $LG --bootstrap "$C" --acks "$acks" --duration "$SECS" --warmup "$WARM" --topic "h-$acks" --partitions 3 \
    --replication-factor 3 --producers 2 --batch-bytes 1048576 --rate "$HALF" \
    --json "$OUT/$acks-half-rate.json" --hgrm "$OUT/$acks-half-rate" | tail -4
  head -1 /proc/stat >"$OUT/$acks-cpu-after"
  wait $PROBE
  $W topic delete "h-$acks" --bootstrap "$C" >/dev/null
done
deploy/cluster-local.sh down "$OUT/cluster"
trap - EXIT
rm -rf "$OUT/cluster"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
sys.path.insert(0, "bench")
from cpu_busy import busy_between  # noqa: E402
out = sys.argv[1]

limits = json.load(open(f"{out}/limits.json"))
tcp = limits["loopback_tcp_bits_per_s"] / 8
disk = limits["odirect_seq_write_1m_qd1_prealloc_bytes_per_s"]
sync = limits["fdatasync_p50_us"]
single = json.load(open(f"{out}/0-single-leader.json"))["produce"]["mb_per_s"]
print(f"machine: loopback TCP {tcp*8/1e9:.1f} Gbit/s, O_DIRECT write {disk/1e9:.2f} GB/s, fdatasync p50 {sync:.0f} us")
print(f"single broker (2 shards), acks=leader, fsync always: {single:.0f} MB/s = {100*single*1e6/tcp:.0f}% of loopback TCP")
print("3 brokers on 127.0.0.1 (1 shard each, sharing 2 cores and 1 disk), RF=3, min_insync=2, fsync always, 1 KiB records:")
for acks in ["all", "quorum", "leader"]:
    t = json.load(open(f"{out}/{acks}-throughput.json"))["produce"]
    h = json.load(open(f"{out}/{acks}-half-rate.json"))["produce"]
    l = h["latency_us"]
    target = "  (targets: >= 35%, p99 <= 5 ms)" if acks == "all" else ""
    print(f"  acks={acks:<6} {t['mb_per_s']:6.0f} MB/s = {100*t['mb_per_s']/single:3.0f}% of single-broker acks=leader; "
          f"at 50% ({h['msgs_per_s']:.0f} msgs/s): p50 {l['p50']/1000:.2f} ms, p99 {l['p99']/1000:.2f} ms, p99.9 {l['p999']/1000:.2f} ms{target}")
    d = json.load(open(f"{out}/{acks}-disk-stalls.json"))
    print(f"             disk in that window (stall probe): {d['stalls_over_10ms']} stalls over 10 ms, longest {d['stall_max_ms']:.0f} ms; "
          f"durable-ack floor p99 {d['floor_p99_ms']:.1f} ms, p99.9 {d['floor_p999_ms']:.1f} ms")
    print(f"             CPU busy in that window (brokers, load generator, kernel; both vCPUs): {busy_between(f'{out}/{acks}-cpu-before', f'{out}/{acks}-cpu-after'):.0f}%")
    print(f"             one fdatasync of a lone 4 KiB write on that disk at that load: p50 {d['fdatasync_p50_ms']:.2f} ms, "
          f"p99 {d['fdatasync_p99_ms']:.2f} ms, p99.9 {d['fdatasync_p999_ms']:.2f} ms")
PY
