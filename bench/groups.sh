#!/usr/bin/env bash
# Consumer-group figures (issue 15) on one local broker (2 shards, fsync always, default
# [groups] settings: heartbeat 500 ms, sticky assignor):
#   1. settle: a 6-member group on a 24-partition topic; a 7th member joins; time until all
#      7 hold a balanced, disjoint share, and how many partitions changed owner (minimum
#      possible: 24 / 7 = 3); the 7th leaves; GROUP_ROUNDS (5) times.
#   2. throughput: GROUP_RECORDS (400,000) records of 1 KiB on 8 partitions, consumed to the
#      end by one plain consumer and by groups of 1, 2 and 4 members (a thread each).
# Reports in target/groups-figures/ (settle.json, throughput.json, broker.log).
# Environment: GROUP_ROUNDS, GROUP_RECORDS, PORT (47000; PORT+1 is the admin port).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh curl
export PATH="$HOME/.cargo/bin:$PATH"
OUT=target/groups-figures
PORT=${PORT:-47000}
ROUNDS=${GROUP_ROUNDS:-5}
RECORDS=${GROUP_RECORDS:-400000}
cargo build --release --locked -p wharf -p wharf-loadgen
rm -rf "$OUT" && mkdir -p "$OUT"
./target/release/wharf serve --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$((PORT + 1))" --shards 2 > "$OUT/broker.log" 2>&1 &
BROKER=$!
trap 'kill -9 $BROKER 2>/dev/null || true; rm -rf "$OUT/data"' EXIT
for _ in $(seq 200); do curl -sf "127.0.0.1:$((PORT + 1))/readyz" > /dev/null && break; sleep 0.05; done
GB="./target/release/wharf-groupbench --bootstrap 127.0.0.1:$PORT"
echo "== 1. settle: one member joins a group of 6 (24 partitions)"
$GB --json "$OUT/settle.json" settle --members 6 --partitions 24 --rounds "$ROUNDS"
echo "== 2. throughput: $RECORDS records of 1 KiB, 8 partitions: one consumer, groups of 1, 2, 4"
$GB --json "$OUT/throughput.json" throughput --partitions 8 --records "$RECORDS" --members-list 1,2,4
kill -TERM $BROKER; wait $BROKER || true
trap - EXIT
rm -rf "$OUT/data"
