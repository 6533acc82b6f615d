#!/usr/bin/env bash
# The single-broker figures (issue 3), each next to this machine's limits measured in the same
# run: starts `wharf serve` with 2 shards on a fresh data directory, then runs wharf-loadgen
# (acks=leader, fsync before every ack) for:
#   1. throughput: 2 producers, 1 KiB records in 1 MiB batches (closed loop)
#   2. records/s:  2 producers, 1 KiB records in 100 KiB batches (closed loop)
#   3. latency:    1 producer, one record per request, one request in flight
#   4. latency at 50% of scenario 1's throughput (open loop, coordinated-omission corrected)
# Throughput runs spread each producer's records round-robin (every partition busy); the
# open-loop run uses the default sticky partitioner (full batches at a partial rate).
# Scenario 4 runs bench/stall_probe.py alongside: the latency floor the disk set in that window.
# Reports go to target/figures/ (JSON and .hgrm per scenario, summary.txt).
# Environment: FIGURE_SECONDS (10), FIGURE_WARMUP (2), SKIP_LIMITS=1 to reuse target/figures/limits.json,
# BROKER_SPIN_US (100; 0 sleeps at once when idle).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh curl python3
export PATH="$HOME/.cargo/bin:$PATH"
OUT=target/figures
SECS=${FIGURE_SECONDS:-10}
WARM=${FIGURE_WARMUP:-2}
mkdir -p "$OUT"
cargo build --release --locked -p wharf -p wharf-loadgen
if [ "${SKIP_LIMITS:-0}" != 1 ] || [ ! -f "$OUT/limits.json" ]; then
  LIMITS_JSON=$OUT/limits.json bash bench/limits.sh
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); ADMIN=$(free_port)
rm -rf "$OUT/data"
# Each shard busy-polls 100 us before sleeping (BROKER_SPIN_US): a reply then goes out without
# a thread wake-up through the kernel. Measured 2026-12-02 against the same broker without it:
# one record per request p50 442 -> 304-322 us, p99 891 -> 644-658 us (docs/benchmarks.md).
SPIN_US=${BROKER_SPIN_US:-100}
printf 'spin_before_park_us = %s\n' "$SPIN_US" >"$OUT/broker.toml"
./target/release/wharf serve --config "$OUT/broker.toml" --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$ADMIN" --shards 2 >"$OUT/broker.log" 2>&1 &
BROKER=$!
trap 'kill -9 $BROKER 2>/dev/null || true' EXIT
for _ in $(seq 200); do
  curl -sf "127.0.0.1:$ADMIN/readyz" >/dev/null && break
  sleep 0.05
done
W=./target/release/wharf
L="./target/release/wharf-loadgen --bootstrap 127.0.0.1:$PORT --acks leader --duration $SECS --warmup $WARM"

echo "== 1. throughput: 2 producers, 1 KiB records, 1 MiB batches"
$L --topic f1 --partitions 4 --producers 2 --batch-bytes 1048576 --partitioner round-robin --json "$OUT/1-throughput.json" --hgrm "$OUT/1-throughput" | tail -5
# Each scenario writes ~1 GB/s: delete its topic before the next (the disk may be small).
$W topic delete f1 --bootstrap "127.0.0.1:$PORT" >/dev/null
echo "== 2. records/s: 2 producers, 1 KiB records, 100 KiB batches"
$L --topic f2 --partitions 4 --producers 2 --batch-bytes 102400 --partitioner round-robin --json "$OUT/2-records.json" --hgrm "$OUT/2-records" | tail -5
$W topic delete f2 --bootstrap "127.0.0.1:$PORT" >/dev/null
echo "== 3. latency: one record per request, one request in flight"
$L --topic f3 --partitions 1 --producers 1 --max-in-flight 1 --linger-ms 0 --json "$OUT/3-latency.json" --hgrm "$OUT/3-latency" | tail -5
HALF=$(python3 -c 'import json; print(int(json.load(open("'"$OUT"'/1-throughput.json"))["produce"]["msgs_per_s"] / 2))')
echo "== 4. open loop at 50% of scenario 1: $HALF msgs/s"
# The disk stall probe runs alongside (100 durable 4 KiB writes/s): the latency floor the disk
# itself set during this very window.
python3 bench/stall_probe.py --dir "$OUT/probe" --seconds "$((SECS + WARM))" --skip-seconds "$WARM" \
  --iops 100 --json "$OUT/4-disk-stalls.json" &
