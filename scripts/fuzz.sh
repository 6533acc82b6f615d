#!/usr/bin/env bash
# Builds Wharf's cargo-fuzz targets (fuzz/, see fuzz/README.md) and runs each for FUZZ_SECONDS
# (default 60) from its committed corpus (fuzz/corpus/<target>) and regression inputs
# (fuzz/regressions/<target>). Fails if any target crashes, printing the reproducer and the
# command that replays it. Installs cargo-fuzz if it is missing; needs no root.
#
# Environment:
#   FUZZ_SECONDS=60            run time per target (libFuzzer -max_total_time)
#   FUZZ_TARGETS="a b"         which targets (default: all four)
#   FUZZ_KEEP_CORPUS=1         merge new corpus entries (coverage-minimized) into fuzz/corpus/;
#                              by default they stay under fuzz/target/corpus/ (not in the repo)
#   FUZZ_SANITIZER=address     or none (faster, no ASan: use if the sanitizer runtime fails)
#
# The only toolchain is stable Rust: the sanitizer flags cargo-fuzz passes (-Zsanitizer) are
# accepted by stable rustc with RUSTC_BOOTSTRAP=1, set here for the fuzz build only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
started=$(date +%s)

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"frame_decoder request_bodies batch_validation recovery_scan"}
sanitizer=${FUZZ_SANITIZER:-address}
keep=${FUZZ_KEEP_CORPUS:-0}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# The fuzz crate's own target directory (git-ignored): its instrumented build shares nothing
# with the workspace's.
export CARGO_TARGET_DIR="$PWD/fuzz/target"
export RUSTC_BOOTSTRAP=1
echo "== fuzz: replaying the committed inputs and the generated seeds (no libFuzzer)"
cargo test --manifest-path fuzz/Cargo.toml --locked --test replay
echo "== fuzz: building ${targets// /, } (release, debug assertions, sanitizer: $sanitizer)"
build_started=$(date +%s)
cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer"
echo "fuzz: build took $(( $(date +%s) - build_started )) s"

bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
failed=()
for target in $targets; do
  work="$CARGO_TARGET_DIR/corpus/$target"
  artifacts="$CARGO_TARGET_DIR/artifacts/$target"
  log="$CARGO_TARGET_DIR/logs/$target.log"
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  inputs=("fuzz/corpus/$target")
  [ -d "fuzz/regressions/$target" ] && inputs+=("fuzz/regressions/$target")
  echo "== fuzz: $target for $seconds s"
  # New entries go to $work (the first directory); the committed ones are only read.
  set +e
  "$bin_dir/$target" "$work" "${inputs[@]}" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=4096 -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
  status=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  corpus=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1)
  echo "fuzz: $target: ${execs:-?} execs, ${rate:-?} execs/s, $corpus, exit $status"
  if [ "$status" -ne 0 ]; then
    grep -E "panicked at|ERROR: |SUMMARY" -A2 "$log" | head -n 20 || true
    reproducer=$(sed -n "s/.*Test unit written to \(.*\)$/\1/p" "$log" | tail -n 1)
    echo "fuzz: $target FAILED (log: $log)"
    if [ -n "$reproducer" ]; then
      echo "fuzz: reproducer: $reproducer"
      echo "fuzz: replay:     $bin_dir/$target $reproducer"
      echo "fuzz:   or:       RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $target $reproducer"
      echo "fuzz:   minimize: RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir fuzz $target $reproducer"
    fi
    failed+=("$target")
    continue
  fi
  if [ "$keep" = 1 ]; then
    "$bin_dir/$target" -set_cover_merge=1 "fuzz/corpus/$target" "$work" >"$log.merge" 2>&1
    echo "fuzz: $target: merged new coverage into fuzz/corpus/$target"
  fi
done

echo "fuzz: done in $(( $(date +%s) - started )) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (a fixed crash becomes a named regression test and an input under fuzz/regressions/<target>/)"
  exit 1
fi
echo "fuzz: all targets ran clean"
