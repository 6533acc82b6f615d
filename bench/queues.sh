#!/usr/bin/env bash
# Queue figures (issue 16) on one local broker (2 shards, fsync always):
#   1. throughput: QUEUE_RECORDS (100,000) records of 1 KiB on 8 partitions, consumed through a
#      queue group of 1, 4 and 16 members, every record acked individually (one settle request
#      per acquire of up to 100).
#   2. redelivery timing: QUEUE_TIMING_RECORDS (500) records nacked once each, backoff 500 ms;
#      error of each redelivery against the scheduled time (p50, p99, max).
# Reports in target/queue-figures/ (throughput.json, redelivery.json, broker.log).
# Environment: QUEUE_RECORDS, QUEUE_TIMING_RECORDS, PORT (47100; PORT+1 is the admin port).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh curl
export PATH="$HOME/.cargo/bin:$PATH"
OUT=target/queue-figures
PORT=${PORT:-47100}
RECORDS=${QUEUE_RECORDS:-100000}
TIMING=${QUEUE_TIMING_RECORDS:-500}
cargo build --release --locked -p wharf -p wharf-loadgen
rm -rf "$OUT" && mkdir -p "$OUT"
./target/release/wharf serve --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$((PORT + 1))" --shards 2 > "$OUT/broker.log" 2>&1 &
BROKER=$!
trap 'kill -9 $BROKER 2>/dev/null || true; rm -rf "$OUT/data"' EXIT
for _ in $(seq 200); do curl -sf "127.0.0.1:$((PORT + 1))/readyz" > /dev/null && break; sleep 0.05; done
QB="./target/release/wharf-queuebench --bootstrap 127.0.0.1:$PORT"
echo "== 1. throughput: $RECORDS records of 1 KiB, 8 partitions, per-record acks: 1, 4, 16 members"
$QB --json "$OUT/throughput.json" throughput --partitions 8 --records "$RECORDS" --members-list 1,4,16
echo "== 2. redelivery timing: $TIMING records nacked once, 500 ms backoff"
$QB --json "$OUT/redelivery.json" redelivery --records "$TIMING" --delay-ms 500
kill -TERM $BROKER; wait $BROKER || true
trap - EXIT
rm -rf "$OUT/data"
