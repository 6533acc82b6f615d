#!/usr/bin/env python3
"""Disk stall probe: how long this disk keeps a durable write waiting, as a floor for latency.

Runs fio doing small O_DIRECT writes, each followed by fdatasync, at a fixed low rate
(`--iops`), and logs each write's completion time. On a healthy disk completions arrive every
1/iops seconds; a gap longer than that is time the disk kept every durable write waiting
(virtual disks here stall for tens to hundreds of milliseconds now and then, at any load).

From the gaps it estimates the latency floor of any service that acknowledges only durable
data, for records arriving uniformly during the probe (an open-loop load): a record arriving
inside a stall waits at least the rest of it, so the share of records waiting longer than w is
at least sum(max(0, stall - w)) / duration. The floor for quantile q is the w where that share
falls to 1 - q. It is an estimate from one probe stream, not a proof: it assumes a stall the
probe saw held every write on the disk, which is what a host-level stall does.

It also reports how long the probe's own fdatasyncs took (fio's sync latency percentiles over
the whole run, warm-up included: a load generator runs at the same rate then). Every durable
acknowledgement waits for at least one fdatasync on the same disk, under the same load, so
these are a lower bound for any ack latency measured in that window, stalls or not.

Output (JSON, to --json or stdout): duration_s, probe_interval_ms, stalls_over_10ms,
stalled_share (time inside gaps more than 10 ms late), stall_max_ms, floor_p99_ms,
floor_p999_ms; when fio ran: fdatasync_p50_ms, fdatasync_p99_ms, fdatasync_p999_ms.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

STALL_REPORT_MS = 10.0


def floor_ms(stalls, duration_ms, quantile):
    """Smallest w with sum(max(0, s - w)) <= (1 - quantile) * duration (bisection on w)."""
    budget = (1.0 - quantile) * duration_ms
    lo, hi = 0.0, max(stalls, default=0.0)
    if sum(stalls) <= budget:
        return 0.0
    for _ in range(60):  # 60 halvings of at most a few seconds: well below 1 µs.
        mid = (lo + hi) / 2
        if sum(max(0.0, s - mid) for s in stalls) > budget:
            lo = mid
        else:
            hi = mid
    return hi


def analyse(completions_ms, interval_ms, skip_ms):
    times = sorted(t for t in completions_ms if t >= skip_ms)
    if len(times) < 2:
        raise SystemExit("stall_probe: fewer than two probe writes completed; nothing to analyse")
    duration_ms = times[-1] - times[0]
    # fio logs completion times in whole milliseconds: allow 1 ms of rounding per gap.
    stalls = [max(0.0, (b - a) - interval_ms - 1.0) for a, b in zip(times, times[1:])]
    big = [s for s in stalls if s > STALL_REPORT_MS]
    return {
        "duration_s": round(duration_ms / 1000, 3),
        "probe_interval_ms": interval_ms,
        "probe_writes": len(times),
        "stalls_over_10ms": len(big),
        "stalled_share": round(sum(big) / duration_ms, 5) if duration_ms else 0.0,
        "stall_max_ms": round(max(stalls, default=0.0), 1),
        "floor_p99_ms": round(floor_ms(stalls, duration_ms, 0.99), 2),
        "floor_p999_ms": round(floor_ms(stalls, duration_ms, 0.999), 2),
    }


def sync_latency(fio_report):
    """fdatasync latency percentiles (ms) of the probe job in fio's JSON report."""
    jobs = fio_report.get("jobs") or []
    if not jobs or "sync" not in jobs[0]:
        raise SystemExit("stall_probe: fio's report has no fdatasync latencies")
    percentiles = jobs[0]["sync"]["lat_ns"].get("percentile") or {}
    out = {}
    for name, key in (("fdatasync_p50_ms", "50.000000"), ("fdatasync_p99_ms", "99.000000"),
                      ("fdatasync_p999_ms", "99.900000")):
        if key not in percentiles:
            raise SystemExit(f"stall_probe: fio's report lacks the {key} fdatasync percentile")
        out[name] = round(percentiles[key] / 1e6, 3)
    return out


def read_log(path):
    """fio latency log lines: time_ms, latency_ns, direction, block_size, offset."""
    times = []
    with open(path) as log:
        for line in log:
            fields = line.split(",")
            if len(fields) >= 2 and fields[0].strip().isdigit():
                times.append(float(fields[0]))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="target/limits-scratch",
                        help="scratch directory on the disk under test (not tmpfs)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--skip-seconds", type=float, default=0.0,
                        help="ignore the first seconds (a load generator's warm-up)")
    parser.add_argument("--iops", type=int, default=250,
                        help="probe writes per second (each 4 KiB + fdatasync)")
    parser.add_argument("--json", help="write the result here (default: stdout)")
    parser.add_argument("--from-log", help="analyse an existing fio clat log instead of running fio")
    args = parser.parse_args()
    if args.iops <= 0 or args.seconds <= 0:
        raise SystemExit("stall_probe: --iops and --seconds must be positive")
    interval_ms = 1000.0 / args.iops

    if args.from_log:
        result = analyse(read_log(args.from_log), interval_ms, args.skip_seconds * 1000)
    else:
        os.makedirs(args.dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="stall-probe-") as scratch:
            prefix = os.path.join(scratch, "lat")
            command = [
                "fio", "--name=stall-probe", f"--filename={scratch}/probe", "--ioengine=sync",
                "--direct=1", "--rw=write", "--bs=4k", "--size=64m", "--fallocate=native",
                "--fdatasync=1", f"--rate_iops={args.iops}", f"--runtime={args.seconds}",
                "--time_based", f"--write_lat_log={prefix}", "--log_avg_msec=0",
                "--output-format=json",
            ]
            # Bounded: fio stops itself after --runtime; the timeout only guards a hung disk.
            report = subprocess.run(command, check=True, stdout=subprocess.PIPE,
                                    timeout=args.seconds + 120).stdout
            result = analyse(read_log(f"{prefix}_clat.1.log"), interval_ms,
                             args.skip_seconds * 1000)
            result.update(sync_latency(json.loads(report)))
    text = json.dumps(result)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