PROBE=$!
head -1 /proc/stat >"$OUT/4-cpu-before"  # The CPU time of every process on the host, in ticks.
$L --topic f4 --partitions 4 --producers 2 --batch-bytes 1048576 --rate "$HALF" --json "$OUT/4-half-rate.json" --hgrm "$OUT/4-half-rate" | tail -5
head -1 /proc/stat >"$OUT/4-cpu-after"
wait $PROBE

kill -TERM $BROKER; wait $BROKER || true; trap - EXIT
rm -rf "$OUT/data"

python3 - "$OUT" "$SPIN_US" <<'PY' | tee "$OUT/summary.txt"
import json, sys
sys.path.insert(0, "bench")
from cpu_busy import busy_between  # noqa: E402
out, spin_us = sys.argv[1], sys.argv[2]
limits = json.load(open(f"{out}/limits.json"))
tcp = limits["loopback_tcp_bits_per_s"] / 8
disk = limits["odirect_seq_write_1m_qd1_prealloc_bytes_per_s"]
sync = limits["fdatasync_p50_us"]
r = {n: json.load(open(f"{out}/{n}.json")) for n in ["1-throughput", "2-records", "3-latency", "4-half-rate"]}
t = r["1-throughput"]["produce"]
print(f"machine: loopback TCP {tcp*8/1e9:.1f} Gbit/s ({tcp/1e9:.2f} GB/s), O_DIRECT write {disk/1e9:.2f} GB/s, fdatasync p50 {sync:.0f} us")
print(f"single broker, 2 shards (spin_before_park_us = {spin_us}), acks=leader, fsync always (fdatasync before every ack)")
print(f"1. throughput, 1 MiB batches: {t['mb_per_s']:.0f} MB/s = {100*t['mb_per_s']*1e6/tcp:.0f}% of loopback TCP (target >= 40%), {100*t['mb_per_s']*1e6/disk:.0f}% of O_DIRECT write")
x = r["2-records"]["produce"]
print(f"2. records/s, 100 KiB batches: {x['msgs_per_s']/1e6:.2f} M records/s (target >= 2 M) = {x['mb_per_s']:.0f} MB/s")
l = r["3-latency"]["produce"]["latency_us"]
print(f"3. one record per request: p50 {l['p50']} us, p99 {l['p99']} us (target <= 100 us; fdatasync alone p50 {sync:.0f} us), p99.9 {l['p999']} us")
h = r["4-half-rate"]["produce"]
hl = h["latency_us"]
print(f"4. open loop at {h['msgs_per_s']:.0f} msgs/s (50% of 1.): p99 {hl['p99']/1000:.2f} ms (target <= 2), p99.9 {hl['p999']/1000:.2f} ms (target <= 5)")
d = json.load(open(f"{out}/4-disk-stalls.json"))
print(f"   disk in the same window (stall probe): {d['stalls_over_10ms']} stalls over 10 ms, longest {d['stall_max_ms']:.0f} ms; "
      f"durable-ack floor p99 {d['floor_p99_ms']:.1f} ms, p99.9 {d['floor_p999_ms']:.1f} ms")
print(f"   CPU busy in that window (all processes, both vCPUs): {busy_between(f'{out}/4-cpu-before', f'{out}/4-cpu-after'):.0f}%")
print(f"   one fdatasync of a lone 4 KiB write on that disk at that load: p50 {d['fdatasync_p50_ms']:.2f} ms, "
      f"p99 {d['fdatasync_p99_ms']:.2f} ms, p99.9 {d['fdatasync_p999_ms']:.2f} ms")
PY
