#!/usr/bin/env bash
# Shows Wharf doing its job: builds it, measures this machine's limits (fio, iperf3), starts a
# broker on the default data directory (./wharf-data), uses the CLI (create a topic, produce
# lines, consume them), then drives the broker with wharf-loadgen (acks=leader, fsync before
# every ack, durability audit on) and prints the report next to the machine's limits. Stops the
# broker with SIGTERM at the end. Installs what it needs first.
#
# Environment: WHARF_DATA_DIR (./wharf-data), WHARF_PORT (9092), WHARF_ADMIN_PORT (9644),
# DEMO_SECONDS (10), FIO_SIZE (see bench/limits.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh fio iperf3 iproute2 curl
export PATH="$HOME/.cargo/bin:$PATH"

DATA_DIR=${WHARF_DATA_DIR:-./wharf-data}
PORT=${WHARF_PORT:-9092}
ADMIN_PORT=${WHARF_ADMIN_PORT:-9644}
SECONDS_RUN=${DEMO_SECONDS:-10}
OUT=target/demo
mkdir -p "$OUT"

echo "== build (release)"
cargo build --release --locked -p wharf -p wharf-loadgen
echo "== machine limits"
LIMITS_JSON=$OUT/limits.json bash bench/limits.sh

echo "== start wharf serve on $DATA_DIR (client port $PORT, admin port $ADMIN_PORT)"
./target/release/wharf serve --data-dir "$DATA_DIR" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" >"$OUT/broker.log" 2>&1 &
BROKER=$!
trap 'kill -9 $BROKER 2>/dev/null || true' EXIT
for _ in $(seq 200); do
  curl -sf "127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break
  kill -0 $BROKER 2>/dev/null || { cat "$OUT/broker.log"; echo "demo: the broker exited"; exit 1; }
  sleep 0.05
done
curl -sf "127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || { cat "$OUT/broker.log"; echo "demo: broker not ready"; exit 1; }

W="./target/release/wharf"
B="--bootstrap 127.0.0.1:$PORT"
echo "== CLI: create, produce, consume"
$W topic delete demo $B >/dev/null 2>&1 || true
$W topic create demo --partitions 4 $B
seq 1 1000 | sed 's/^/line /' | $W produce demo --acks all $B
echo "consumed $($W consume demo $B | wc -l) lines; first three of partition order:"
$W consume demo --count 3 $B
$W topic describe demo $B

echo "== wharf-loadgen: 2 producers, 1 KiB records in 1 MiB batches, acks=leader, fsync always, ${SECONDS_RUN} s, audit on"
$W topic delete loadgen $B >/dev/null 2>&1 || true
./target/release/wharf-loadgen $B --topic loadgen --partitions 4 --producers 2 --partitioner round-robin \
  --message-bytes 1024 --batch-bytes 1048576 --acks leader --duration "$SECONDS_RUN" --warmup 2 \
  --verify --json "$OUT/loadgen.json" --hgrm "$OUT/loadgen" | tee "$OUT/loadgen.txt"

python3 - "$OUT/loadgen.json" "$OUT/limits.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1])); limits = json.load(open(sys.argv[2]))
mbps = run["produce"]["mb_per_s"] * 1e6
tcp = limits["loopback_tcp_bits_per_s"] / 8
disk = limits["odirect_seq_write_1m_qd1_prealloc_bytes_per_s"]
print(f"throughput {mbps/1e9:.2f} GB/s = {100*mbps/tcp:.0f}% of loopback TCP ({tcp/1e9:.2f} GB/s, iperf3) "
      f"and {100*mbps/disk:.0f}% of O_DIRECT write ({disk/1e9:.2f} GB/s, fio); "
      f"fdatasync p50 {limits['fdatasync_p50_us']:.0f} us")
v = run["verify"]
print(f"audit: {v['acked']} acknowledged, {v['lost']} lost, {v['duplicated']} duplicated, {v['reordered']} reordered")
if v["lost"] or v["duplicated"] or v["reordered"] or v["corrupt"]:
    sys.exit("demo: the audit found acknowledged records lost, duplicated, reordered or corrupt")
PY

# The loadgen topic holds ~1 GB per second of run: free the disk again.
$W topic delete loadgen $B

echo "== metrics (excerpt)"
curl -s "127.0.0.1:$ADMIN_PORT/metrics" | grep -E '^wharf_partition_end_offset\{topic="demo"' || true

echo "== stop (SIGTERM)"
kill -TERM $BROKER
wait $BROKER
echo "broker exited with status $?"
trap - EXIT
