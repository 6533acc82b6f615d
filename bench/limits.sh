#!/usr/bin/env bash
# Measures this machine's limits that Wharf's figures are quoted against (medians of 3 runs):
#   - O_DIRECT sequential write, 1 MiB blocks, queue depth 1, into a preallocated file (fio)
#   - fdatasync latency after a small append (fio)
#   - loopback TCP bandwidth, one stream (iperf3)
#   - disk stalls: how long the disk kept a light stream of durable writes waiting, and the
#     latency floor that sets for any service acknowledging only durable data
#     (bench/stall_probe.py; STALL_SECONDS, default 15)
# Installs fio and iperf3 if missing. Prints a table and writes JSON to $LIMITS_JSON
# (default target/limits.json). Scratch files go to $LIMITS_DIR (default target/limits-scratch),
# which must be on the disk Wharf uses (not tmpfs).
#
# Arguments: wharf-loadgen JSON reports (--json FILE) to print next to the limits as ratios.
# With REUSE_LIMITS=1 and an existing $LIMITS_JSON, nothing is measured: the ratios are printed
# against that earlier measurement.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMITS_DIR=${LIMITS_DIR:-target/limits-scratch}
LIMITS_JSON=${LIMITS_JSON:-target/limits.json}
FIO_SIZE=${FIO_SIZE:-4g}
RUNS=${RUNS:-3}

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "limits.sh: installing $2" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$2" >/dev/null
  fi
}
need fio fio
need iperf3 iperf3
need python3 python3
need ss iproute2

ratios() {
  python3 - "$LIMITS_JSON" "$@" <<'PY'
import json, sys
limits = json.load(open(sys.argv[1]))
tcp = limits["loopback_tcp_bits_per_s"] / 8
disk = limits["odirect_seq_write_1m_qd1_prealloc_bytes_per_s"]
sync = limits["fdatasync_p50_us"]
for path in sys.argv[2:]:
    run = json.load(open(path))
    c, p = run["config"], run["produce"]
    l = p["latency_us"]
    print(f"{path}: acks={c['acks']} fsync={c['fsync']}: {p['mb_per_s']:.0f} MB/s = "
          f"{100*p['mb_per_s']*1e6/tcp:.0f}% of loopback TCP, {100*p['mb_per_s']*1e6/disk:.0f}% of O_DIRECT write; "
          f"produce p99 {l['p99']} us = {l['p99']/sync:.1f}x the fdatasync p50")
PY
}
if [ "${REUSE_LIMITS:-0}" = 1 ] && [ -f "$LIMITS_JSON" ]; then
  echo "machine limits from $LIMITS_JSON: $(cat "$LIMITS_JSON")"
  [ "$#" -gt 0 ] && ratios "$@"
  exit 0
fi

mkdir -p "$LIMITS_DIR" "$(dirname "$LIMITS_JSON")"
trap 'rm -f "$LIMITS_DIR"/fio-*; kill "${IPERF_PID:-0}" 2>/dev/null || true' EXIT

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

write_bw=()
for i in $(seq "$RUNS"); do
  rm -f "$LIMITS_DIR/fio-write"
  out=$(timeout 300 fio --name=seqwrite --filename="$LIMITS_DIR/fio-write" --ioengine=io_uring --direct=1 \
    --rw=write --bs=1m --iodepth=1 --fallocate=native --size="$FIO_SIZE" --output-format=json)
  write_bw+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"])' <<<"$out")")
done

sync_us=()
for i in $(seq "$RUNS"); do
  rm -f "$LIMITS_DIR/fio-sync"
  out=$(timeout 300 fio --name=fdatasync --filename="$LIMITS_DIR/fio-sync" --ioengine=sync --rw=write --bs=4k \
    --size=16m --fdatasync=1 --output-format=json)
  sync_us+=("$(python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["sync"]["lat_ns"]; print(j["percentile"]["50.000000"]/1000)' <<<"$out")")
done

# Disk stalls: a light probe (4 KiB write + fdatasync, 250 per second) for STALL_SECONDS; its
# gaps give the latency floor of durable acks under an open-loop load (bench/stall_probe.py).
python3 bench/stall_probe.py --dir "$LIMITS_DIR" --seconds "${STALL_SECONDS:-15}" --iops 250 \
  --json "$LIMITS_DIR/stall.json"
STALL=$(cat "$LIMITS_DIR/stall.json")

tcp_bps=()
PORT=${IPERF_PORT:-15201}
timeout 120 iperf3 -s -B 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
IPERF_PID=$!
for _ in $(seq 100); do
  ss -ltnH "sport = :$PORT" 2>/dev/null | grep -q . && break
  sleep 0.1
done
for i in $(seq "$RUNS"); do
  out=$(timeout 30 iperf3 -c 127.0.0.1 -p "$PORT" -t 3 -J)
  tcp_bps+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' <<<"$out")")
done

W=$(median "${write_bw[@]}"); S=$(median "${sync_us[@]}"); T=$(median "${tcp_bps[@]}")
python3 - "$W" "$S" "$T" "$RUNS" "$STALL" "$LIMITS_JSON" <<'PY'
import json, sys
w, s, t = map(float, sys.argv[1:4])
stall = json.loads(sys.argv[5])
limits = {"odirect_seq_write_1m_qd1_prealloc_bytes_per_s": w, "fdatasync_p50_us": s,
          "loopback_tcp_bits_per_s": t, "runs": int(sys.argv[4]), "disk_stalls": stall}
json.dump(limits, open(sys.argv[6], "w"))
print("machine limits (median of runs)")
print(f"  O_DIRECT seq write 1 MiB qd1 prealloc : {w/1e9:8.2f} GB/s")
print(f"  fdatasync after 4 KiB append, p50     : {s:8.1f} us")
print(f"  loopback TCP, one stream              : {t/1e9:8.2f} Gbit/s")
label = f"disk stalls (probe, {stall['duration_s']:.0f} s)"
print(f"  {label:<38}: {stall['stalls_over_10ms']} over 10 ms, longest {stall['stall_max_ms']:.0f} ms, "
      f"{100*stall['stalled_share']:.1f}% of the time")
print(f"  durable-ack latency floor, open loop  : p99 {stall['floor_p99_ms']:.1f} ms, p99.9 {stall['floor_p999_ms']:.1f} ms")
print(f"  fdatasync of the probe's 4 KiB writes : p50 {stall['fdatasync_p50_ms']:.2f} ms, p99 {stall['fdatasync_p99_ms']:.2f} ms, "
      f"p99.9 {stall['fdatasync_p999_ms']:.2f} ms")
PY
echo "  (written to $LIMITS_JSON)"
[ "$#" -gt 0 ] && ratios "$@"
exit 0
