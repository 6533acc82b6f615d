#!/usr/bin/env bash
# Shows what Wharf does today: builds it, self-tests direct I/O on the default data directory
# (./wharf-data), measures this machine's limits (fio, iperf3), then drives the partition log
# on DmaDisk (1 KiB records in 64 KiB batches, fdatasync per 1 MiB, fsync mode always) and
# prints its throughput as a ratio to fio's. Installs what it needs first.
#
# The broker process, the load generator and their latency report arrive with the next issues
# (single-node broker, wharf-loadgen); this script will then start a broker and drive it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh fio iperf3 iproute2
export PATH="$HOME/.cargo/bin:$PATH"

DATA_DIR=${WHARF_DATA_DIR:-./wharf-data}
echo "== build (release)"
cargo build --release --locked -p wharf -p wharf-bench
echo "== DMA self-test on $DATA_DIR"
./target/release/wharf selftest "$DATA_DIR"
echo "== machine limits"
bash bench/limits.sh
echo "== partition log on DmaDisk"
./target/release/log-append --dir "$DATA_DIR/demo-log" --total-mib "${DEMO_TOTAL_MIB:-2048}" --runs 3
