#!/usr/bin/env bash
# A/B of two `wharf` broker binaries in the same run: each serves a fresh data directory (2
# shards) in turn, driven by the same wharf-loadgen (acks=leader, fsync before every ack, 2
# producers, 1 KiB records in 1 MiB batches, 4 partitions, round-robin, SECONDS per run),
# alternating A, B, A, B... RUNS times. Prints msgs/s and MB/s per run and each binary's median.
#
#   bash bench/ab-broker.sh OLD_WHARF NEW_WHARF        (e.g. a build of an older commit)
#   A_ARGS=--no-idempotence bash bench/ab-broker.sh target/release/wharf target/release/wharf
#                                                      (one binary, the producer's idempotence off in A)
#
# Env: RUNS (3), SECONDS_RUN (5), PORT (46000; PORT+1 is the admin port), OUT (target/ab),
# BATCH_BYTES (1048576), A_ARGS / B_ARGS (extra wharf-loadgen arguments for A / B).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
a=$1; b=$2
runs=${RUNS:-3}; secs=${SECONDS_RUN:-5}; port=${PORT:-46000}; out=${OUT:-target/ab}
lg=./target/release/wharf-loadgen
[[ -x $lg ]] || cargo build --release --locked -p wharf-loadgen
mkdir -p "$out"
run() {
  local bin=$1 name=$2 i=$3 extra=$4
  rm -rf "$out/data"; mkdir -p "$out/data"
  "$bin" serve --data-dir "$out/data" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + 1))" \
    --shards 2 > "$out/$name-$i.log" 2>&1 &
  local pid=$!
  for _ in $(seq 200); do curl -sf "127.0.0.1:$((port + 1))/readyz" > /dev/null && break; sleep 0.05; done
  "$lg" --bootstrap "127.0.0.1:$port" --acks leader --duration "$secs" --warmup 1 --topic ab --partitions 4 \
    --producers 2 --batch-bytes "${BATCH_BYTES:-1048576}" --partitioner round-robin $extra \
    --json "$out/$name-$i.json" > /dev/null
  kill -TERM "$pid"; wait "$pid" || true
}
for i in $(seq 1 "$runs"); do run "$a" A "$i" "${A_ARGS:-}"; run "$b" B "$i" "${B_ARGS:-}"; done
rm -rf "$out/data"
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
for name in ("A", "B"):
    rates = []
    for i in range(1, runs + 1):
        produce = json.load(open(f"{out}/{name}-{i}.json"))["produce"]
        rates.append(produce["msgs_per_s"])
        print(f"{name} run {i}: {produce['msgs_per_s']:,.0f} msgs/s, {produce['mb_per_s']:,.0f} MB/s")
    print(f"{name} median: {statistics.median(rates):,.0f} msgs/s")
PY
