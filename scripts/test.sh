#!/usr/bin/env bash
# Runs Wharf's whole test suite: style gates (rustfmt, clippy with warnings as errors), every
# unit, property, crash-consistency and DmaDisk test, plus a batch of crash seeds from a random
# start (printed, so a failure replays with WHARF_SEED=N), and a time-boxed batch of random
# replication-simulator seeds (WHARF_SIM_SECONDS, default 120) and of the simulator's controller
# mode (WHARF_SIM_CONTROLLER_SECONDS, default 60). Installs what it needs first.
#
# The DmaDisk tests need io_uring and a filesystem with O_DIRECT (not tmpfs): they fail with a
# message saying so when either is missing, rather than passing silently.
set -euo pipefail
cd "$(dirname "$0")/.."
# e2fsprogs and mount: the disk-full test loop-mounts a small ext4 filesystem (as root).
bash scripts/setup.sh e2fsprogs mount
export PATH="$HOME/.cargo/bin:$PATH"

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo test --workspace --locked
echo "== extra crash-consistency seeds (release build: assertions stay on, seeds run ~50x faster)"
start=${WHARF_SEED_START:-$(( (RANDOM << 15 | RANDOM) * 1000000 ))}
set +o pipefail
WHARF_SEED_START=$start WHARF_SEEDS=${WHARF_EXTRA_SEEDS:-100000} \
  cargo test --release -p wharf-storage --test crash --locked -- --nocapture 2>&1 \
  | tee target/crash-extra-seeds.log | grep -E "seeds|test result|panicked|replay"
set -o pipefail
grep -q "test result: ok" target/crash-extra-seeds.log || { echo "extra crash seeds failed (see target/crash-extra-seeds.log)"; exit 1; }
echo "== bench tools: the disk stall probe's analysis, the CPU busy share"
python3 bench/test_stall_probe.py
python3 bench/test_cpu_busy.py
# The figure scripts' embedded Python runs only at the end of a benchmark: check it parses now.
for script in bench/*.sh; do
  awk "/<<'PY'/{f=1;next} /^PY\$/{f=0} f" "$script" | python3 -c 'import ast, sys; ast.parse(sys.stdin.read(), sys.argv[1])' "$script"
done
echo "== replication simulator: random seeds for ${WHARF_SIM_SECONDS:-120} s (a failure prints its seed and replay command)"
cargo run --release --locked -q -p wharf-tests --bin sim -- --seconds "${WHARF_SIM_SECONDS:-120}" > target/sim-random-seeds.log 2>&1 \
  || { tail -n 20 target/sim-random-seeds.log; echo "simulator failed (see target/sim-random-seeds.log)"; exit 1; }
tail -n 1 target/sim-random-seeds.log
echo "== replication simulator, controller mode (the shipped Raft controller): random seeds for ${WHARF_SIM_CONTROLLER_SECONDS:-60} s"
cargo run --release --locked -q -p wharf-tests --bin sim -- --controller --seconds "${WHARF_SIM_CONTROLLER_SECONDS:-60}" > target/sim-controller-seeds.log 2>&1 \
  || { tail -n 20 target/sim-controller-seeds.log; echo "simulator (controller mode) failed (see target/sim-controller-seeds.log)"; exit 1; }
tail -n 1 target/sim-controller-seeds.log
echo "== replication simulator, idempotent client retrying its batches (both modes): random seeds for ${WHARF_SIM_IDEMPOTENT_SECONDS:-30} s each"
for mode in "" "--controller"; do
  cargo run --release --locked -q -p wharf-tests --bin sim -- --idempotent-retry-per-mille 150 $mode --seconds "${WHARF_SIM_IDEMPOTENT_SECONDS:-30}" > target/sim-idempotent-seeds.log 2>&1 \
    || { tail -n 20 target/sim-idempotent-seeds.log; echo "simulator (idempotent client $mode) failed (see target/sim-idempotent-seeds.log)"; exit 1; }
  tail -n 1 target/sim-idempotent-seeds.log
done
echo "test.sh: all passed"
